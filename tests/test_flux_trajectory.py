"""benchmarks/flux_trajectory.py on a tiny Flux: the settings of gpu_bench.sh's ``stack`` part run, and
MagCache with the ratios calibrated on FLUX.1-dev skips the steps it skips on the real model."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_trajectory():
    path = ROOT / "benchmarks" / "flux_trajectory.py"
    spec = importlib.util.spec_from_file_location("flux_trajectory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_stack_settings() -> list[str]:
    """The ``--setting`` values of gpu_bench.sh's ``stack`` part, as the shell would pass them."""
    script = (ROOT / "benchmarks" / "gpu_bench.sh").read_text()
    part = re.search(r"if has_part stack; then\n(.*?)\nfi\n", script, re.S)
    assert part is not None, "gpu_bench.sh has no stack part"
    command = part.group(1).replace("\\\n", " ").split("2>&1")[0]
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words) if word == "--setting"]


def run(module, tmp_path: Path, steps: int, settings: list[str]) -> dict[str, dict]:
    argv = ["--dry-run", "--steps", str(steps), "--out", str(tmp_path)]
    for setting in settings:
        argv += ["--setting", setting]
    assert module.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    return {row["name"]: row for row in rows}


def test_gpu_stack_settings_run_on_a_tiny_flux(flux_trajectory, tmp_path):
    settings = gpu_stack_settings()
    assert len(settings) >= 8
    rows = run(flux_trajectory, tmp_path, 28, settings)
    assert set(rows) == {"unaccelerated"} | {text.split(":", 1)[0] for text in settings}
    assert rows["unaccelerated"]["block_calls"] == 28
    # The published MagCache ratios decide alone, so the tiny model skips what FLUX.1-dev skips: diffusers'
    # default (threshold 0.06, 3 steps at most, the first 20% kept) computes 14 of 28 steps, the MagCache
    # authors' Flux setting (0.24, 5, 10%) 8.
    assert rows["mag-default"]["block_calls"] == 14
    assert rows["mag-e024k5r01"]["block_calls"] == 8
    # Merging in the computed steps leaves MagCache's decisions alone, and changes the result.
    stack = rows["mag-e024k5r01+merge0.3-skip1"]
    assert stack["block_calls"] == 8
    assert stack["relative_difference"] != rows["mag-e024k5r01"]["relative_difference"]


def test_mag_ratios_follow_the_step_count(flux_trajectory, tmp_path):
    """At 10 steps diffusers interpolates the 28 published ratios to 1.0, 1.078, 1.031, 1.031, 1.016,
    1.008, 1.0, 0.996, 0.965, 0.891. The first 2 steps (20%) are kept; after them the accumulated error
    |1 - product| passes 0.06 at steps 3, 6 and 9: 5 computed steps."""
    rows = run(flux_trajectory, tmp_path, 10, ["mag:cache=mag:threshold=0.06/max_skip=3"])
    assert rows["mag"]["block_calls"] == 5
