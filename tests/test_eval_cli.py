"""``tomediff demo`` and ``tomediff eval`` (bundled protocol) end to end on tiny random assets."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from tomediff.cli import demo_cmd, eval_cmd
from tomediff.eval.data import DEFAULT_DATA_DIR
from tomediff.eval.testing import make_tiny_assets


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


def _parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_demo_writes_grid_and_table(
    tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(
        demo_cmd,
        [
            "demo",
            "--assets",
            str(tiny_assets),
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--ratios",
            "0.5",
            "--threads",
            "1",
            "--no-progress",
        ],
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "PSNR" in printed
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    assert rows[0]["speedup"] == 1.0 and rows[0]["psnr"] is None
    assert rows[1]["psnr"] < 100 and rows[1]["seconds_per_step"] > 0
    from PIL import Image

    width, height = Image.open(tmp_path / "grid.png").size
    assert width > 10 * 28 * 3 and height > 2 * 28 * 3  # 10 class columns, 2 ratio rows


def test_eval_bundled_writes_every_output(tiny_assets: Path, tmp_path: Path) -> None:
    args = _parse(
        eval_cmd,
        [
            "eval",
            "--assets",
            str(tiny_assets),
            "--out",
            str(tmp_path),
            "--samples-per-class",
            "1",
            "--batch-size",
            "10",
            "--steps",
            "2",
            "--ratios",
            "0,0.5",
            "--variants",
            "max_downsample_2",
            "--compare",
            "tomesd",
            "--threads",
            "1",
            "--bootstrap",
            "50",
            "--no-progress",
        ],
    )
    assert args.func(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in result["rows"] if r["method"] != "real"]
    assert [r["name"] for r in rows] == [
        "unmerged",
        "unmerged, different seed",
        "tomediff r=0.5",
        "tomediff r=0.5 max_downsample_2",
        "tomesd r=0.5",
    ]
    # The real-images floor row is there exactly when Fashion-MNIST is installed.
    assert len(result["rows"]) - len(rows) == int(DEFAULT_DATA_DIR.is_dir())
    for row in rows:
        assert row["num_images"] == 10
        assert 0 <= row["accuracy"]["ci_low"] <= row["accuracy"]["value"] <= row["accuracy"]["ci_high"] <= 100
        assert row["frechet"]["value"] > 0
    assert rows[1]["psnr"]["value"] < rows[2]["psnr"]["value"]  # other seed = big change
    with (tmp_path / "results.csv").open() as handle:
        header = next(csv.reader(handle))
    assert {"name", "accuracy", "accuracy_ci_low", "frechet_ci_high", "psnr", "ssim", "speedup"} <= set(
        header
    )
    for name in ("results.md", "grid.png", "metrics_vs_ratio.png"):
        assert (tmp_path / name).is_file()
