"""``tomediff bench``: latency, peak memory and FLOPs of real architectures with and without merging."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tomediff.cli._args import (
    MAX_RATIO,
    OnelineParser,
    check_out_dir,
    non_negative_int,
    positive_int,
    positive_ratio,
)
from tomediff.errors import CLIUsageError

__all__ = ["HELP", "NAME", "QUICK", "config_from_args", "main", "register", "run"]

NAME = "bench"
HELP = "benchmark speed and memory of real architectures: baseline vs tomediff vs tomesd vs ideal"

# Model names are listed here (not imported from tomediff.bench) so that `tomediff --help` does not
# import torch; tests check that the two lists agree.
MODEL_CHOICES: tuple[str, ...] = (
    "sd15",
    "sd21",
    "sdxl",
    "pixart",
    "sd3",
    "flux",
    "flux2",
    "wan-1.3b",
    "wan-14b",
    "hunyuanvideo",
    "qwen-image",
    "sd15-block",
    "sdxl-block",
    "tiny-unet",
    "tiny-pixart",
)

# --quick: one small configuration, about 2 minutes on 2 CPU cores (104 s measured: 30 s of timing,
# 70 s of peak-memory processes). Explicit flags override it.
QUICK: dict[str, Any] = {"model": ["sd15"], "resolution": [256], "ratio": [0.5], "repeats": 1, "warmup": 1}

DESCRIPTION = """\
Measure one denoising call (the UNet/transformer forward; batch 2 = one image with classifier-free
guidance) of published architectures - SD 1.5, SD 2.1, SDXL base, PixArt-alpha, SD3-medium,
FLUX.1-dev, FLUX.2-dev, Wan 2.1 T2V 1.3B (video) - built from their released configs with random weights
(nothing is downloaded; cost does not depend on the weights).

Variants, all in the same run, their timed calls interleaved so machine drift hits all alike:
  baseline   the unmodified model
  tomediff   token merging by this library
  tomesd     tomesd 0.1.3 with the same settings (--compare tomesd)
  ideal      the same token reduction with a zero-cost merge: N-r tokens simply kept and copied
             back, no matching - the fastest any merging method can be at that ratio

