"""``tomediff eval``: image quality under token merging (bundled model, or the paper's SD protocol).

Also runnable as ``python -m tomediff.eval`` and, sharded, ``accelerate launch -m tomediff.eval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tomediff.cli._args import (
    BUNDLED_MODEL_THREADS,
    BUNDLED_MODEL_THREADS_DEFAULT,
    MAX_RATIO,
    check_choices,
    check_out_dir,
    comma_list,
    fail,
    finite_float,
    non_negative_int,
    positive_int,
    positive_ratio,
    ratio_value,
    threads_value,
    torch_threads,
)
from tomediff.errors import TomediffError

__all__ = ["HELP", "NAME", "QUICK", "add_arguments", "register", "run", "validate"]

NAME = "eval"
HELP = "measure image quality under token merging"

VARIANT_NAMES = ("no_rand", "max_downsample_2", "all_sites")  # tomediff.eval.settings.VARIANTS; test-checked
# The bundled protocol's models (tomediff.eval.quality.BUNDLED_MODELS) and the files each needs in --assets
# (tomediff.eval.pipeline.DIT_FILES, tomediff.eval.classifier); test-checked, spelled out here because
# those modules import torch and a usage error must not.
BUNDLED_MODEL_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("demo_unet.safetensors", "demo_text_encoder.safetensors", "demo_model.json"),
    "dit": ("demo_dit_transformer.safetensors", "demo_dit_text_encoder.safetensors", "demo_dit.json"),
    "dit-hires": (
        "demo_dit_hires_transformer.safetensors",
        "demo_dit_hires_text_encoder.safetensors",
        "demo_dit_hires.json",
    ),
}
BUNDLED_DITS = ("dit", "dit-hires")
CLASSIFIER_FILES = ("classifier.safetensors", "fashion_mnist_test_features.npz")
# The DiT has one token grid and no levels, so max_downsample_2 merges exactly the blocks the plain row
# does (the same images): its default variants are the two that change something.
DIT_VARIANTS = ("no_rand", "all_sites")
DTYPES = ("float16", "bfloat16", "float32")

# --quick: the bundled protocol on a tenth of the images (100 per setting), unmerged and two ratios, no
# option variants: 8 batches against the full run's 180. Measured: 247 s with 1 thread on 2 CPU cores
# under load 5-7 (`tomediff eval --quick`). Explicit flags override it.
QUICK: dict[str, Any] = {"samples_per_class": 10, "ratios": [0.0, 0.5, 0.7], "variants": ["none"]}
QUICK_ABOUT = "8 batches where the full run has 180: 4 min measured on 2 busy CPU cores"
QUICK_OUT = Path("out/eval-quick")

# Finished batches are saved as they come, and a rerun with the same flags continues from them.
ON_INTERRUPT = "interrupted; run the same command again to resume"
LONG_RUN_HINT = "Ctrl-C stops it, and the same command resumes where it stopped"


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _resolution(text: str) -> int:
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(
            f"resolution {value} must be a multiple of 8 (the VAE downsamples by 8)"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # ToMeConfig's fields make the method flags; importing them imports torch, so only when registering.
    from tomediff.cli._method_args import add_method_arguments, add_setting_argument

    ratios = comma_list(ratio_value, f"ratios in [0, {MAX_RATIO}]")
    parser.add_argument(
        "--protocol",
        choices=("bundled", "paper"),
        default=None,
        help="'bundled': a shipped Fashion-MNIST model with classifier metrics; 'paper': SD 1.5, 512², "
        "ImageNet prompts, FID/CLIP. Default: bundled for a bundled --model (unet, dit, dit-hires) or no "
        "--model, else paper",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="which model, per protocol. Bundled: 'unet' (the SD-style UNet), 'dit' (the Flux-style "
        "transformer, docs/quality.md section 6; no tomesd, variants no_rand,all_sites) or 'dit-hires' (the "
        "same transformer at 64x64, 1,024 image tokens; section 7). Paper: a local "
        "diffusers folder or Hub id (a folder named unet or dit: write ./dit). Default: unet (bundled), "
        "stable-diffusion-v1-5/stable-diffusion-v1-5 (paper)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder, created if missing; rerunning into it resumes when every setting matches "
        f"and refuses otherwise. Default: out/eval (--quick: {QUICK_OUT}; --model dit: the same with -dit "
        "added; paper: out/eval-paper)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="bundled protocol: a first look in a few minutes - "
        f"{QUICK['samples_per_class']} images per class, ratios {','.join(f'{r:g}' for r in QUICK['ratios'])}"
        f", no option variants ({QUICK_ABOUT}). Explicit --samples-per-class/--ratios/--variants override "
        "it. Default: off (1,000 images per setting, five ratios, three variants)",
    )
    parser.add_argument(
        "--ratios",
        type=ratios,
        default=None,
        metavar="R,R,...",
        help=f"comma-separated merge ratios in [0, {MAX_RATIO}]. Default: 0,0.3,0.5,0.6,0.7 (paper: 0,0.5)",
    )
    parser.add_argument(
        "--variants",
        type=_words,
        default=None,
        metavar="NAME,...",
        help="bundled: option variants run at --variant-ratio, comma-separated from "
        f"{', '.join(VARIANT_NAMES)}, or 'none'. Default: all three (--model dit: {','.join(DIT_VARIANTS)})",
    )
    parser.add_argument(
        "--variant-ratio",
        type=positive_ratio,
        default=None,
        metavar="R",
        help="ratio of the option variants. Default: 0.5",
    )
    parser.add_argument(
        "--compare",
        type=_words,
        default=[],
        metavar="NAME",
        help="'tomesd': tomesd 0.1.3 at the same ratios (must be installed; UNets only, not --model dit). "
        "Default: none",
    )
    parser.add_argument(
        "--compare-ratios",
        type=ratios,
        default=None,
        metavar="R,R,...",
        help="ratios for --compare. Default: those of --ratios",
    )
    parser.add_argument(
        "--samples-per-class",
        type=positive_int,
        default=None,
        help="images per class per setting. Default: 100 (paper: 2 per ImageNet class)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per sampling call. Default: 50 (paper: 8)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps. Default: 20 (paper: 50)"
    )
    parser.add_argument(
        "--guidance", type=finite_float, default=None, help="CFG scale. Default: 3.0 (paper: 7.5)"
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="noise seed of the first image (image j: seed + j). Default: 0",
    )
    parser.add_argument(
        "--no-different-seed", action="store_true", help="bundled: skip the different-seed control row"
    )
    parser.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="bundled: folder with other trained weights (those of --model, the classifier and its "
        "reference statistics, in the shipped layout). Default: the shipped ones",
    )
    parser.add_argument(
        "--resolution", type=_resolution, default=512, help="paper: image size in pixels. Default: 512"
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="paper: use only the first N classes. Default: all 1000",
    )
    parser.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="paper: file with one class name a line. Default: torchvision's ImageNet list",
    )
    parser.add_argument(
        "--fid-ref", type=Path, default=None, help="paper: folder of real images for FID. Default: no FID"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="paper: weights and activations. Default: float16 on GPU, float32 on CPU",
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument(
        "--threads",
        type=threads_value,
        default=None,
        help=f"torch CPU threads per process. Bundled protocol: {BUNDLED_MODEL_THREADS_DEFAULT}. "
        "Paper protocol: torch's choice",
    )
    parser.add_argument(
        "--bootstrap",
        type=positive_int,
        default=1000,
        help="bootstrap resamples for the 95%% CIs. Default: 1000",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    add_setting_argument(parser, "the unmerged row and the different-seed control, then each setting")
    add_method_arguments(
        parser,
        "For the tomediff rows of the ratio sweep and the variants (with --setting, give them per setting).",
    )


def validate(args: argparse.Namespace) -> str:
    """Check the arguments against each other and the file system, before any work; returns the
    protocol. Raises CLIUsageError with a one-line message naming the flag."""
    from tomediff.cli._method_args import check_named, method_options
    from tomediff.errors import CLIUsageError

    bundled_model = args.model in BUNDLED_MODEL_FILES
    protocol = args.protocol or ("paper" if args.model and not bundled_model else "bundled")
    if protocol == "bundled" and args.model is not None and not bundled_model:
        raise CLIUsageError(
            f"--model {args.model}: the bundled protocol's models are {', '.join(BUNDLED_MODEL_FILES)}; "
            "for a diffusers model use --protocol paper"
        )
    if protocol == "paper" and bundled_model:
        raise CLIUsageError(
            f"--model {args.model} is a bundled model, which the paper protocol (SD 1.5 prompts, FID/CLIP) "
            f"cannot run; drop --protocol paper (or, for a diffusers folder named {args.model}, write "
            f"./{args.model})"
        )
    args.bundled_model = args.model if bundled_model else "unet"
    paper_only = ("num_classes", "class_names", "fid_ref", "dtype")
    bundled_only = ("variants", "assets", "quick")
    wrong = paper_only if protocol == "bundled" else bundled_only
    for name in wrong:
        if getattr(args, name) not in (None, False):
            flag = "--" + name.replace("_", "-")
            other = "paper" if protocol == "bundled" else "bundled"
            raise CLIUsageError(f"{flag} applies to --protocol {other} only, not {protocol}")
    if args.variants is not None:
        check_choices([v for v in args.variants if v != "none"], VARIANT_NAMES, "--variants")
    check_choices(args.compare, ("tomesd",), "--compare")
    if args.bundled_model in BUNDLED_DITS:
        _check_dit(args)
    if "tomesd" in args.compare:
        from tomediff.bench.variants import tomesd_version

        if tomesd_version() is None:
            raise CLIUsageError("--compare tomesd: tomesd is not installed (pip install tomesd==0.1.3)")
    if args.compare_ratios is not None and not args.compare:
        raise CLIUsageError("--compare-ratios needs --compare tomesd")
    if args.assets is not None:
        check_assets(args.assets, [*BUNDLED_MODEL_FILES[args.bundled_model], *CLASSIFIER_FILES])
    if args.class_names is not None and not args.class_names.is_file():
        raise CLIUsageError(f"--class-names {args.class_names} is not a file")
    if args.fid_ref is not None and not args.fid_ref.is_dir():
        raise CLIUsageError(f"--fid-ref {args.fid_ref} is not a directory")
    if args.model and protocol == "paper" and Path(args.model).exists() and not Path(args.model).is_dir():
        raise CLIUsageError(f"--model {args.model} is a file; pass a diffusers folder or a Hub id")
    args.named = check_named(
        args,
        {
            "--ratios": args.ratios is not None,
            "--variants": args.variants is not None,
            "--variant-ratio": args.variant_ratio is not None,
            "--compare": bool(args.compare),
            "--compare-ratios": args.compare_ratios is not None,
        },
    )
    tomesd_settings = [s.name for s in args.named if s.library == "tomesd"]
    if args.bundled_model in BUNDLED_DITS and tomesd_settings:
        raise CLIUsageError(
            f"--setting {', '.join(tomesd_settings)}: tomesd patches only UNets, not --model "
            f"{args.bundled_model}; drop it"
        )
    args.tome_options = method_options(args)
    if args.tome_options.get("level_ratios") is not None:
        given = [f for f, v in (("--ratios", args.ratios), ("--variants", args.variants)) if v is not None]
        if given or args.compare:
            flags = ", ".join(given + (["--compare"] if args.compare else []))
            raise CLIUsageError(
                f"--level-ratios gives each level its own ratio and replaces the ratio sweep; drop {flags} "
                "(or compare named settings: --setting levels:level_ratios=1:0.6/2:0.3 --setting merge)"
            )
        args.ratios, args.variants = [0.0, 0.5], ["none"]
    if args.quick:
        args.samples_per_class = args.samples_per_class or QUICK["samples_per_class"]
        if not args.named:  # named settings replace the ratio sweep and the variants
            args.ratios = args.ratios or QUICK["ratios"]
            args.variants = QUICK["variants"] if args.variants is None else args.variants
    if args.threads is None and protocol == "bundled":
        args.threads = BUNDLED_MODEL_THREADS
    from tomediff.eval.settings import build_settings

    try:  # every row's ToMeConfig, before any work
        build_settings(
            args.ratios or (0.0, 0.5),
            [v for v in (args.variants or []) if v != "none"],
            args.variant_ratio or 0.5,
            options=args.tome_options,
            named=args.named,
        )
    except TomediffError as error:
        flags = ", ".join("--" + n.replace("_", "-") for n in args.tome_options)
        raise CLIUsageError(f"{flags}: {error}") from None
    if args.out is None:
        args.out = Path("out/eval-paper" if protocol == "paper" else QUICK_OUT if args.quick else "out/eval")
        if protocol == "bundled" and args.bundled_model in BUNDLED_DITS:  # the UNet's would refuse a resume
            args.out = args.out.with_name(f"{args.out.name}-{args.bundled_model}")
    check_out_dir(args.out)
    return protocol


def _check_dit(args: argparse.Namespace) -> None:
    """The DiT's own refusals: tomesd has no DiT support, and max_downsample_2 is the plain row again."""
    from tomediff.errors import CLIUsageError

    if args.compare:
        raise CLIUsageError(
            f"--compare tomesd: tomesd patches only UNets, not --model {args.bundled_model}; drop --compare"
        )
    if args.variants is not None and "max_downsample_2" in args.variants:
        raise CLIUsageError(
            f"--variants max_downsample_2 gives --model {args.bundled_model} the plain row's images again "
            f"(one token grid, no levels); choose from {', '.join(DIT_VARIANTS)} or none"
        )


