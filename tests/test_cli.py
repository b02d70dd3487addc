"""The ``tomediff`` command as a whole: start-up imports, usage errors, Ctrl-C, and the preset and
defaults that keep a first run short (``eval --quick``, one thread for the bundled model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tomediff
from tomediff.cli import bench_cmd, demo_cmd, eval_cmd, main

HEAVY = ("torch", "diffusers", "matplotlib", "numpy", "tomediff.api", "tomediff.eval.quality")

SRC = str(Path(tomediff.__file__).resolve().parents[1])


def _python(code: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, **kwargs
    )


def _exit_code(argv: list[str]) -> int:
    try:
        return main.main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


def test_help_and_usage_errors_import_nothing_heavy() -> None:
    """Start-up is not timed (a shared machine is too noisy); what makes it slow is: no torch, no
    diffusers, for the help and for each subcommand's usage errors."""
    commands = [
        ["--help"],
        [],
        ["demo", "--bogus"],
        ["visualize", "--bogus"],
        ["eval", "--bogus"],
        ["eval", "--ratios", "0,-1"],
        ["eval", "--setting", "nope"],
        ["eval", "--model", "dit", "--compare", "tomesd"],
        ["eval", "--model", "dit", "--protocol", "paper"],
        ["demo", "--model", "dit", "--assets", "/nonexistent"],
        ["bench", "--ratio", "2"],
        ["bench", "--reuse-steps", "0"],
    ]
    code = f"""
import contextlib, io, json, sys
from tomediff.cli.main import main
heavy = {HEAVY!r}
report = []
for argv in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            exit_code = main(argv)
        except SystemExit as exit_info:
            exit_code = exit_info.code
    report.append([argv, exit_code, [m for m in heavy if m in sys.modules], out.getvalue() + err.getvalue()])
print(json.dumps(report))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for argv, exit_code, imported, printed in report:
        assert imported == [], (argv, imported)
        assert exit_code in (0, 2) and printed, argv
    help_text = report[0][3]
    for module in (bench_cmd, demo_cmd, eval_cmd):
        assert module.NAME in help_text and module.HELP.split()[0] in help_text


def test_the_package_imports_torch_only_when_its_api_is_used() -> None:
    code = """
import sys
import tomediff
from tomediff.errors import ConfigError
assert "torch" not in sys.modules, "import tomediff imported torch"
from tomediff import ToMeConfig, apply_tome
assert tomediff.remove_tome.__module__ == "tomediff.api" and "apply_tome" in dir(tomediff)
assert tomediff.ops.plan_merge is not None  # subpackages load on first use, as when imported eagerly
try:
    tomediff.no_such_name
except AttributeError as error:
    print(error)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "module 'tomediff' has no attribute 'no_such_name'" in result.stdout


@pytest.mark.parametrize("command", ["demo", "eval", "bench", "visualize"])
def test_an_unknown_flag_points_to_the_subcommands_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code([command, "--bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"tomediff {command}: error: unrecognized arguments: --bogus (see tomediff {command} --help)"
    )


def test_an_unknown_top_level_flag_points_to_the_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--bogus"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tomediff: error: unrecognized arguments: --bogus (see tomediff --help)"
    )


def test_a_ratio_below_the_range_is_not_told_to_be_lowered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(tomediff.ConfigError) as below:
        tomediff.ToMeConfig(ratio=-1)
    assert "cannot be negative" in str(below.value) and "Lower" not in str(below.value)
    with pytest.raises(tomediff.ConfigError, match="Lower ratio or use larger sx/sy"):
        tomediff.ToMeConfig(ratio=0.9)
    assert _exit_code(["eval", "--ratios", "0,-1"]) == 2
    err = capsys.readouterr().err
    assert "it cannot be negative" in err and "at most 3 of every 4" not in err
    assert _exit_code(["bench", "--ratio", "0"]) == 2
    assert "0 merges nothing" in capsys.readouterr().err
    assert _exit_code(["bench", "--ratio", "0.9"]) == 2
    assert "at most 3 of every 4 tokens" in capsys.readouterr().err


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("argv", "target", "said"),
    [
        (["eval"], ("tomediff.eval.quality", "run_quality_eval"), "interrupted; run the same command again"),
        (["demo"], ("tomediff.cli.demo_cmd", "run_demo"), "interrupted"),
        (["bench", "--quick"], ("tomediff.bench.runner", "run_benchmark"), "interrupted"),
    ],
)
def test_ctrl_c_is_one_line_and_exit_code_130(
    argv: list[str],
    target: tuple[str, str],
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module(target[0]), target[1], _interrupt)
    try:
        assert _exit_code([*argv, "--out", str(tmp_path / "out")]) == 130
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    err = capsys.readouterr().err.strip()
    # bench first says what it will measure; then one line for the interrupt
    assert err.splitlines()[-1] == f"tomediff {argv[0]}: {said}" + (" to resume" if argv[0] == "eval" else "")
    assert "Traceback" not in err and len(err.splitlines()) <= (3 if argv[0] == "bench" else 1)


def test_a_real_sigint_during_eval_exits_130_in_one_line(tmp_path: Path) -> None:
    """The signal itself, in a process of its own: Python's handler, the CLI's line, the exit code."""
    code = f"""
import os, signal, sys, time
import tomediff.eval.quality as quality
from tomediff.cli.main import main

# Python installs this handler itself unless SIGINT is ignored, as it is for a job started in the
# background by a non-interactive shell (and so for this child): install it, as any terminal would have.
signal.signal(signal.SIGINT, signal.default_int_handler)

def run_quality_eval(options):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # the interrupt arrives here

quality.run_quality_eval = run_quality_eval
sys.exit(main(["eval", "--out", {str(tmp_path / "out")!r}]))
"""
    result = _python(code)
    assert result.returncode == 128 + signal.SIGINT
    assert result.stderr.strip() == "tomediff eval: interrupted; run the same command again to resume"


