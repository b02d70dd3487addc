"""``tomediff visualize``: see which tokens merged, over the generated image (bundled model, offline).

Generates one image with the bundled Fashion-MNIST model under tomediff and draws, for the chosen
denoising steps and blocks, every group of tokens the merge plan averaged into one in its own colour
(tokens left alone stay clear), like the figures of the ToMe-for-SD paper. The PNG has a row per block
(its name and token grid above it): the generated image, then one overlay per step. The image is the
model's whole 32x32 canvas (the 28x28 image and its 2-pixel padding), so each token of the 16x16
top level covers 2x2 pixels. A few seconds on a CPU.

Examples:
  tomediff visualize --class Sneaker --seed 3
  tomediff visualize --step 0,10,19 --block all --out out/visualize/all.png
  tomediff visualize --max-downsample 2 --block all     (also the 8x8 level)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
from tomediff.errors import CLIUsageError, ConfigError, TomediffError

__all__ = ["HELP", "NAME", "register", "run"]

NAME = "visualize"
HELP = "see which tokens merged: groups coloured over the generated image, as a PNG (offline)"

DEFAULT_OUT = Path("out/visualize/merges.png")


def _check_png_path(path: Path) -> None:
    """``--out`` must name a .png file in a writable folder (created if missing); raises CLIUsageError."""
    if path.suffix.lower() != ".png":
        raise CLIUsageError(f"--out {path} must name a .png file (e.g. {DEFAULT_OUT})")
    if path.is_dir():
        raise CLIUsageError(
            f"--out {path} is a directory; name a .png file in it, e.g. {path / 'merges.png'}"
        )
    check_out_dir(path.parent, "--out's folder")


def _class_names(assets: Path | None) -> list[str]:
    from tomediff.eval.data import CLASS_NAMES

    if assets is None:
        return list(CLASS_NAMES)
    meta = json.loads((assets / "demo_model.json").read_text())
    return list(meta.get("text_encoder", {}).get("class_names", CLASS_NAMES))


def run(args: argparse.Namespace) -> int:
    from tomediff.eval.visualize import check_steps, resolve_class

    steps = [args.steps // 2] if args.step is None else args.step
    try:
        if args.assets is not None and not (args.assets / "demo_model.json").is_file():
            raise CLIUsageError(f"--assets {args.assets} lacks demo_model.json; pass a folder of weights")
        resolve_class(args.class_, _class_names(args.assets))
        check_steps(steps, args.steps)
        if args.half == "uncond" and args.guidance == 1.0:
            raise CLIUsageError(
                "--half uncond needs --guidance other than 1 (guidance 1 runs no unconditional half)"
            )
        _check_png_path(args.out)
    except TomediffError as error:
        return fail("visualize", _flagged(error))
    from tomediff.eval.visualize import save_png, visualize_merges

    started = time.perf_counter()
    options = {} if args.max_downsample is None else {"max_downsample": args.max_downsample}
    try:
        with torch_threads(args.threads):
            vis = visualize_merges(
                class_id=args.class_,
                seed=args.seed,
                num_steps=args.steps,
                step=steps,
                block=args.block,
                ratio=args.ratio,
                guidance_scale=args.guidance,
                half=args.half,
                assets_dir=args.assets,
                **options,
            )
    except ConfigError as error:  # a block that does not exist or merges nothing: known once patched
        return fail("visualize", _flagged(error))
    path = save_png(vis, args.out, scale=args.scale, alpha=args.alpha)
    for view in vis.views:
        tokens = view.height * view.width
        print(
            f"{view.block} ({view.height}x{view.width}) step {view.step}: {view.num_groups} groups hold "
            f"{view.tokens_in_groups} of {tokens} tokens, {tokens - view.tokens_in_groups} unmerged"
        )
    from PIL import Image

    with Image.open(path) as png:
        size = png.size
    print(f"wrote {path} ({size[0]}x{size[1]} px) in {time.perf_counter() - started:.1f} s")
    return 0


def _flagged(error: Exception) -> str:
    """Name the flag in the library's messages (``step 25 ...`` -> ``--step: step 25 ...``)."""
    text = str(error)
    prefixes = (
        ("step ", "--step"),
        ("unknown block ", "--block"),
        ("block ", "--block"),
        ("unknown class ", "--class"),
    )
    for word, flag in prefixes:
        if text.startswith(word):
            return f"{flag}: {text}"
    return text


def _block_list(text: str) -> list[str] | str:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected block names or indices, or 'all', got {text!r}")
    return "all" if parts == ["all"] else parts


def _alpha(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1], got {text}")
    return value


def _scale(text: str) -> int:
    value = positive_int(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"scale {value} is too large; use 1 to 64")
    return value


def _level(text: str) -> int:
    value = positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two (1, 2, 4), got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME,
        help=HELP,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--class",
        dest="class_",
        default="0",
        metavar="NAME|INDEX",
        help="the prompt: a Fashion-MNIST class name (e.g. Sneaker, 'Ankle boot') or index 0-9. "
        "Default: 0 (T-shirt/top)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="noise seed of the image. Default: 0"
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="denoising steps. Default: 20")
    parser.add_argument(
        "--step",
        type=comma_list(non_negative_int, "steps >= 0"),
        default=None,
        metavar="S,S,...",
        help="0-based step(s) to draw (0 = the noisiest), a column each. Default: the middle one, STEPS // 2 "
        "(10 with 20 steps)",
    )
    parser.add_argument(
        "--block",
        type=_block_list,
        default=None,
        metavar="NAME|INDEX,...",
        help="block(s) to draw, a row each: qualified names "
        "(down_blocks.0.attentions.0.transformer_blocks.0) or indices among the blocks that merge, or 'all'. "
        "Default: the first block that merges",
    )
    parser.add_argument(
        "--ratio",
        type=positive_ratio,
        default=0.5,
        metavar="R",
        help=f"merge ratio in (0, {MAX_RATIO}]. Default: 0.5",
    )
    parser.add_argument(
        "--max-downsample",
        type=_level,
        default=None,
        metavar="D",
        help="merge (and allow drawing) the levels downsampled at most D times (1 = 16x16 tokens, "
        "2 adds 8x8, 4 adds 4x4). Default: the highest-resolution level only",
    )
    parser.add_argument("--guidance", type=finite_float, default=3.0, help="CFG scale. Default: 3.0")
    parser.add_argument(
        "--half",
        choices=("cond", "uncond"),
        default="cond",
        help="which half of the CFG batch to draw: the prompt's (cond) or the empty prompt's. Default: cond",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"the PNG to write (its folder is created if missing). Default: {DEFAULT_OUT}",
    )
    parser.add_argument(
        "--scale",
        type=_scale,
        default=8,
        help="figure pixels per image pixel (32x32 image -> 256x256 tiles). Default: 8",
    )
    parser.add_argument(
        "--alpha", type=_alpha, default=0.65, help="opacity of the group colours, in (0, 1]. Default: 0.65"
    )
    parser.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="folder with other trained weights of the demo model. Default: the shipped ones",
    )
    parser.add_argument(
        "--threads",
        type=threads_value,
        default=BUNDLED_MODEL_THREADS,
        help=f"torch CPU threads. {BUNDLED_MODEL_THREADS_DEFAULT}",
    )
    parser.set_defaults(func=run)