def check_assets(folder: Path, names: list[str]) -> None:
    """Raise CLIUsageError naming the files of ``names`` that ``folder`` lacks."""
    from tomediff.errors import CLIUsageError

    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CLIUsageError(f"--assets {folder} lacks {', '.join(missing)}; pass a folder of trained weights")


def run(args: argparse.Namespace) -> int:
    try:
        protocol = validate(args)
    except TomediffError as error:
        return fail("eval", error)
    with torch_threads(args.threads):
        return _run_valid(args, protocol)


def _run_valid(args: argparse.Namespace, protocol: str) -> int:
    if protocol == "paper":
        from tomediff.eval.paper import PaperOptions, run_paper_eval

        paper_options = PaperOptions(
            model=args.model or PaperOptions.model,
            out_dir=args.out,
            ratios=args.ratios or (0.0, 0.5),
            compare=args.compare,
            tome_options=args.tome_options,
            named=args.named,
            base_seed=args.seed,
            num_classes=args.num_classes,
            class_names_file=args.class_names,
            resolution=args.resolution,
            fid_ref=args.fid_ref,
            cpu=args.cpu,
            dtype=args.dtype,
            progress=not args.no_progress,
            long_run_hint=LONG_RUN_HINT,
        )
        for name, value in (
            ("images_per_class", args.samples_per_class),
            ("batch_size", args.batch_size),
            ("steps", args.steps),
            ("guidance", args.guidance),
        ):
            if value is not None:
                setattr(paper_options, name, value)
        try:
            run_paper_eval(paper_options)
        except TomediffError as error:
            return fail("eval", error)
        except RuntimeError as error:
            print(f"tomediff eval: error: {error}", file=sys.stderr)
            return 1
        return 0
    from tomediff.eval.quality import QualityOptions, run_quality_eval

    default_variants = DIT_VARIANTS if args.bundled_model in BUNDLED_DITS else QualityOptions.variants
    variants = args.variants if args.variants is not None else list(default_variants)
    dit = f" --model {args.bundled_model}" if args.bundled_model in BUNDLED_DITS else ""
    options = QualityOptions(
        model=args.bundled_model,
        out_dir=args.out,
        ratios=args.ratios or QualityOptions.ratios,
        variants=[v for v in variants if v != "none"],
        variant_ratio=args.variant_ratio or 0.5,
        compare=args.compare,
        tome_options=args.tome_options,
        named=args.named,
        base_seed=args.seed,
        different_seed=not args.no_different_seed,
        assets_dir=args.assets,
        cpu=args.cpu,
        progress=not args.no_progress,
        bootstrap=args.bootstrap,
        long_run_hint=""
        if args.quick
        else f"{LONG_RUN_HINT}; for a first look: tomediff eval{dit} --quick ({QUICK_ABOUT})",
    )
    options.compare_ratios = args.compare_ratios
    for name, value in (
        ("samples_per_class", args.samples_per_class),
        ("batch_size", args.batch_size),
        ("steps", args.steps),
        ("guidance", args.guidance),
    ):
        if value is not None:
            setattr(options, name, value)
    if args.quick and not args.no_progress:
        if options.named:
            rows = "settings " + ", ".join(n.name for n in options.named)
        else:
            ratios = ",".join(f"{r:g}" for r in options.ratios)
            rows = f"ratios {ratios}, variants {', '.join(options.variants) or 'none'}"
        per_class = f"{options.samples_per_class} images per class"
        print(f"tomediff eval --quick: {per_class}, {rows}, into {options.out_dir}", file=sys.stderr)
    try:
        run_quality_eval(options)
    except TomediffError as error:
        return fail("eval", error)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME,
        help=HELP,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run, on_interrupt=ON_INTERRUPT)
