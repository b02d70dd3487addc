"""Metric correctness on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tomediff.eval.metrics import (
    PSNR_CAP_DB,
    bootstrap_ci,
    feature_stats,
    frechet_distance,
    frechet_with_ci,
    mean_with_ci,
    psnr,
    ssim,
)


def test_psnr_identical_is_capped_and_known_offset_is_exact() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(20, 230, (4, 28, 28)).astype(np.uint8)
    assert np.all(psnr(images, images) == PSNR_CAP_DB)
    shifted = images.astype(np.int64) + 10  # MSE = 100 exactly
    np.testing.assert_allclose(psnr(images, shifted), 20 * math.log10(255 / 10), rtol=1e-12)


def test_psnr_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(np.zeros((2, 28, 28)), np.zeros((2, 27, 28)))


def test_ssim_is_one_for_identical_and_drops_with_noise_and_for_unrelated_images() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28)).astype(np.float64)
    np.testing.assert_allclose(ssim(images, images), 1.0, atol=1e-12)
    slightly = np.clip(images + rng.normal(0, 5, images.shape), 0, 255)
    heavily = np.clip(images + rng.normal(0, 60, images.shape), 0, 255)
    unrelated = rng.integers(0, 256, images.shape).astype(np.float64)
    s_slight, s_heavy, s_unrelated = ssim(images, slightly), ssim(images, heavily), ssim(images, unrelated)
    assert np.all(s_slight > s_heavy) and np.all(s_heavy > s_unrelated)
    assert np.all(np.abs(s_unrelated) < 0.1)
    # SSIM is symmetric; colour (N, 3, H, W) input works per channel.
    np.testing.assert_allclose(ssim(images, heavily), ssim(heavily, images), rtol=1e-12)
    assert ssim(np.stack([images] * 3, 1), np.stack([images] * 3, 1)).shape == (3,)


def test_frechet_distance_known_values() -> None:
    dim = 5
    mu = np.arange(dim, dtype=np.float64)
    assert frechet_distance(mu, np.eye(dim), mu, np.eye(dim)) == pytest.approx(0.0, abs=1e-10)
    # Mean shift only: squared distance of the means.
    assert frechet_distance(mu, np.eye(dim), mu + 2, np.eye(dim)) == pytest.approx(4.0 * dim)
    # Isotropic covariances a²I, b²I: dim * (a - b)².
    assert frechet_distance(mu, 4 * np.eye(dim), mu, 9 * np.eye(dim)) == pytest.approx(dim * (2 - 3) ** 2)
    # Non-commuting covariances: compare with the definition via an explicit eigen square root.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T + np.eye(dim), b @ b.T + np.eye(dim)
    w, _v = np.linalg.eig(s1 @ s2)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(w.real))
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_with_ci_brackets_the_estimate_and_orders_distributions() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(5000, 8))
    mu, sigma = feature_stats(reference)
    near = frechet_with_ci(rng.normal(size=(400, 8)), mu, sigma, resamples=60)
    far = frechet_with_ci(rng.normal(size=(400, 8)) + 1.0, mu, sigma, resamples=60)
    assert near.low <= near.value <= near.high
    assert far.low <= far.value <= far.high
    assert near.high < far.low  # a shift of 1 in 8 dims (≈ 8) is far outside the sampling noise


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_n() -> None:
    rng = np.random.default_rng(4)
    small, large = rng.normal(5, 1, 50), rng.normal(5, 1, 5000)
    est_small, est_large = mean_with_ci(small), mean_with_ci(large)
    assert est_small.low < est_small.value < est_small.high
    assert est_large.low < 5.0 < est_large.high
    assert (est_large.high - est_large.low) < (est_small.high - est_small.low) / 5
    low, high = bootstrap_ci(lambda idx: float(small[idx].mean()), len(small), resamples=300)
    assert low == pytest.approx(est_small.low, abs=0.1) and high == pytest.approx(est_small.high, abs=0.1)
    assert math.isnan(mean_with_ci(np.array([])).value)
