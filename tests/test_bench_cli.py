"""`tomediff bench` flag parsing and validation: every bad flag fails before any work starts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from tomediff.bench import runner
from tomediff.bench.models import MODELS, get_model_spec
from tomediff.cli import bench_cmd


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tomediff")
    bench_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def parse(*argv: str) -> argparse.Namespace:
    return make_parser().parse_args(["bench", *argv])


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a benchmark would actually start."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark started although the flags are invalid")

    monkeypatch.setattr(runner, "run_benchmark", forbidden)


def test_model_choices_match_the_registry() -> None:
    assert set(bench_cmd.MODEL_CHOICES) == set(MODELS)


def test_flags_become_a_config(tmp_path: Path) -> None:
    args = parse(
        "--model", "sd15", "sdxl", "--resolution", "512", "1024", "--ratio", "0.3", "0.5",
        "--batch", "4", "--device", "cpu", "--dtype", "bf16", "--repeats", "5", "--warmup", "2",
        "--compare", "tomesd", "--out", str(tmp_path), "--merge", "attn", "mlp", "--threads", "1",
    )  # fmt: skip
    config = bench_cmd.config_from_args(args)
    assert list(config.models) == ["sd15", "sdxl"]
    assert list(config.resolutions) == [512, 1024]
    assert list(config.ratios) == [0.3, 0.5]
    assert (config.batch, config.device, config.dtype) == (4, "cpu", "bf16")
    assert (config.repeats, config.warmup, config.threads) == (5, 2, 1)
    assert config.ordered_variants() == ["baseline", "tomediff", "tomesd", "ideal"]
    assert config.shared == {
        "use_rand": False,
        "merge_attn": True,
        "merge_crossattn": False,
        "merge_mlp": True,
        "seed": 0,
    }
    settings = config.settings(get_model_spec("sdxl"), 0.3)
    assert (settings.ratio, settings.max_downsample, settings.merge_mlp) == (0.3, 2, True)


def test_defaults_follow_the_device() -> None:
    config = bench_cmd.config_from_args(parse("--device", "cpu"))
    assert (config.dtype, config.repeats, config.warmup, config.batch) == ("fp32", 3, 1, 2)
    assert list(config.models) == ["sd15"] and list(config.resolutions) == [512]
    assert "tomesd" not in config.variants  # only with --compare tomesd


def test_quick_preset_and_explicit_overrides() -> None:
    quick = bench_cmd.config_from_args(parse("--quick", "--device", "cpu"))
    assert list(quick.models) == ["sd15"]
    assert list(quick.resolutions) == [256]
    assert list(quick.ratios) == [0.5]
    assert quick.repeats == 1
    overridden = bench_cmd.config_from_args(parse("--quick", "--device", "cpu", "--resolution", "128"))
    assert list(overridden.resolutions) == [128] and overridden.repeats == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "sd9"], "invalid choice: 'sd9'"),
        (["--resolution", "500"], "multiple of 8"),
        (["--resolution", "abc"], "integer number of pixels"),
        (["--resolution", "32"], "at least 64"),
        (["--ratio", "0.9"], "out of range"),
        (["--ratio", "0"], "out of range"),
        (["--ratio", "half"], "must be a number"),
        (["--batch", "0"], "positive integer"),
        (["--repeats", "-1"], "positive integer"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--compare", "deepcache"], "invalid choice"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_model_specific_resolution_is_rejected_before_work(
    no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--model", "pixart", "--resolution", "520", "--device", "cpu")
    assert bench_cmd.run(args) == 2
    err = capsys.readouterr().err
    assert "--resolution 520" in err and "multiple of 16" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_rejected(no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cmd.run(parse("--device", "cuda")) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert bench_cmd.run(parse("--device", "cpu", "--out", str(a_file))) == 2
    assert "not a directory" in capsys.readouterr().err


def test_missing_tomesd_is_reported(
    monkeypatch: pytest.MonkeyPatch, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomediff.bench.variants as variants

    monkeypatch.setattr(variants, "tomesd_version", lambda: None)
    assert bench_cmd.run(parse("--device", "cpu", "--compare", "tomesd")) == 2
    assert "tomesd is not installed" in capsys.readouterr().err


def test_help_explains_every_flag() -> None:
    parser = make_parser()
    sub = parser._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help text"
    text = sub.format_help()
    for word in ("saving realised", "ideal", "tomesd", "--quick", "peak memory"):
        assert word in text


def test_method_flags_become_the_tomediff_options(tmp_path: Path) -> None:
    args = parse(
        "--device", "cpu", "--out", str(tmp_path), "--reuse-steps", "3", "--reuse-level", "--start", "0.2",
        "--stop", "0.8", "--min-tokens", "64", "--downsample-mode", "avg",
    )  # fmt: skip
    config = bench_cmd.config_from_args(args)
    assert dict(config.options) == {
        "reuse_steps": 3,
        "reuse_level": True,
        "start": 0.2,
        "stop": 0.8,
        "min_tokens": 64,
        "downsample_mode": "avg",
    }
    levels = bench_cmd.config_from_args(parse("--device", "cpu", "--level-ratios", "1:0.6,2:0.3"))
    assert levels.options["level_ratios"] == ((1, 0.6), (2, 0.3)) and list(levels.ratios) == [0.5]


def test_named_settings_replace_the_classic_rows(tmp_path: Path) -> None:
    args = parse(
        "--device", "cpu", "--out", str(tmp_path), "--setting", "tomesd-default", "--setting", "downsample",
        "--setting", "merge+reuse:reuse_steps=3", "--setting", "r7:ratio=0.7,use_rand=false",
    )  # fmt: skip
    config = bench_cmd.config_from_args(args)
    named = {n.name: n for n in config.named}
    assert list(named) == ["tomesd-default", "downsample", "merge+reuse", "r7"]
    assert named["tomesd-default"].library == "tomesd"
    assert named["tomesd-default"].config().use_rand is True
    assert named["tomesd-default"].config().max_downsample == 1
    assert named["merge+reuse"].config().reuse_steps == 3 and named["merge+reuse"].config().reuse_level
    assert named["r7"].config().ratio == 0.7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reuse-steps", "0"], "reuse_steps must be a positive integer"),
        (["--method", "prune"], "method must be one of merge, downsample"),
        (["--stop", "1.5"], "0 <= start <= stop <= 1"),
        (["--start", "nan"], "start must be a finite number"),
        (["--level-ratios", "1:0.9"], "level_ratios[1]=0.9 is outside"),
        (["--level-ratios", "top"], "LEVEL:RATIO pairs"),
        (["--downsample-mode", "cubic"], "downsample_mode must be one of"),
        (["--setting", "bogus"], "unknown preset 'bogus'"),
        (["--setting", "x:ratoi=0.5"], "unknown option 'ratoi'"),
        (["--setting", "x y:ratio=0.5"], "setting name 'x y'"),
        (["--setting", "tomesd-default:reuse_steps=2"], "tomesd takes only"),
    ],
)
def test_bad_method_flags_fail_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tomediff.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("tomediff bench: error: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--setting", "merge", "--ratio", "0.3"], "--ratio: options of the classic rows"),
        (["--setting", "merge", "--reuse-steps", "2"], "--reuse-steps: options of the classic rows"),
        (["--setting", "a:ratio=0.3", "--setting", "a:ratio=0.4"], "given twice"),
        (["--start", "0.7", "--stop", "0.5"], "--start, --stop: start=0.7 and stop=0.5"),
        (["--level-ratios", "1:0.6", "--ratio", "0.3"], "replaces --ratio"),
        (["--method", "downsample", "--merge", "mlp"], "reduces the keys and values of self-attention"),
    ],
)
def test_conflicting_method_flags_are_rejected_before_work(
    argv: list[str], message: str, tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_cmd.run(parse("--device", "cpu", "--out", str(tmp_path), *argv)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_every_method_field_has_a_flag_with_its_default() -> None:
    from tomediff.eval.settings import METHOD_FIELDS

    sub = make_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    by_flag = {option: action for action in sub._actions for option in action.option_strings}
    for name in METHOD_FIELDS:
        action = by_flag["--" + name.replace("_", "-")]
        assert action.default is None and "Default: " in action.help, name
    assert "Presets: tomesd-default" in by_flag["--setting"].help


def _record(variant: str, ratio: float | None, seconds: float, **fields: Any) -> Any:
    return runner.Record(
        "sd15", 256, variant, ratio, 2, "cpu", "fp32", 1024, latency_median_s=seconds, **fields
    )


def test_report_explains_a_slowdown_and_every_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tomediff bench --quick` at its small default size: a merged call slower than the baseline is
    explained, and so is each "-" the table shows."""
    records = [
        _record("baseline", None, 1.00),
        _record("tomediff", 0.5, 1.12),
        _record("ideal", 0.5, 0.98),
    ]
    runner._derive(records)

    def fake_benchmark(config: Any, progress: Any = None) -> Any:
        env = {
            "device": "cpu",
            "torch_threads": 1,
            "torch": "t",
            "diffusers": "d",
            "tomesd": None,
            "cpu": "c",
        }
        return runner.BenchResult(config, env, records)

    monkeypatch.setattr(runner, "run_benchmark", fake_benchmark)
    args = parse("--quick", "--device", "cpu", "--no-memory", "--no-flops", "--out", str(tmp_path))
    assert bench_cmd.run(args) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert (
        "sd15 256² 0.5 tomediff is slower than the baseline (0.89x): at 1,024 tokens the attention that "
        "merging removes is a small part of the call (even a zero-cost merge of the same tokens, the ideal, "
        "is only 1.02x)"
    ) in out
    assert "larger images (e.g. --resolution 512)" in out
    for said in (
        "ratio: the baseline merges nothing",
        "saving: the baseline itself, or a row whose ideal saves under 2% of the call",
        "GFLOPs: not counted (--no-flops or --compile)",
        "peak MiB, mem/base: not measured (--no-memory)",
        "Δ tomesd: only on tomediff rows run beside tomesd (--compare tomesd)",
    ):
        assert said in out, said


