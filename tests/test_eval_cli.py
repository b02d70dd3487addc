"""``tomediff demo`` and ``tomediff eval`` (bundled protocol) end to end on tiny random assets."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from tomediff.cli import demo_cmd, eval_cmd
from tomediff.eval.data import DEFAULT_DATA_DIR
from tomediff.eval.testing import make_tiny_assets, make_tiny_dit_assets


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def tiny_dit_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DiT beside the classifier and reference statistics (no UNet files)."""
    assets = make_tiny_assets(tmp_path_factory.mktemp("dit_assets"))
    for name in eval_cmd.BUNDLED_MODEL_FILES["unet"]:
        (assets / name).unlink()
    return make_tiny_dit_assets(assets)


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
            "--speed-model",
            "none",
            "--no-progress",
        ],
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    # No speedup in the quality part: at 256 tokens it is noise (the speed part measures speed).
    assert "PSNR" in printed and "speedup" not in printed and "Speed" not in printed
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    assert "speedup" not in rows[0] and rows[0]["psnr"] is None
    assert rows[1]["psnr"] < 100 and rows[1]["seconds_per_step"] > 0
    from PIL import Image

    width, height = Image.open(tmp_path / "grid.png").size
    # 10 class columns; rows: unmerged, ratio 0.5, |ratio 0.5 - unmerged| amplified
    assert width > 10 * 28 * 3 and 3 * 28 * 3 < height < 4 * 28 * 3


def test_demo_model_dit_shows_the_dit(
    tiny_dit_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "demo", "--model", "dit", "--assets", str(tiny_dit_assets), "--out", str(tmp_path), "--steps", "2",
        "--repeats", "1", "--ratios", "0.5", "--threads", "1", "--speed-model", "none", "--no-progress",
    ]  # fmt: skip
    args = _parse(demo_cmd, argv)
    assert args.func(args) == 0
    assert "Quality - bundled Fashion-MNIST DiT" in capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["model"], result["scheduler"]) == ("dit", "euler")
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5] and rows[0]["psnr"] is None
    assert rows[1]["psnr"] < 100  # merging changed the DiT's images (identical images give inf)
    from PIL import Image

    width, height = Image.open(tmp_path / "grid.png").size
    assert width > 10 * 28 * 3 and 3 * 28 * 3 < height < 4 * 28 * 3  # as for the UNet
    from tomediff.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model='vit' is not a bundled model; use one of unet, dit"):
        demo_cmd.run_demo([0.5], tmp_path, model="vit")


def test_difference_row_is_the_amplified_absolute_difference() -> None:
    import numpy as np

    merged = np.array([[[10, 200, 0]]], dtype=np.uint8)
    unmerged = np.array([[[12, 100, 0]]], dtype=np.uint8)
    diff = demo_cmd.amplified_difference(merged, unmerged, gain=8)
    assert diff.dtype == np.uint8 and diff.tolist() == [[[16, 255, 0]]]


