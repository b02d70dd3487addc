"""Outputs of demo and eval: labelled image grids, metric tables (JSON/CSV/markdown) and plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["markdown_table", "plot_metrics", "save_grid", "write_csv", "write_json"]


def save_grid(
    rows: Sequence[tuple[str, np.ndarray]], column_labels: Sequence[str], path: Path, scale: int = 3
) -> Path:
    """Save a labelled grid PNG: a row per ``(label, images (C, H, W[, 3]) uint8)``, a column per image."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no rows to draw")
    first = np.asarray(rows[0][1])
    cell_h, cell_w = first.shape[1] * scale, first.shape[2] * scale
    label_w, header_h, pad = 170, 28, 4
    cols = max(len(np.asarray(images)) for _, images in rows)
    canvas = Image.new(
        "RGB", (label_w + cols * (cell_w + pad), header_h + len(rows) * (cell_h + pad)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(column_labels[:cols]):
        draw.text((label_w + c * (cell_w + pad) + 2, 8), text[: max(4, cell_w // 6)], fill="black")
    for r, (label, images) in enumerate(rows):
        y = header_h + r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for c, image in enumerate(np.asarray(images)):
            tile = Image.fromarray(image).convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (cell_w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per row; nested ``{"value", "ci_low", "ci_high"}`` metrics become three columns."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    out[f"{key}_{sub}" if sub != "value" else key] = v
            else:
                out[key] = value
        flat.append(out)
    fields: list[str] = []
    for row in flat:
        fields += [k for k in row if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def _fmt(metric: Any, digits: int) -> str:
    if metric is None:
        return "–"
    if isinstance(metric, dict):
        v, lo, hi = metric["value"], metric["ci_low"], metric["ci_high"]
        if v is None or not np.isfinite(v):
            return "n/a"
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{metric:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, int]]) -> str:
    """``columns`` = (key, header, digits); ``name`` is always the first column."""
    header = "| setting | " + " | ".join(h for _, h, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [_fmt(row.get(k), d) if not isinstance(row.get(k), str) else row[k] for k, _, d in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(
    rows: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str]], path: Path
) -> Path | None:
    """One panel per metric vs ratio: a line per method (default options), variants as single markers,
    95% CIs as error bars. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    available = [(k, t) for k, t in metrics if any(isinstance(r.get(k), dict) for r in rows)]
    if not available:
        return None
    fig, axes = plt.subplots(1, len(available), figsize=(4.2 * len(available), 3.6), squeeze=False)
    baseline = next((r for r in rows if r["library"] == "none" and not r["seed_offset"]), None)
    for ax, (key, title) in zip(axes[0], available, strict=True):
        for method, marker in (("tomediff", "o"), ("tomesd", "s")):
            line = [
                r
                for r in rows
                if r["library"] == method and r["variant"] == "default" and isinstance(r.get(key), dict)
            ]
            if baseline is not None and isinstance(baseline.get(key), dict):
                line = [baseline, *line]
            if len(line) < 2 and method == "tomesd":
                continue
            xs = [r["ratio"] for r in line]
            ys = [r[key]["value"] for r in line]
            err = [
                [max(0.0, r[key]["value"] - r[key]["ci_low"]) for r in line],
                [max(0.0, r[key]["ci_high"] - r[key]["value"]) for r in line],
            ]
            ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=method)
        for r in rows:
            if r["library"] == "tomediff" and r["variant"] != "default" and isinstance(r.get(key), dict):
                ax.errorbar(
                    [r["ratio"]],
                    [r[key]["value"]],
                    yerr=[
                        [max(0.0, r[key]["value"] - r[key]["ci_low"])],
                        [max(0.0, r[key]["ci_high"] - r[key]["value"])],
                    ],
                    marker="x",
                    capsize=3,
                    linestyle="none",
                    label=r["variant"],
                )
            if r["library"] == "real" and isinstance(r.get(key), dict):
                ax.axhline(r[key]["value"], color="green", linestyle="--", label="real images")
            if r["seed_offset"] and isinstance(r.get(key), dict):
                ax.axhline(r[key]["value"], color="grey", linestyle=":", label="different seed")
        ax.set_xlabel("merge ratio")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