Reported per (model, resolution, ratio): median latency, speedup vs baseline, saving realised =
(T_base - T_variant) / (T_base - T_ideal), FLOPs (torch.utils.flop_counter), peak memory
(CUDA: max_memory_allocated during the call; CPU: peak RSS during the call above the loaded model,
each configuration in its own process), and the output difference to tomesd.
Merging is applied at the highest-resolution level with transformer blocks (max_downsample 1; 2 for
SDXL, where tomesd's default of 1 would patch nothing), to self-attention only unless --merge says
otherwise, with the deterministic top-left partition unless --use-rand. The method flags (--method,
--reuse-steps, --start/--stop, ...) change the tomediff rows.

Named settings (--setting, repeatable) replace those classic rows: baseline, every named setting, and
the ideal of each distinct selection of blocks, ratios and schedule (shared by settings that differ
only in plan reuse or randomness; none for method=downsample, which keeps every query: its saving is
shown as n/a). A setting whose cost changes over the denoising (start/stop, reuse_steps > 1) is timed
over --trajectory consecutive calls at evenly spaced timesteps, patched once; the mean per call is
reported. Every other row is one call at timestep 999, as before.
"""

EPILOG = """\
examples:
  tomediff bench --quick                              # about 2 minutes on a 2-core CPU
  tomediff bench --model sd15 --resolution 512 768 1024 --compare tomesd --out runs/sd15
  tomediff bench --model sd15 sdxl --resolution 512 1024 2048 --device cuda --dtype fp16 --compare tomesd
  tomediff bench --model sd15-block --resolution 1024 --setting tomesd-default --setting merge
  tomediff bench --setting merge --setting downsample --setting merge+schedule --setting r7:ratio=0.7
  tomediff bench --quick --reuse-steps 2 --reuse-level          # the tomediff row with plan reuse
outputs in --out: bench.json (settings, machine, every record), bench.csv, speedup.png
"""


def _resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"resolution must be an integer number of pixels, got {text!r}"
        ) from None
    if value < 64 or value % 8:
        raise argparse.ArgumentTypeError(
            f"resolution {value} is invalid: it must be a multiple of 8 (the VAE downsamples by 8) and "
            "at least 64"
        )
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    # ToMeConfig's fields make the method flags; importing them imports torch, so only when registering.
    from tomediff.cli._method_args import add_method_arguments, add_setting_argument

    parser = subparsers.add_parser(
        NAME,
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        nargs="+",
        choices=MODEL_CHOICES,
        metavar="NAME",
        help="architectures: sd15, sd21, sdxl, pixart (PixArt-alpha XL-2 1024), sd3 (SD3-medium MMDiT), "
        "flux (FLUX.1-dev; on a CPU both keep a few blocks, see docs/dits.md), flux2 (FLUX.2-dev; "
        "one double- and one single-stream block on a CPU), wan-1.3b and wan-14b (Wan 2.1 "
        "T2V 1.3B / 14B video transformers, 81 frames; one block on a CPU), hunyuanvideo (HunyuanVideo, "
        "129 frames, 1280x720 at --resolution 720; one double- and one single-stream block on a CPU), "
        "qwen-image (Qwen-Image, e.g. --resolution 1328; one block on a CPU), sd15-block (SD 1.5's "
        "first transformer alone, for very large images), sdxl-block (SDXL's first transformer, 2 "
        "blocks at 1/16 of the image), tiny-unet/tiny-pixart (smoke tests). "
        "Default: sd15",
    )
    parser.add_argument(
        "--resolution",
        nargs="+",
        type=_resolution,
        metavar="PX",
        help="square image sizes in pixels, multiples of 8 (PixArt: 16); the latent is PX/8. Video models "
        "(wan-1.3b, multiples of 16): the height of an 81-frame clip, 480 = 832x480 (32,760 tokens), "
        "720 = 1280x720 (75,600 tokens), other heights square frames. Default: 512",
    )
    parser.add_argument(
        "--ratio",
        nargs="+",
        type=positive_ratio,
        metavar="R",
        help=f"merge ratios in (0, {MAX_RATIO}]: fraction of tokens removed in each merged block. "
        "Default: 0.5",
    )
    parser.add_argument(
        "--batch", type=positive_int, default=2, help="batch size; 2 = one image with CFG. Default: 2"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to run. Default: cuda when available, else cpu",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        help="weights and activations. Default: fp16 on cuda, fp32 on cpu",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        help="timed calls per variant; the median is reported. Default: 3 on cpu, 10 on cuda",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        help="untimed calls per variant before timing (the first also counts FLOPs). "
        "Default: 1 on cpu, 3 on cuda",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        choices=("tomesd",),
        default=[],
        help="other implementations to include; tomesd must be installed (pip install tomesd==0.1.3)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench"),
        help="directory for bench.json, bench.csv and speedup.png. Default: runs/bench",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="preset: sd15 at 256², ratio 0.5, one warm-up and one timed call per variant (about 2 "
        "minutes on 2 CPU cores: 104 s measured, 70 s of it the peak-memory processes, which --no-memory "
        "skips); "
        "explicit --model/--resolution/--ratio/--repeats/--warmup override it",
    )
    parser.add_argument(
        "--use-rand",
        action="store_true",
        help="random dst token in each 2x2 window (tomesd's default) instead of the top-left one; "
        "tomediff and tomesd outputs are then not comparable (different random streams)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        choices=("attn", "crossattn", "mlp"),
        default=None,
        help="where tokens are merged: before self-attention (attn), cross-attention, the MLP. Default: attn",
    )
    add_setting_argument(parser, "baseline, each setting and its ideal")
    parser.add_argument(
        "--trajectory",
        type=positive_int,
        default=2,
        metavar="CALLS",
        help="calls per timed sample for settings whose cost changes over the denoising (start/stop, "
        "reuse_steps > 1), at timesteps 1000*(1 - (i + 1/2)/CALLS); 2 makes stop=0.5 active in half "
        "the calls and reuse_steps=2 match in half of them, as in a long sampling run. Default: 2",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (torch.set_num_threads), also used by the memory processes. "
        "Default: torch's own choice",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time torch.compile'd calls: the baseline and every variant compiled alike, in the same run "
        "(each variant and resolution compiles once during its warm-up; FLOPs are not counted)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        default="default",
        help="torch.compile mode with --compile (reduce-overhead uses CUDA graphs). Default: default",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights and inputs. Default: 0"
    )
    add_method_arguments(parser, "For the tomediff rows without --setting (with it, give them per setting).")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """Validate the parsed flags against each other and the machine; returns a ``BenchConfig``.

    Raises:
        CLIUsageError (a ValueError): with a message naming the offending flag, before any model is built.
    """
    import torch

    from tomediff.bench.models import get_model_spec
    from tomediff.bench.runner import BenchConfig
    from tomediff.bench.variants import tomesd_version
    from tomediff.cli._method_args import check_named, method_options, replace_options

    quick = QUICK if args.quick else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return quick.get(name, default)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIUsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    on_gpu = device == "cuda"
    models = list(dict.fromkeys(pick("model", ["sd15"])))
    resolutions = list(dict.fromkeys(pick("resolution", [512])))
    ratios = list(dict.fromkeys(pick("ratio", [0.5])))
    for name in models:
        spec = get_model_spec(name)
        for resolution in resolutions:
            if resolution % spec.resolution_multiple:
                raise CLIUsageError(
                    f"--resolution {resolution} does not fit --model {name}: it must be a multiple of "
                    f"{spec.resolution_multiple}"
                )
    named = check_named(
        args,
        {
            "--ratio": args.ratio is not None,
            "--compare": bool(args.compare),
            "--use-rand": args.use_rand,
            "--merge": args.merge is not None,
        },
    )
    options = method_options(args)
    if options.get("level_ratios") is not None and args.ratio is not None:
        raise CLIUsageError(
            "--level-ratios gives each level its own ratio and replaces --ratio; drop --ratio"
        )
    if options.get("level_ratios") is not None and args.compare:
        raise CLIUsageError("--level-ratios: tomesd has no per-level ratios; drop --compare tomesd")
    if options.get("level_ratios") is not None:
        options = {"ratio": 0.5, "max_downsample": None, **options}
        ratios = [0.5]
    merge = args.merge or ["attn"]
    variants = ["baseline", "tomediff", "ideal"]
    if "tomesd" in args.compare:
        if tomesd_version() is None:
            raise CLIUsageError("--compare tomesd: tomesd is not installed (pip install tomesd==0.1.3)")
        variants.append("tomesd")
    if args.threads and args.threads > (os.cpu_count() or args.threads):
        raise CLIUsageError(
            f"--threads {args.threads} is more than the {os.cpu_count()} CPUs of this machine"
        )
    config = BenchConfig(
        models=models,
        resolutions=resolutions,
        ratios=ratios,
        batch=args.batch,
        device=device,
        dtype=args.dtype or ("fp16" if on_gpu else "fp32"),
        repeats=pick("repeats", 10 if on_gpu else 3),
        warmup=pick("warmup", 3 if on_gpu else 1),
        variants=variants,
        shared={
            "use_rand": args.use_rand,
            "merge_attn": "attn" in merge,
            "merge_crossattn": "crossattn" in merge,
            "merge_mlp": "mlp" in merge,
            "seed": args.seed,
        },
        threads=args.threads,
        memory=not args.no_memory,
        flops=not args.no_flops and not args.compile,
        seed=args.seed,
        compile=args.compile,
        compile_mode=args.compile_mode,
        options=options,
        named=named,
        trajectory=args.trajectory,
    )
    if options:  # the flags together, on every model's settings, before any model is built
        for name in models:
            for ratio in ratios:
                replace_options(config.settings(get_model_spec(name), ratio), options)
    return config


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        check_out_dir(args.out)  # before the benchmark, not after it when the results are written
    except ValueError as error:
        print(f"tomediff bench: error: {error}", file=sys.stderr)
        return 2

    from rich.console import Console

    from tomediff.bench.report import build_table, footnotes, notes_text, write_outputs
    from tomediff.bench.runner import run_benchmark
    from tomediff.progress import ProgressBar

    # Piped or redirected output gets rich's default 80 columns, which truncates the table.
    console = Console(width=None if sys.stdout.isatty() else 140)
    err_console = Console(stderr=True)
    resolutions = ", ".join(map(str, config.resolutions))
    ratios = ", ".join(f"{r:g}" for r in config.ratios)
    if config.named:
        compared = "settings " + ", ".join(n.name for n in config.named)
    else:
        compared = f"ratio {ratios}, variants {', '.join(config.ordered_variants())}"
    err_console.print(
        f"[bold]tomediff bench[/bold]: {', '.join(config.models)} at {resolutions} px, {compared}, "
        f"{config.device} {config.dtype}, batch {config.batch}, {config.warmup} warm-up + "
        f"{config.repeats} timed calls each"
    )
    with ProgressBar(config.total_steps(), "model calls", transient=False) as bar:
        result = run_benchmark(config, bar.advance)
        bar.advance("done", 0)
    console.print(build_table(result))
    for line in [*notes_text(result.records), *footnotes(result.records)]:
        console.print(line, highlight=False)
    paths = write_outputs(result, args.out)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [r for r in result.records if r.status != "ok"]
    if failed:
        err_console.print(
            f"[yellow]{len(failed)} of {len(result.records)} configurations failed; see the table."
        )
    return 1 if len(failed) == len(result.records) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tomediff.cli.bench_cmd ...``: the subcommand alone (used by benchmarks/gpu_bench.sh)."""
    parser = OnelineParser(prog="tomediff")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    from tomediff.cli.main import run_parsed

    return run_parsed(args, "tomediff bench")


if __name__ == "__main__":
    sys.exit(main())