def test_a_slowdown_despite_a_fast_ideal_is_the_merges_own_cost() -> None:
    from tomediff.bench.report import footnotes

    records = [
        _record("baseline", None, 1.0, flops=1, peak_mem_bytes=1, max_rel_diff_vs_tomesd=0.0),
        _record("tomediff", 0.5, 1.25, flops=1, peak_mem_bytes=1, max_rel_diff_vs_tomesd=0.0),
        _record("ideal", 0.5, 0.5, flops=1, peak_mem_bytes=1, max_rel_diff_vs_tomesd=0.0),
    ]
    runner._derive(records)
    lines = footnotes(records)
    assert lines[0] == (
        "sd15 256² 0.5 tomediff is slower than the baseline (0.80x): a zero-cost merge of the same tokens "
        "(the ideal) would be 2.00x, but the merge's own work (matching, gathering, unmerging) costs more "
        "than that saves here."
    )
    # Every cell measured: the only "-" left is the baseline's ratio and saving.
    assert lines[1] == (
        '"-" in the table: ratio: the baseline merges nothing; saving: the baseline itself, or a row whose '
        "ideal saves under 2% of the call (a share of almost nothing is only noise)."
    )
    runner._derive(faster := [records[0], _record("tomediff", 0.5, 0.8), records[2]])
    assert not any("slower" in line or "gains little" in line for line in footnotes(faster))