def _eval_options(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[object, int, str]:
    """Run ``tomediff eval ARGV`` up to the evaluation; returns its options and the torch threads it ran
    with."""
    seen: dict[str, object] = {}

    def record(options: object) -> None:
        seen["options"], seen["threads"] = options, torch.get_num_threads()

    import tomediff.eval.quality as quality

    monkeypatch.setattr(quality, "run_quality_eval", record)
    assert _exit_code(["eval", *argv]) == 0
    return seen["options"], int(seen["threads"]), capsys.readouterr().err  # type: ignore[call-overload]


def test_eval_runs_the_bundled_model_on_one_thread_like_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, threads, _ = _eval_options(["--out", str(tmp_path)], monkeypatch, capsys)
        demo_default = main.build_parser({"demo"}).parse_args(["demo"]).threads
        assert threads == demo_default == 1
        assert torch.get_num_threads() == 2  # restored
        _, threads, _ = _eval_options(["--out", str(tmp_path), "--threads", "2"], monkeypatch, capsys)
        assert threads == 2
    finally:
        torch.set_num_threads(before)


def test_eval_quick_is_a_small_bundled_run_into_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    options, _, err = _eval_options(["--quick"], monkeypatch, capsys)
    assert (options.samples_per_class, list(options.ratios), list(options.variants)) == (
        10,
        [0.0, 0.5, 0.7],
        [],
    )
    assert options.out_dir == Path("out/eval-quick") and (tmp_path / "out/eval-quick").is_dir()
    assert options.long_run_hint == ""  # --quick is what the full run's hint suggests
    assert "tomediff eval --quick: 10 images per class, ratios 0,0.5,0.7, variants none" in err
    # Explicit flags win; named settings replace the ratio sweep as without --quick.
    options, _, _ = _eval_options(
        ["--quick", "--ratios", "0,0.3", "--samples-per-class", "2"], monkeypatch, capsys
    )
    assert (options.samples_per_class, list(options.ratios)) == (2, [0.0, 0.3])
    options, _, _ = _eval_options(["--quick", "--setting", "merge"], monkeypatch, capsys)
    assert options.samples_per_class == 10 and [n.name for n in options.named] == ["merge"]
    # The full run says how to get a first look.
    options, _, _ = _eval_options([], monkeypatch, capsys)
    assert options.samples_per_class == 100 and "tomediff eval --quick" in options.long_run_hint
    assert _exit_code(["eval", "--quick", "--model", "some/model"]) == 2
    assert "--quick applies to --protocol bundled only" in capsys.readouterr().err


def test_eval_model_dit_is_the_bundled_protocol_on_the_dit_into_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    options, threads, _ = _eval_options(["--model", "dit"], monkeypatch, capsys)
    assert (options.model, options.out_dir, threads) == ("dit", Path("out/eval-dit"), 1)
    assert list(options.variants) == ["no_rand", "all_sites"] and options.compare == []
    assert "tomediff eval --model dit --quick" in options.long_run_hint
    options, _, err = _eval_options(["--model", "dit", "--quick"], monkeypatch, capsys)
    assert (options.model, options.out_dir, list(options.variants)) == ("dit", Path("out/eval-quick-dit"), [])
    assert "variants none" in err
    options, _, _ = _eval_options(["--model", "dit", "--variants", "no_rand"], monkeypatch, capsys)
    assert list(options.variants) == ["no_rand"]
    options, _, _ = _eval_options(["--model", "dit-hires"], monkeypatch, capsys)
    assert (options.model, options.out_dir) == ("dit-hires", Path("out/eval-dit-hires"))
    assert list(options.variants) == ["no_rand", "all_sites"]
    assert "tomediff eval --model dit-hires --quick" in options.long_run_hint
    options, _, _ = _eval_options(["--model", "unet"], monkeypatch, capsys)  # the default, said explicitly
    assert (options.model, options.out_dir, len(options.variants)) == ("unet", Path("out/eval"), 3)


def test_generation_says_how_long_the_rest_will_take_after_its_first_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from tomediff.eval.settings import DIFFERENT_SEED_OFFSET, Setting
    from tomediff.eval.sharding import DistContext, estimate_text, generate_settings, plan_batches

    def sample_fn(class_ids: object, seeds: list[int]) -> np.ndarray:
        return np.zeros((len(seeds), 4, 4), dtype=np.uint8)

    settings = [Setting(), Setting(seed_offset=DIFFERENT_SEED_OFFSET)]
    batches = plan_batches(2, 2, 2)
    generate_settings(settings, batches, None, sample_fn, 1, tmp_path, DistContext(cpu=True), True, {})
    err = capsys.readouterr().err
    assert err.count("first batch took") == 1 and "the other 3 should take about" in err
    # The hint (e.g. eval's --quick) only when the rest takes long.
    assert estimate_text(40, 179, "try --quick") == (
        "first batch took 40 s: the other 179 should take about 1 h 59 min more; try --quick"
    )
    assert (
        estimate_text(5, 3, "try --quick") == "first batch took 5 s: the other 3 should take about 15 s more"
    )


def test_bench_checks_out_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomediff.bench.runner as runner

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark started although --out cannot be written")

    monkeypatch.setattr(runner, "run_benchmark", forbidden)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _exit_code(["bench", "--quick", "--out", str(blocker / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    out = blocker / "runs"
    assert (
        err
        == f"tomediff bench: error: --out {out} is not a writable directory (Not a directory); pass another"
    )
