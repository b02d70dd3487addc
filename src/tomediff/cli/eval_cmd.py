"""``tomediff eval``: image quality under token merging (bundled model, or the paper's SD protocol).

Also runnable as ``python -m tomediff.eval`` and, sharded, ``accelerate launch -m tomediff.eval``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "register", "run"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        choices=("bundled", "paper"),
        default=None,
        help="'bundled' (default): the shipped Fashion-MNIST model with classifier metrics; "
        "'paper': SD 1.5, 512², ImageNet prompts, FID/CLIP (implied by --model)",
    )
    parser.add_argument("--model", default=None, help="paper protocol: local diffusers folder or Hub id")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default out/eval[-paper])")
    parser.add_argument(
        "--ratios",
        type=_floats,
        default=None,
        help="comma-separated merge ratios (default 0,0.3,0.5,0.6,0.7; paper: 0,0.5)",
    )
    parser.add_argument(
        "--variants",
        type=_words,
        default=None,
        help="bundled: option variants at --variant-ratio (default no_rand,max_downsample_2,"
        "all_sites; 'none' for none)",
    )
    parser.add_argument("--variant-ratio", type=float, default=0.5)
    parser.add_argument(
        "--compare", type=_words, default=[], help="'tomesd': tomesd 0.1.3 at the same ratios"
    )
    parser.add_argument(
        "--compare-ratios", type=_floats, default=None, help="ratios for --compare (default: --ratios)"
    )
    parser.add_argument(
        "--samples-per-class",
        type=int,
        default=None,
        help="bundled: images per class per setting (default 100); paper: per ImageNet class (default 2)",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; paper: 50)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default 3.0; paper: 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="first noise seed")
    parser.add_argument(
        "--no-different-seed", action="store_true", help="bundled: skip the different-seed row"
    )
    parser.add_argument(
        "--assets", type=Path, default=None, help="bundled: folder with other trained weights"
    )
    parser.add_argument("--resolution", type=int, default=512, help="paper: image size")
    parser.add_argument("--num-classes", type=int, default=None, help="paper: use only the first N classes")
    parser.add_argument(
        "--class-names", type=Path, default=None, help="paper: file with one class name a line"
    )
    parser.add_argument("--fid-ref", type=Path, default=None, help="paper: folder of real images for FID")
    parser.add_argument("--dtype", default=None, help="paper: float16/float32 (default fp16 on GPU)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    protocol = args.protocol or ("paper" if args.model else "bundled")
    if protocol == "paper":
        from tomediff.eval.paper import PaperOptions, run_paper_eval

        options = PaperOptions(
            model=args.model or PaperOptions.model,
            out_dir=args.out or Path("out/eval-paper"),
            ratios=args.ratios or (0.0, 0.5),
            compare=args.compare,
            base_seed=args.seed,
            num_classes=args.num_classes,
            class_names_file=args.class_names,
            resolution=args.resolution,
            fid_ref=args.fid_ref,
            cpu=args.cpu,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
        for name, value in (
            ("images_per_class", args.samples_per_class),
            ("batch_size", args.batch_size),
            ("steps", args.steps),
            ("guidance", args.guidance),
        ):
            if value is not None:
                setattr(options, name, value)
        try:
            run_paper_eval(options)
        except RuntimeError as error:
            print(f"error: {error}")
            return 1
        return 0
    from tomediff.eval.quality import QualityOptions, run_quality_eval

    variants = args.variants if args.variants is not None else list(QualityOptions.variants)
    options = QualityOptions(
        out_dir=args.out or Path("out/eval"),
        ratios=args.ratios or QualityOptions.ratios,
        variants=[v for v in variants if v != "none"],
        variant_ratio=args.variant_ratio,
        compare=args.compare,
        base_seed=args.seed,
        different_seed=not args.no_different_seed,
        assets_dir=args.assets,
        cpu=args.cpu,
        progress=not args.no_progress,
        bootstrap=args.bootstrap,
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
    run_quality_eval(options)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure image quality under token merging",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
