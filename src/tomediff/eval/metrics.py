"""Image-quality metrics with bootstrap confidence intervals (numpy/torch only).

* :func:`frechet_distance` — FID's formula on any feature statistics.
* :func:`psnr` / :func:`ssim` — paired fidelity of two image batches (per image).
* :func:`bootstrap_ci` — percentile 95% interval of any statistic over resampled items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "PSNR_CAP_DB",
    "Estimate",
    "bootstrap_ci",
    "feature_stats",
    "frechet_distance",
    "frechet_with_ci",
    "mean_with_ci",
    "psnr",
    "ssim",
]

# Identical images have infinite PSNR; capping keeps means finite. 100 dB is far above any real change
# of a uint8 image (one grey level off in one pixel of 28×28 is already ~77 dB).
PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap 95% interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of features ``(N, D)``."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½)``. The trace of the matrix square root
    equals that of ``(s1^½ sigma2 s1^½)^½``, which is symmetric PSD, so ``eigh`` suffices (no scipy).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigvals, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _as_float_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(images)).double()
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:  # (N, H, W) → (N, 1, H, W)
        tensor = tensor[:, None]
    return tensor


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of two batches ``(N, H, W)`` or ``(N, C, H, W)``; capped at ``PSNR_CAP_DB``."""
    x, y = _as_float_batch(a), _as_float_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x - y).pow(2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        values = 10 * np.log10(data_range**2 / mse.numpy())
    return np.minimum(values, PSNR_CAP_DB)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    data_range: float = 255.0,
    window: int = 7,
    sigma: float = 1.5,
) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, K1=0.01, K2=0.03) of two batches.

    Inputs ``(N, H, W)`` or ``(N, C, H, W)``; returns ``(N,)``. The window is 7 rather than 11 because the
    28×28 images here would leave too few valid positions for an 11×11 window.
    """
    x, y = _as_float_batch(a), _as_float_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    channels = x.shape[1]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).numpy()


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    num_items: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``num_items`` items.

    ``statistic`` receives an index array ``(num_items,)`` drawn with replacement and returns a float.
    """
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, num_items, num_items)) for _ in range(resamples)])
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def mean_with_ci(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> Estimate:
    """Mean of ``values (N,)`` with a bootstrap 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    # Vectorised bootstrap: one (resamples, N) index matrix instead of a Python loop.
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return Estimate(float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def frechet_with_ci(
    features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, resamples: int = 200, seed: int = 0
) -> Estimate:
    """Fréchet distance of ``features (N, D)`` to reference stats, with a bootstrap 95% interval
    over the generated samples (the reference is fixed: it is computed once from 10,000 real images).

    Resampled distances are biased (a resample with repeated items has a different covariance), so a
    plain percentile interval can miss the estimate itself. The interval is therefore the bootstrap
    percentiles shifted by the bootstrap bias, ``median(resampled) - d``: it keeps the spread the
    resampling measures and is centred on the estimate.
    """
    features = np.asarray(features, dtype=np.float64)
    value = frechet_distance(*feature_stats(features), ref_mu, ref_sigma)
    rng = np.random.default_rng(seed)
    resampled = np.array(
        [
            frechet_distance(
                *feature_stats(features[rng.integers(0, len(features), len(features))]), ref_mu, ref_sigma
            )
            for _ in range(resamples)
        ]
    )
    bias = float(np.median(resampled)) - value
    low, high = np.quantile(resampled, [0.025, 0.975]) - bias
    return Estimate(value, max(0.0, float(low)), float(high))
