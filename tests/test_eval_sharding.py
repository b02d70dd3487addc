"""Sharded, resumable generation: the plan, resume, and a 2-process Accelerate run == 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tomediff.eval.settings import DIFFERENT_SEED_OFFSET, Setting, build_settings
from tomediff.eval.sharding import DistContext, generate_settings, load_samples, plan_batches
from tomediff.eval.testing import make_tiny_assets

SRC = Path(__file__).resolve().parents[1] / "src"


def test_plan_pairs_seeds_across_classes_and_batches() -> None:
    batches = plan_batches(samples_per_class=3, num_classes=4, batch_size=5, base_seed=100)
    assert [len(b.seeds) for b in batches] == [5, 5, 2]
    seeds = [s for b in batches for s in b.seeds]
    classes = [c for b in batches for c in b.class_ids]
    assert seeds == list(range(100, 112))
    assert [classes.count(c) for c in range(4)] == [3, 3, 3, 3]


def test_settings_sweep_has_baseline_control_variants_and_comparison() -> None:
    settings = build_settings(ratios=(0, 0.5), compare=("tomesd",))
    names = [s.name for s in settings]
    assert names[:3] == ["unmerged", "unmerged, different seed", "tomediff r=0.5"]
    assert "tomesd r=0.5" in names and "tomediff r=0.5 no_rand" in names
    assert settings[1].seed_offset == DIFFERENT_SEED_OFFSET
    assert len({s.slug for s in settings}) == len(settings)
    with pytest.raises(ValueError, match="variant"):
        build_settings(variants=("bogus",))


def test_generation_resumes_and_regenerates_only_what_is_missing(tmp_path: Path) -> None:
    calls: list[tuple[int, ...]] = []

    def sample_fn(class_ids: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        calls.append(tuple(seeds))
        return np.stack([np.full((4, 4), s % 256, dtype=np.uint8) for s in seeds])

    unet = torch.nn.Linear(1, 1)  # "none" settings never patch it
    settings = [Setting(), Setting(seed_offset=DIFFERENT_SEED_OFFSET)]
    batches = plan_batches(2, 3, 4)
    dist = DistContext(cpu=True)
    first = generate_settings(settings, batches, unet, sample_fn, 1, tmp_path, dist, progress=False)
    assert len(calls) == 2 * len(batches)
    calls.clear()
    again = generate_settings(settings, batches, unet, sample_fn, 1, tmp_path, dist, progress=False)
    assert calls == []  # everything was on disk
    np.testing.assert_array_equal(first["unmerged"].images, again["unmerged"].images)
    (tmp_path / "images" / "unmerged" / "batch_00001.npz").unlink()
    (tmp_path / "images" / "unmerged" / "batch_00000.npz").write_bytes(b"truncated")  # killed mid-write
    generate_settings(settings, batches, unet, sample_fn, 1, tmp_path, dist, progress=False)
    assert sorted(calls) == sorted([batches[0].seeds, batches[1].seeds])
    control = load_samples(tmp_path, settings[1], batches)
    assert list(control.seeds) == [s + DIFFERENT_SEED_OFFSET for b in batches for s in b.seeds]


def _eval_args(assets: Path, out: Path) -> list[str]:
    return [
        "--assets",
        str(assets),
        "--out",
        str(out),
        "--samples-per-class",
        "1",
        "--batch-size",
        "3",
        "--steps",
        "2",
        "--ratios",
        "0,0.5",
        "--variants",
        "no_rand",
        "--threads",
        "1",
        "--cpu",
        "--bootstrap",
        "50",
        "--no-progress",
    ]


def test_two_accelerate_processes_produce_the_single_process_images(tmp_path: Path) -> None:
    if shutil.which("accelerate") is None and not _has_module("accelerate"):
        pytest.skip("accelerate not installed")
    assets = make_tiny_assets(tmp_path / "assets")
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
    }
    single = tmp_path / "single"
    sharded = tmp_path / "sharded"
    subprocess.run(
        [sys.executable, "-m", "tomediff.eval", *_eval_args(assets, single)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    # On a machine without GPUs, --multi_gpu makes Accelerate start the processes with torchrun (gloo);
    # --cpu (its own flag, or ours) alone would start a single process.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tomediff.eval",
    ]
    result = subprocess.run(
        [*launch, *_eval_args(assets, sharded)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Ten samples in batches of 3 → 4 batches: process 0 made 0 and 2, process 1 made 1 and 3.
    for setting in ("unmerged", "unmerged_different_seed", "tomediff_r0.5", "tomediff_r0.5_no_rand"):
        files = sorted(p.name for p in (sharded / "images" / setting).glob("batch_*.npz"))
        assert files == [f"batch_{i:05d}.npz" for i in range(4)]
        for name in files:
            with (
                np.load(single / "images" / setting / name) as a,
                np.load(sharded / "images" / setting / name) as b,
            ):
                np.testing.assert_array_equal(a["images"], b["images"])
                np.testing.assert_array_equal(a["seeds"], b["seeds"])
    meta = json.loads((sharded / "results.json").read_text())["meta"]
    assert meta["environment"]["processes"] == 2  # really sharded, not one process doing everything
    single_rows = json.loads((single / "results.json").read_text())["rows"]
    sharded_rows = json.loads((sharded / "results.json").read_text())["rows"]
    assert [r["accuracy"] for r in single_rows] == [r["accuracy"] for r in sharded_rows]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
