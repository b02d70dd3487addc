"""``tomediff demo``: what token merging does to images, and how much faster it makes a real architecture.

1. Quality (bundled model, trained here): one image per Fashion-MNIST class with the same seeds,
   unmerged and at a few merge ratios; a labelled grid (rows = ratio, then |merged - unmerged| x8 per
   ratio so you see where merging changed the image; columns = class) and a table of fidelity (PSNR/SSIM
   against the unmerged image, class accuracy under the bundled classifier). This model has only 256
   tokens at its top level, too few for merging to save time: it shows quality, not speed. ``--model dit``
   runs this part on the bundled DiT instead (a small Flux transformer, 256 image tokens in every block,
   its flow-matching Euler sampler); the speed part stays on ``--speed-model``.
2. Speed (random weights, cost only): one denoising call of SD 1.5's highest-resolution transformer,
   built from the published SD 1.5 config with random weights, at 1024x1024 pixels (16,384 tokens),
   baseline vs tomediff at --speed-ratio vs the README's recommended setting (``fast``: ratio 0.7,
   matching every 2nd step, timed over 2 steps), each beside its ideal (same token counts, zero-cost
   merge), timed interleaved by `tomediff bench`'s own code; medians. Random weights cost exactly what
   trained ones do.

About 85 s on a 2-core CPU (about 20 s quality, 60 s speed, the rest start-up), offline.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tomediff.cli._args import (
    BUNDLED_MODEL_THREADS,
    BUNDLED_MODEL_THREADS_DEFAULT,
    MAX_RATIO,
    check_out_dir,
    comma_list,
    fail,
    finite_float,
    non_negative_int,
    positive_int,
    positive_ratio,
    threads_value,
    torch_threads,
)
from tomediff.cli.eval_cmd import BUNDLED_MODEL_FILES, CLASSIFIER_FILES, check_assets
from tomediff.errors import CLIUsageError, ConfigError, TomediffError

if TYPE_CHECKING:
    from tomediff.eval.pipeline import DemoDiTPipeline, DemoPipeline

__all__ = ["HELP", "NAME", "register", "run", "run_demo", "run_speed"]

NAME = "demo"
HELP = "see what token merging does to images and how much faster it makes SD 1.5 (offline)"

DIFF_GAIN = 8  # |merged - unmerged| is multiplied by this in the grid so small changes are visible
SPEED_MODELS = ("sd15-block", "sd15", "sd21", "sdxl", "pixart")  # tomediff bench model names, test-checked
QUALITY_MODELS = {"unet": "UNet", "dit": "DiT", "dit-hires": "DiT 64x64"}  # keys as in BUNDLED_MODEL_FILES


def run_demo(
    ratios: list[float],
    out_dir: Path,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    per_class: int = 1,
    repeats: int = 3,
    threads: int | None = None,
    progress: bool = True,
    assets_dir: Path | None = None,
    model: str = "unet",
) -> list[dict[str, Any]]:
    """Run the quality part on the bundled ``model`` ("unet", "dit" or "dit-hires", each with its own
    sampler) with
    ``threads`` torch threads (None: torch's choice; restored after); returns one row per ratio
    (``ratio``, ``seconds_per_step``, ``psnr``, ``ssim``, ``accuracy``) and writes ``grid.png`` and
    ``results.json`` to ``out_dir``. No speedup: at the bundled models' 256 tokens the timings of one
    small batch say little (the speed part measures speed)."""
    if model not in QUALITY_MODELS:
        raise ConfigError(f"model={model!r} is not a bundled model; use one of {', '.join(QUALITY_MODELS)}.")
    with torch_threads(threads):
        return _run_quality(
            ratios, out_dir, steps, guidance, seed, per_class, repeats, progress, assets_dir, model
        )


def _run_quality(
    ratios: list[float],
    out_dir: Path,
    steps: int,
    guidance: float,
    seed: int,
    per_class: int,
    repeats: int,
    progress: bool,
    assets_dir: Path | None,
    model: str,
) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    import tomediff
    from tomediff.eval.classifier import classify, load_classifier
    from tomediff.eval.metrics import psnr, ssim
    from tomediff.eval.pipeline import load_demo_dit, load_demo_model
    from tomediff.eval.quality import DIT_IMAGE_SIZES
    from tomediff.eval.report import save_grid, write_json
    from tomediff.progress import ProgressBar

    pipe: DemoPipeline | DemoDiTPipeline
    if model in DIT_IMAGE_SIZES:
        pipe = load_demo_dit(assets_dir, image_size=DIT_IMAGE_SIZES[model])
    else:
        pipe = load_demo_model(assets_dir)
    classifier = load_classifier(assets_dir) if assets_dir else load_classifier()
    num_classes = len(pipe.class_names)
    class_ids = [c for _ in range(per_class) for c in range(num_classes)]
    seeds = [seed + i for i in range(len(class_ids))]
    ratios = sorted({0.0, *ratios})
    rows: list[dict[str, Any]] = []
    images_by_ratio = {}
    with ProgressBar(len(ratios) * (repeats + 1) * steps, "denoising steps", enabled=progress) as bar:
        for ratio in ratios:
            handle = tomediff.apply_tome(pipe, ratio=ratio) if ratio > 0 else None
            timings = []
            try:
                # One untimed warm-up pass, then the fastest of `repeats` timed passes (least disturbed by
                # other work on the machine); every pass restarts the merge RNG so all give the same images.
                for attempt in range(repeats + 1):
                    if handle is not None:
                        handle.reseed(0)

                    # A def, not a lambda: mypy cannot type a lambda with default arguments.
                    def advance(_i: int, r: float = ratio, a: int = attempt) -> None:
                        bar.advance(
                            f"quality: ratio {r:g}, " + (f"timed pass {a}/{repeats}" if a else "warm-up pass")
                        )

                    started = time.perf_counter()
                    images = pipe(
                        class_ids,
                        seeds,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        step_callback=advance,
                    )
                    if attempt > 0:
                        timings.append((time.perf_counter() - started) / steps)
            finally:
                if handle is not None:
                    handle.remove()
            images_by_ratio[ratio] = images
            predicted, _ = classify(classifier, images)
            rows.append(
                {
                    "ratio": ratio,
                    "seconds_per_step": min(timings),
                    "accuracy": float((predicted == np.array(class_ids)).mean() * 100),
                }
            )
    base = images_by_ratio[0.0]
    for row in rows:
        merged = images_by_ratio[row["ratio"]]
        row["psnr"] = float(np.mean(psnr(merged, base))) if row["ratio"] > 0 else None
        row["ssim"] = float(np.mean(ssim(merged, base))) if row["ratio"] > 0 else None
    labels = [f"ratio {r:g}" + (" (unmerged)" if r == 0 else "") for r in ratios]
    grid_rows = [(label, images_by_ratio[r][:num_classes]) for label, r in zip(labels, ratios, strict=True)]
    grid_rows += [
        (f"|r={r:g} - unmerged| x{DIFF_GAIN}", amplified_difference(images_by_ratio[r], base)[:num_classes])
        for r in ratios
        if r > 0
    ]
    grid = save_grid(grid_rows, pipe.class_names, out_dir / "grid.png")
    write_json(
        out_dir / "results.json",
        {
            "model": model,
            "scheduler": pipe.default_scheduler,
            "steps": steps,
            "guidance": guidance,
            "seeds": seeds,
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        },
    )
    _print_table(rows, steps, len(class_ids), torch.get_num_threads(), QUALITY_MODELS[model])
    print(f"grid: {grid}")
    return rows


def _print_table(rows: list[dict[str, Any]], steps: int, batch: int, threads: int, model: str) -> None:
    # The UNet's top level is too small to gain; the DiT merges in every block, and its speed-up at a
    # larger batch, timed back to back, is in docs/quality.md §6.
    about_speed = (
        "256 tokens; ms / step is one small pass, the DiT's speed-up is in docs/quality.md section 6"
        if model == "DiT"
        else "256 tokens: too few for a speed-up, see the speed section"
    )
    title = (
        f"Quality - bundled Fashion-MNIST {model} (trained here), {batch} images, {steps} steps, {threads} "
        f"threads ({about_speed})"
    )
    headers = ["ratio", "ms / step", "PSNR vs r=0 (dB)", "SSIM vs r=0", "class acc. (%)"]
    cells = [
        [
            f"{r['ratio']:g}",
            f"{r['seconds_per_step'] * 1000:.1f}",
            "-" if r["psnr"] is None else f"{r['psnr']:.1f}",
            "-" if r["ssim"] is None else f"{r['ssim']:.3f}",
            f"{r['accuracy']:.0f}",
        ]
        for r in rows
    ]
    _table(title, headers, cells)


def amplified_difference(merged: Any, unmerged: Any, gain: int = DIFF_GAIN) -> Any:
    """``min(255, gain * |merged - unmerged|)`` per pixel, uint8: where merging changed the image."""
    import numpy as np

    diff = np.abs(merged.astype(np.int16) - unmerged.astype(np.int16)) * gain
    return np.minimum(diff, 255).astype(np.uint8)


def run_speed(
    model: str = "sd15-block",
    resolution: int = 1024,
    ratio: float = 0.5,
    repeats: int = 3,
    threads: int | None = None,
    progress: bool = True,
    recommended: bool = True,
) -> list[dict[str, Any]]:
    """Time denoising calls of a published architecture (random weights) with ``tomediff bench``'s
    runner: the baseline, merging at ``ratio`` and its ideal, and (``recommended``) the README's
    recommended setting ``fast`` (ratio 0.7, a matching every 2nd call: timed over a 2-call
    trajectory) and its ideal; one warm-up each, then ``repeats`` interleaved rounds. Returns one row
    per variant (``variant``, ``setting``, ``calls``, ``median_s``, ``min_s``, ``speedup``,
    ``saving_realised``)."""
    import torch

    from tomediff.bench.runner import BenchConfig, run_benchmark
    from tomediff.eval.settings import parse_setting
    from tomediff.progress import ProgressBar

    named = [parse_setting(f"merge:ratio={ratio:g}")] + ([parse_setting("fast")] if recommended else [])
    config = BenchConfig(
        models=(model,),
        resolutions=(resolution,),
        repeats=repeats,
        warmup=1,
        threads=threads,
        memory=False,
        flops=False,
        named=named,
        trajectory=2,
    )
    previous = torch.get_num_threads()
    try:
        with ProgressBar(config.total_steps(), "model calls", enabled=progress) as bar:
            result = run_benchmark(config, lambda text, n: bar.advance(f"speed: {text}", n))
    finally:
        torch.set_num_threads(previous)
    return [
        {
            "variant": r.variant,
            "setting": r.setting,
            "calls": r.calls_per_sample,
            "model": r.model,
            "resolution": r.resolution,
            "tokens": r.tokens,
            "ratio": r.ratio,
            "median_s": r.latency_median_s,
            "min_s": r.latency_min_s,
            "latencies_s": r.latencies_s,
            "speedup": r.speedup,
            "saving_realised": r.saving_realised,
            "threads": result.environment["torch_threads"],
            "error": r.error,
        }
        for r in result.records
    ]


def _speed_label(row: dict[str, Any]) -> str:
    if row["variant"] == "baseline":
        return "baseline"
    if row["variant"] == "tomediff" and row["setting"] == "fast":
        return f"fast r={row['ratio']:g} (recommended)"
    return f"{row['variant']} r={row['ratio']:g}"


def _print_speed(rows: list[dict[str, Any]], title_model: str) -> None:
    first = rows[0]
    title = (
        f"Speed - {title_model}, RANDOM WEIGHTS (cost only), one denoising call, batch 2, "
        f"{first['resolution']}² px = {first['tokens']:,} tokens, {first['threads']} threads, "
        "median of the interleaved calls; fast = ratio 0.7 matching every 2nd step, mean per call of 2"
    )
    headers = ["variant", "s / call (median)", "min", "speedup", "saving realised"]
    cells = [
        [
            _speed_label(r),
            "failed" if r["median_s"] is None else f"{r['median_s']:.2f}",
            "-" if r["min_s"] is None else f"{r['min_s']:.2f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "-" if r["saving_realised"] is None else f"{r['saving_realised'] * 100:.0f}%",
        ]
        for r in rows
    ]
    _table(title, headers, cells)
    by = {(r["variant"], r["setting"]): r for r in rows}
    for setting, what in (("merge", "merging"), ("fast", "the recommended setting (fast)")):
        tome, ideal = by.get(("tomediff", setting)), by.get(("ideal", setting))
        if not (tome and ideal and tome["speedup"] and ideal["speedup"]):
            continue
        saving = tome["saving_realised"]
        realised = "" if saving is None else f"; tomediff realises {saving * 100:.0f}% of the possible saving"
        print(
            f"-> {what} at r={tome['ratio']:g} makes this call {tome['speedup']:.2f}x faster (a zero-cost "
            f"merge of the same tokens would be {ideal['speedup']:.2f}x){realised}."
        )
    print("   Whole-UNet numbers: `tomediff bench`, docs/benchmarks.md; methods: docs/methods.md")


def _table(title: str, headers: list[str], cells: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for line in [headers, *cells]:
            print("  ".join(f"{c:>16}" for c in line))
        return
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right")
    for line in cells:
        table.add_row(*line)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    try:
        if args.assets is not None:
            check_assets(args.assets, [*BUNDLED_MODEL_FILES[args.model], CLASSIFIER_FILES[0]])
        if args.speed_model != "none":
            from tomediff.bench.models import get_model_spec

            multiple = get_model_spec(args.speed_model).resolution_multiple
            if args.speed_resolution % multiple:
                raise CLIUsageError(
                    f"--speed-resolution {args.speed_resolution} does not fit --speed-model "
                    f"{args.speed_model}: it must be a multiple of {multiple}"
                )
        check_out_dir(args.out)
    except TomediffError as error:
        return fail("demo", error)
    started = time.perf_counter()
    run_demo(
        args.ratios,
        args.out,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        per_class=args.per_class,
        repeats=args.repeats,
        threads=args.threads,
        progress=not args.no_progress,
        assets_dir=args.assets,
        model=args.model,
    )
    if args.speed_model != "none":
        speed = run_speed(
            args.speed_model,
            args.speed_resolution,
            args.speed_ratio,
            repeats=args.speed_repeats,
            threads=args.speed_threads,
            progress=not args.no_progress,
        )
        from tomediff.bench.models import get_model_spec
        from tomediff.eval.report import write_json

        _print_speed(speed, get_model_spec(args.speed_model).title)
        results = args.out / "results.json"
        import json

        payload = json.loads(results.read_text())
        write_json(results, {**payload, "speed": speed})
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 0


def _speed_resolution(text: str) -> int:
    value = positive_int(text)
    if value < 64 or value % 8:
        raise argparse.ArgumentTypeError(f"resolution {value} must be a multiple of 8 and at least 64")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME,
        help=HELP,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ratios",
        type=comma_list(positive_ratio, f"ratios in (0, {MAX_RATIO}]"),
        default=[0.3, 0.5, 0.7],
        metavar="R,R,...",
        help="quality: comma-separated merge ratios; 0 (unmerged) is always added. Default: 0.3,0.5,0.7",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/demo"),
        help="folder for grid.png and results.json, created if missing. Default: out/demo",
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="quality: sampling steps. Default: 20")
    parser.add_argument("--guidance", type=finite_float, default=3.0, help="quality: CFG scale. Default: 3.0")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="quality: noise seed of the first image. Default: 0"
    )
    parser.add_argument(
        "--per-class",
        type=positive_int,
        default=1,
        help="quality: images per class (grid shows the first). Default: 1",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="quality: timed passes per ratio after one warm-up (fastest is reported). Default: 3",
    )
    parser.add_argument(
        "--threads",
        type=threads_value,
        default=BUNDLED_MODEL_THREADS,
        help=f"quality: torch CPU threads. {BUNDLED_MODEL_THREADS_DEFAULT}",
    )
    parser.add_argument(
        "--model",
        choices=tuple(QUALITY_MODELS),
        default="unet",
        help="quality: the bundled model to show: unet (SD-style UNet, DPM-Solver++), dit (Flux-style "
        "transformer, flow-matching Euler; docs/quality.md section 6) or dit-hires (the same transformer at "
        "64x64, 1,024 image tokens; section 7). The speed part stays on "
        "--speed-model. Default: unet",
    )
    parser.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="quality: folder with other trained weights (those of --model and the classifier, in the "
        "shipped layout). Default: the shipped ones",
    )
    parser.add_argument(
        "--speed-model",
        choices=(*SPEED_MODELS, "none"),
        default="sd15-block",
        help="speed: architecture to time (tomediff bench names; sd15-block = SD 1.5's highest-resolution "
        "transformer; sd15 = the whole UNet, about 10x slower on a CPU), or none to skip. "
        "Default: sd15-block",
    )
    parser.add_argument(
        "--speed-resolution",
        type=_speed_resolution,
        default=1024,
        metavar="PX",
        help="speed: image size in pixels (latent PX/8). Default: 1024",
    )
    parser.add_argument(
        "--speed-ratio",
        type=positive_ratio,
        default=0.5,
        metavar="R",
        help="speed: merge ratio. Default: 0.5",
    )
    parser.add_argument(
        "--speed-repeats",
        type=positive_int,
        default=3,
        help="speed: interleaved timed rounds after one warm-up per variant (median reported). Default: 3",
    )
    parser.add_argument(
        "--speed-threads",
        type=threads_value,
        default=os.cpu_count() or 1,
        help="speed: torch CPU threads. Default: all CPUs of this machine",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.set_defaults(func=run)