def test_speed_section_times_baseline_merged_and_ideal_with_the_bench_runner() -> None:
    from tomediff.bench.models import MODELS

    assert set(demo_cmd.SPEED_MODELS) <= set(MODELS)
    rows = demo_cmd.run_speed("tiny-unet", 64, 0.5, repeats=2, threads=1, progress=False)
    assert [(r["variant"], r["setting"]) for r in rows] == [
        ("baseline", None),
        ("tomediff", "merge"),
        ("ideal", "merge"),
        ("tomediff", "fast"),
        ("ideal", "fast"),
    ]
    for row in rows:
        assert row["error"] is None and len(row["latencies_s"]) == 2 and row["median_s"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == rows[0]["median_s"] / rows[1]["median_s"]
    assert rows[1]["ratio"] == 0.5 and rows[0]["tokens"] == 64
    # the recommended setting matches every 2nd call: timed over a 2-call trajectory, ratio 0.7
    assert (rows[3]["ratio"], rows[3]["calls"]) == (0.7, 2)


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
    rows = [r for r in result["rows"] if r["library"] != "real"]
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


def test_eval_model_dit_runs_the_bundled_protocol_on_the_dit(tiny_dit_assets: Path, tmp_path: Path) -> None:
    argv = ["eval", "--model", "dit", "--assets", str(tiny_dit_assets), "--out", str(tmp_path),
            "--samples-per-class", "1", "--batch-size", "10", "--steps", "2", "--ratios", "0,0.5",
            "--no-different-seed", "--threads", "1", "--bootstrap", "20", "--no-progress"]  # fmt: skip
    assert _exit_code(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["meta"]["protocol"], result["meta"]["model"], result["meta"]["scheduler"]) == (
        "bundled",
        "dit",
        "euler",
    )
    rows = {r["name"]: r for r in result["rows"] if r["library"] != "real"}
    # The DiT's default variants: max_downsample_2 would repeat the plain row (no levels).
    assert list(rows) == ["unmerged", "tomediff r=0.5", "tomediff r=0.5 no_rand", "tomediff r=0.5 all_sites"]
    assert rows["tomediff r=0.5"]["psnr"]["value"] < 100 and rows["tomediff r=0.5"]["num_images"] == 10
    for name in ("results.md", "grid.png", "metrics_vs_ratio.png"):
        assert (tmp_path / name).is_file()


def test_eval_and_demo_model_dit_hires_sample_the_64_dit(tmp_path: Path) -> None:
    from tomediff.eval.testing import make_tiny_assets, make_tiny_dit_assets

    assets = make_tiny_dit_assets(make_tiny_assets(tmp_path / "assets"), image_size=64)
    argv = ["eval", "--model", "dit-hires", "--assets", str(assets), "--out", str(tmp_path / "eval"),
            "--samples-per-class", "1", "--batch-size", "10", "--steps", "2", "--ratios", "0,0.5",
            "--variants", "none", "--no-different-seed", "--threads", "1", "--bootstrap", "20",
            "--no-progress"]  # fmt: skip
    assert _exit_code(argv) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["meta"]["model"] == "dit-hires"
    rows = {r["name"]: r for r in result["rows"] if r["library"] != "real"}
    assert list(rows) == ["unmerged", "tomediff r=0.5"] and rows["unmerged"]["num_images"] == 10
    assert _exit_code(["eval", "--model", "dit-hires", "--assets", str(tmp_path / "assets" / "none")]) == 2
    argv = ["demo", "--model", "dit-hires", "--assets", str(assets), "--out", str(tmp_path / "demo"),
            "--steps", "2", "--ratios", "0.5", "--repeats", "1", "--threads", "1", "--speed-model", "none",
            "--no-progress"]  # fmt: skip
    assert _exit_code(argv) == 0
    demo = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert demo["model"] == "dit-hires" and demo["rows"][1]["psnr"] < 100


def _exit_code(argv: list[str]) -> int:
    from tomediff.cli import main

    try:
        return main.main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--out", "/proc/nope"], "--out /proc/nope is not a writable directory"),
        (["eval", "--ratios", "0,1.5"], "ratio 1.5 is out of range: it must be in [0, 0.75]"),
        (["eval", "--ratios", "0,abc"], "ratio must be a number, got 'abc'"),
        (["eval", "--ratios", ","], "expected a comma-separated list"),
        (["eval", "--variants", "bogus"], "--variants: unknown value(s) 'bogus'; choose from no_rand"),
        (["eval", "--compare", "deepcache"], "--compare: unknown value(s) 'deepcache'; choose from tomesd"),
        (["eval", "--compare-ratios", "0.5"], "--compare-ratios needs --compare tomesd"),
        (["eval", "--steps", "0"], "expected a positive integer, got 0"),
        (["eval", "--guidance", "nan"], "expected a finite number"),
        (["eval", "--threads", "999"], "more than the"),
        (["eval", "--fid-ref", "/nonexistent"], "--fid-ref applies to --protocol paper only"),
        (["eval", "--model", "x", "--fid-ref", "/nonexistent"], "--fid-ref /nonexistent is not a directory"),
        (["eval", "--assets", "/nonexistent"], "--assets /nonexistent lacks demo_unet.safetensors"),
        (["eval", "--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["eval", "--model", "dit", "--compare", "tomesd"], "--compare tomesd: tomesd patches only UNets"),
        (
            ["eval", "--model", "dit", "--setting", "tomesd-default"],
            "--setting tomesd-default: tomesd patches",
        ),
        (["eval", "--model", "dit", "--variants", "max_downsample_2"], "--variants max_downsample_2 gives"),
        (
            ["eval", "--model", "dit", "--protocol", "paper"],
            "--model dit is a bundled model, which the paper",
        ),
        (
            ["eval", "--protocol", "bundled", "--model", "a/b"],
            "--model a/b: the bundled protocol's models are",
        ),
        (["eval", "--model", "dit", "--assets", "/nonexistent"], "lacks demo_dit_transformer.safetensors"),
        (["eval", "--model", "dit", "--num-classes", "5"], "--num-classes applies to --protocol paper only"),
        (["demo", "--model", "dit", "--assets", "/nonexistent"], "lacks demo_dit_transformer.safetensors"),
        (["demo", "--model", "vit"], "invalid choice: 'vit'"),
        (["demo", "--ratios", "0.5,abc"], "ratio must be a number, got 'abc'"),
        (["demo", "--ratios", "0.9"], "ratio 0.9 is out of range"),
        (["demo", "--out", "/proc/nope"], "--out /proc/nope is not a writable directory"),
        (["demo", "--steps", "-1"], "expected a positive integer, got -1"),
        (["demo", "--speed-resolution", "100"], "multiple of 8"),
        (["demo", "--speed-model", "pixart", "--speed-resolution", "520"], "must be a multiple of 16"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tomediff.eval.quality as quality

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started although the arguments are invalid")

    monkeypatch.setattr(quality, "run_quality_eval", forbidden)
    monkeypatch.setattr(demo_cmd, "run_demo", forbidden)
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith(f"tomediff {argv[0]}: error: ")
    assert "Traceback" not in err


def test_version_and_help_give_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    import tomediff
    from tomediff.cli import main

    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"tomediff {tomediff.__version__} (torch ")
    parser = main.build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in ("eval", "demo"):
        for action in subparsers[command]._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                assert action.help and "Default" in action.help, (command, action.option_strings)


def test_eval_variant_names_match_the_settings() -> None:
    from tomediff.eval.settings import VARIANTS

    assert tuple(VARIANTS) == eval_cmd.VARIANT_NAMES


def test_cli_names_the_bundled_models_and_their_files_as_the_library_does() -> None:
    from tomediff.eval.classifier import CLASSIFIER_FILE, REFERENCE_STATS_FILE
    from tomediff.eval.pipeline import DIT_FILES, DIT_HIRES_FILES
    from tomediff.eval.quality import BUNDLED_MODELS, DIT_IMAGE_SIZES, _model_files

    assert set(eval_cmd.BUNDLED_MODEL_FILES) == set(BUNDLED_MODELS) == set(demo_cmd.QUALITY_MODELS)
    assert eval_cmd.BUNDLED_MODEL_FILES["dit"] == DIT_FILES
    assert eval_cmd.BUNDLED_MODEL_FILES["dit-hires"] == DIT_HIRES_FILES
    assert set(DIT_IMAGE_SIZES) == set(eval_cmd.BUNDLED_DITS)
    for model, files in eval_cmd.BUNDLED_MODEL_FILES.items():
        assert files == _model_files(model)
    assert eval_cmd.CLASSIFIER_FILES == (CLASSIFIER_FILE, REFERENCE_STATS_FILE)
    assert set(eval_cmd.DIT_VARIANTS) < set(eval_cmd.VARIANT_NAMES)


def test_eval_model_help_gives_the_paper_protocols_real_default() -> None:
    from tomediff.cli import main
    from tomediff.eval.paper import PaperOptions

    parser = main.build_parser({"eval"})
    subparser = parser._subparsers._group_actions[0].choices["eval"]  # type: ignore[union-attr]
    model = next(a for a in subparser._actions if a.dest == "model")
    assert f"{PaperOptions.model} (paper)" in " ".join(model.help.split())


def _small_eval(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval", "--assets", str(assets), "--out", str(out), "--samples-per-class", "1", "--batch-size", "10",
        "--steps", "2", "--ratios", "0", "--variants", "none", "--no-different-seed", "--threads", "1",
        "--bootstrap", "20", "--no-progress", *extra,
    ]  # fmt: skip


def _batches(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("batch_*.npz")}


def test_eval_resumes_only_exact_matches_and_never_overwrites(
    tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert _exit_code(_small_eval(tiny_assets, out)) == 0
    first = _batches(out)
    results = (out / "results.json").read_bytes()
    assert list(first) == ["images/unmerged/batch_00000.npz"]
    capsys.readouterr()
    # A changed setting that changes images: refused in one line, nothing touched.
    for extra, said in (
        (["--steps", "3"], "steps=2 (now 3)"),
        (["--guidance", "2.5"], "guidance=3.0 (now 2.5)"),
        (["--seed", "5"], "base_seed=0 (now 5)"),
        (["--batch-size", "5"], "batch_size=10 (now 5)"),
    ):
        argv = _small_eval(tiny_assets, out)
        flag = argv.index(extra[0]) if extra[0] in argv else None
        if flag is not None:
            argv[flag + 1] = extra[1]
        else:
            argv += extra
        assert _exit_code(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert said in err and "pass a new --out" in err and len(err.splitlines()) == 1, err
        assert _batches(out) == first and (out / "results.json").read_bytes() == results
    # Same settings: everything is reused (no batch rewritten); a new ratio adds only its own images.
    assert _exit_code(_small_eval(tiny_assets, out, "--ratios", "0,0.5")) == 0
    now = _batches(out)
    assert now["images/unmerged/batch_00000.npz"] == first["images/unmerged/batch_00000.npz"]
    assert set(now) == {"images/unmerged/batch_00000.npz", "images/tomediff_r0.5/batch_00000.npz"}
    # Other model weights are another model: refused.
    other = make_tiny_assets(tmp_path / "other", seed=1)
    assert _exit_code(_small_eval(other, out)) == 2
    assert "model=" in capsys.readouterr().err


def test_images_of_an_older_run_without_a_record_are_not_reused(tmp_path: Path) -> None:
    import numpy as np

    from tomediff.errors import ResumeMismatchError
    from tomediff.eval.settings import Setting
    from tomediff.eval.sharding import DistContext, generate_settings, plan_batches

    def sample_fn(class_ids: object, seeds: list[int]) -> np.ndarray:
        return np.zeros((len(seeds), 4, 4), dtype=np.uint8)

    batches = plan_batches(1, 2, 2)
    old = tmp_path / "images" / "unmerged" / "batch_00000.npz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"made by an older version")
    with pytest.raises(ResumeMismatchError, match="no record of the settings"):
        generate_settings(
            [Setting()],
            batches,
            None,
            sample_fn,
            1,
            tmp_path,
            DistContext(cpu=True),
            False,
            run_key={"steps": 1},
        )
    assert old.read_bytes() == b"made by an older version"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reuse-steps", "0"], "reuse_steps must be a positive integer"),
        (["--setting", "nope"], "unknown preset 'nope'"),
        (["--setting", "merge", "--ratios", "0,0.5"], "--ratios: options of the classic rows"),
        (["--setting", "merge", "--stop", "0.5"], "--stop: options of the classic rows"),
        (["--start", "0.8", "--stop", "0.5"], "--start, --stop: start=0.8 and stop=0.5"),
        (["--level-ratios", "1:0.6", "--ratios", "0,0.5"], "replaces the ratio sweep"),
    ],
)
def test_bad_method_arguments_fail_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(["eval", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("tomediff eval: error: ")


def test_eval_compares_named_settings(tiny_assets: Path, tmp_path: Path) -> None:
    argv = [
        "eval", "--assets", str(tiny_assets), "--out", str(tmp_path), "--samples-per-class", "1",
        "--batch-size", "10", "--steps", "2", "--no-different-seed", "--threads", "1", "--bootstrap", "20",
        "--no-progress", "--setting", "downsample", "--setting", "merge+reuse:reuse_steps=2",
        "--setting", "shared:reuse_cfg=true",
    ]  # fmt: skip
    assert _exit_code(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by_name = {r["name"]: r for r in rows}
    names = [r["name"] for r in rows if r["library"] != "real"]
    assert names == ["unmerged", "downsample", "merge+reuse", "shared"]
    # reuse_cfg's default cfg_layout="auto" asks the pipeline whether a batch is a guidance pair: the
    # eval patches through its pipeline, so the setting runs instead of refusing to guess.
    assert by_name["shared"]["reuse_cfg"] is True and by_name["shared"]["psnr"]["value"] > 0
    assert by_name["downsample"]["method"] == "downsample" and by_name["downsample"]["downsample_factor"] == 2
    assert by_name["merge+reuse"]["reuse_steps"] == 2 and by_name["merge+reuse"]["reuse_level"] is True
    for name in ("downsample", "merge+reuse"):
        assert by_name[name]["psnr"]["value"] > 0 and (tmp_path / "images" / name / "settings.json").is_file()