def test_a_small_gain_at_a_small_size_is_explained() -> None:
    from tomediff.bench.report import footnotes

    records = [_record("baseline", None, 1.0), _record("tomediff", 0.5, 0.99), _record("ideal", 0.5, 0.94)]
    runner._derive(records)
    assert footnotes(records)[0] == (
        "sd15 256² 0.5 tomediff gains little (1.01x): at 1,024 tokens the attention that merging removes "
        "is a small part of the call (even a zero-cost merge of the same tokens, the ideal, is only 1.06x), "
        "so there is little to gain. Merging pays off with more tokens: larger images "
        "(e.g. --resolution 512)."
    )


def test_wan_runs_merge_downsample_and_kv_ratio_settings(tmp_path: Path) -> None:
    """The video model through the whole command on a CPU (one block, 64x64 frames: 336 tokens)."""
    import json

    from tomediff.cli.main import main

    argv = ["bench", "--model", "wan-1.3b", "--resolution", "64", "--batch", "1", "--device", "cpu"]
    argv += ["--repeats", "1", "--warmup", "1", "--no-memory", "--out", str(tmp_path)]
    argv += ["--setting", "merge", "--setting", "downsample", "--setting", "kv:kv_ratio=0.75,ratio=0"]
    argv += ["--setting", "downsample-t2:method=downsample,downsample_factor_time=2"]
    assert main(argv) == 0
    written = json.loads((tmp_path / "bench.json").read_text())
    records = {r["key"]: r for r in written["records"]}
    assert set(records) == {
        "baseline",
        "tomediff:merge",
        "ideal:merge",
        "tomediff:downsample",
        "tomediff:downsample-t2",
        "tomediff:kv",
        "ideal:kv",
    }
    assert all(r["status"] == "ok" and r["tokens"] == 21 * 4 * 4 for r in records.values())
    kv = next(named for named in written["config"]["named"] if named["name"] == "kv")
    assert ["kv_ratio", 0.75] in kv["options"]  # a number, not the text "0.75"
    base = records["baseline"]["flops"]
    for key in ("tomediff:merge", "tomediff:downsample", "tomediff:downsample-t2", "tomediff:kv"):
        # Each setting reduced the attention (fewer FLOPs) and changed the output.
        assert records[key]["flops"] < base
        assert records[key]["max_rel_diff_vs_baseline"] > 0
    assert records["tomediff:downsample-t2"]["flops"] < records["tomediff:downsample"]["flops"]


def test_downsample_factor_time_is_accepted_beside_method_downsample() -> None:
    # Each value is checked alone first; this one only applies with method=downsample.
    args = parse("--method", "downsample", "--downsample-factor-time", "2")
    assert args.downsample_factor_time == 2
    (named,) = parse("--setting", "t2:method=downsample,downsample_factor_time=2").setting
    assert named.config().downsample_factor_time == 2
