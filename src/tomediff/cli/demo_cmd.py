"""``tomediff demo``: token merging on the bundled trained model, in about a minute on a laptop CPU.

Generates one image per Fashion-MNIST class with the same seeds unmerged and at a few merge ratios,
saves a labelled grid (rows = ratio, columns = class) and prints time per step, speedup, and fidelity
(PSNR/SSIM against the unmerged image, class accuracy under the bundled classifier) per ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "run_demo"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


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
) -> list[dict[str, Any]]:
    """Run the demo; returns one row per ratio (``ratio``, ``seconds_per_step``, ``speedup``, ``psnr``,
    ``ssim``, ``accuracy``) and writes ``grid.png`` and ``results.json`` to ``out_dir``."""
    import numpy as np
    import torch

    import tomediff
    from tomediff.eval.classifier import classify, load_classifier
    from tomediff.eval.metrics import psnr, ssim
    from tomediff.eval.pipeline import load_demo_model
    from tomediff.eval.report import save_grid, write_json

    if threads is not None:
        torch.set_num_threads(threads)
    pipe = load_demo_model(assets_dir)
    classifier = load_classifier(assets_dir) if assets_dir else load_classifier()
    num_classes = len(pipe.class_names)
    class_ids = [c for _ in range(per_class) for c in range(num_classes)]
    seeds = [seed + i for i in range(len(class_ids))]
    ratios = sorted({0.0, *ratios})
    bar = _Bar(len(ratios) * (repeats + 1) * steps, progress)
    rows, images_by_ratio = [], {}
    for ratio in ratios:
        handle = tomediff.apply_tome(pipe, ratio=ratio) if ratio > 0 else None
        timings = []
        try:
            # One untimed warm-up pass, then the fastest of `repeats` timed passes (least disturbed by
            # other work on the machine); every pass restarts the merge RNG so all give the same images.
            for attempt in range(repeats + 1):
                if handle is not None:
                    handle.reseed(0)
                started = time.perf_counter()
                images = pipe(
                    class_ids,
                    seeds,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    step_callback=lambda _i, r=ratio: bar.advance(f"ratio {r:g}"),
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
    bar.close()
    base = images_by_ratio[0.0]
    for row in rows:
        row["speedup"] = rows[0]["seconds_per_step"] / row["seconds_per_step"]
        merged = images_by_ratio[row["ratio"]]
        row["psnr"] = float(np.mean(psnr(merged, base))) if row["ratio"] > 0 else None
        row["ssim"] = float(np.mean(ssim(merged, base))) if row["ratio"] > 0 else None
    labels = [f"ratio {r:g}" + (" (unmerged)" if r == 0 else "") for r in ratios]
    grid = save_grid(
        [(label, images_by_ratio[r][:num_classes]) for label, r in zip(labels, ratios, strict=True)],
        pipe.class_names,
        out_dir / "grid.png",
    )
    write_json(
        out_dir / "results.json",
        {
            "steps": steps,
            "guidance": guidance,
            "seeds": seeds,
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        },
    )
    _print_table(rows, steps, len(class_ids), torch.get_num_threads())
    print(f"grid: {grid}")
    return rows


def _print_table(rows: list[dict[str, Any]], steps: int, batch: int, threads: int) -> None:
    title = f"tomediff demo — bundled Fashion-MNIST model, {batch} images, {steps} steps, {threads} threads"
    headers = ["ratio", "ms / step", "speedup", "PSNR vs r=0 (dB)", "SSIM vs r=0", "class acc. (%)"]
    cells = [
        [
            f"{r['ratio']:g}",
            f"{r['seconds_per_step'] * 1000:.1f}",
            f"{r['speedup']:.2f}x",
            "-" if r["psnr"] is None else f"{r['psnr']:.1f}",
            "-" if r["ssim"] is None else f"{r['ssim']:.3f}",
            f"{r['accuracy']:.0f}",
        ]
        for r in rows
    ]
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


class _Bar:
    def __init__(self, total: int, enabled: bool) -> None:
        self._progress = None
        if not enabled:
            return
        try:
            from rich.progress import Progress
        except ImportError:
            return
        self._progress = Progress(transient=True)
        self._progress.start()
        self._task = self._progress.add_task("demo", total=total)

    def advance(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=description)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def run(args: argparse.Namespace) -> int:
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
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="see what token merging does to images (bundled model, offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ratios", type=_floats, default=[0.3, 0.5, 0.7], help="merge ratios (0 always added)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=1, help="images per class (grid shows the first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per ratio (fastest is reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steady timings on a shared or busy machine)",
    )
    parser.add_argument("--assets", type=Path, default=None, help="folder with other trained weights")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)
