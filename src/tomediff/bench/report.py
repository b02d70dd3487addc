"""Outputs of a benchmark run: terminal table, JSON, CSV and a speedup plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tomediff.bench.runner import MIN_AVAILABLE_SAVING, BenchResult, Record
from tomediff.bench.variants import ALL_VARIANTS

__all__ = [
    "CSV_FIELDS",
    "build_table",
    "footnotes",
    "notes_text",
    "plot_speedup",
    "write_csv",
    "write_json",
    "write_outputs",
]

CSV_FIELDS: tuple[str, ...] = (
    "model",
    "resolution",
    "tokens",
    "variant",
    "ratio",
    "batch",
    "device",
    "dtype",
    "status",
    "latency_median_s",
    "latency_min_s",
    "latencies_s",
    "speedup",
    "saving_realised",
    "flops",
    "flops_vs_baseline",
    "peak_mem_bytes",
    "model_mem_bytes",
    "mem_vs_baseline",
    "max_rel_diff_vs_baseline",
    "max_rel_diff_vs_tomesd",
    "setting",
    "options",
    "key",
    "reference",
    "calls_per_sample",
    "note",
    "error",
)


def _sort_key(record: Record) -> tuple[Any, ...]:
    if record.setting is not None or record.variant == "baseline":  # named settings: in run order
        return (record.model, record.resolution, 0.0, 0)
    return (record.model, record.resolution, record.ratio or 0.0, ALL_VARIANTS.index(record.variant))


def _setting(record: Record) -> str:
    if record.setting is None:
        return _fmt(record.ratio, "g")
    return record.setting if record.variant != "ideal" else f"ideal ({record.setting})"


def _saving(record: Record) -> str:
    if record.saving_realised is not None:
        return f"{100 * record.saving_realised:.0f}%"
    if record.variant != "baseline" and record.key is not None and record.reference is None:
        return "n/a: no ideal"
    return "-"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def build_table(result: BenchResult) -> Any:
    """A ``rich.table.Table`` with one row per record (baseline once per model and resolution)."""
    from rich.table import Table

    env = result.environment
    title = (
        f"tomediff bench — {env.get('gpu') or env.get('cpu')} ({env['device']}, {env['torch_threads']} "
        f"threads), torch {env['torch']}, diffusers {env['diffusers']}, tomesd {env['tomesd'] or 'n/a'}"
    )
    if result.config.compile:
        title += f", every variant torch.compile'd (mode {result.config.compile_mode})"
    table = Table(
        title=title,
        title_justify="left",
        caption="saving = saving realised (T_base - T) / (T_base - T_ideal), against the ideal at the same "
        "blocks, ratios and schedule (none for downsampling: it keeps every query, there is no merge to make "
        "free); peak MiB = peak memory of one call above the loaded model; Δ tomesd = max |out - out_tomesd| "
        "/ max |out_tomesd|; calls = calls per timed sample (a trajectory of evenly spaced timesteps for a "
        "schedule or reuse_steps; the mean per call is shown)",
        caption_justify="left",
    )
    table.add_column("model", justify="left")
    table.add_column("res", justify="right")
    setting = "setting" if any(r.setting for r in result.records) else "ratio"
    table.add_column(setting, justify="left", overflow="fold", min_width=10)
    for name, justify in (
        ("variant", "left"),
        ("calls", "right"),
        ("median s", "right"),
        ("min s", "right"),
        ("speedup", "right"),
        ("saving", "right"),
        ("GFLOPs", "right"),
        ("peak MiB", "right"),
        ("mem/base", "right"),
        ("Δ tomesd", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    notes = False  # notes follow the table (notes_text): a column would squeeze the others
    for record in sorted(result.records, key=_sort_key):
        if record.status != "ok":
            cells = ["-"] * 7 + [f"[red]{record.error or record.status}[/red]"] + ([""] if notes else [])
            table.add_row(
                record.model,
                str(record.resolution),
                _setting(record),
                record.variant,
                str(record.calls_per_sample),
                *cells,
            )
            continue
        table.add_row(
            record.model,
            str(record.resolution),
            _setting(record),
            record.variant,
            str(record.calls_per_sample),
            _fmt(record.latency_median_s, ".3f"),
            _fmt(record.latency_min_s, ".3f"),
            _fmt(record.speedup, ".2f", "x"),
            _saving(record),
            _fmt(None if record.flops is None else record.flops / 1e9, ",.1f"),
            _mib(record.peak_mem_bytes),
            _fmt(record.mem_vs_baseline, ".2f"),
            _fmt(record.max_rel_diff_vs_tomesd, ".1e"),
            *([record.note or ""] if notes else []),
        )
    return table


def notes_text(records: Sequence[Record]) -> list[str]:
    """One line per (model, resolution, row) that needs a note (trajectory, ideal shared, no ideal)."""
    return [
        f"{r.model} {r.resolution}² {_setting(r)} {r.variant}: {r.note}"
        for r in sorted(records, key=_sort_key)
        if r.note
    ]


# Below this share of the call saved by the ideal, a slowdown is explained by the image being too small.
SMALL_SAVING = 0.10


def footnotes(records: Sequence[Record]) -> list[str]:
    """Lines after the notes: why a merged row is slower than the baseline, and what each column's "-"
    means in this run (only for what the table shows)."""
    return [*_slowdown_lines(records), *_dash_lines(records)]


def _ideal_of(record: Record, records: Sequence[Record]) -> Record | None:
    """The ideal row ``record``'s saving is measured against (as the runner pairs them), if any."""
    for other in records:
        if (other.model, other.resolution, other.variant) != (record.model, record.resolution, "ideal"):
            continue
        if record.key is not None and other.key == record.reference:
            return other
        if record.key is None and other.setting is None and other.ratio == record.ratio:
            return other
    return None


def _slowdown_lines(records: Sequence[Record]) -> list[str]:
    """A line for each merged row slower than the baseline, or gaining little because the image is small."""
    own_cost = "the merge's own work (matching, gathering, unmerging)"
    lines = []
    for record in sorted(records, key=_sort_key):
        if record.variant in ("baseline", "ideal") or record.speedup is None:
            continue
        ideal = _ideal_of(record, records)
        ideal_speedup = None if ideal is None else ideal.speedup
        small = ideal_speedup is not None and ideal_speedup < 1 + SMALL_SAVING
        slower = record.speedup < 1
        if not (slower or small):
            continue
        where = f"{record.model} {record.resolution}² {_setting(record)} {record.variant}"
        verdict = "is slower than the baseline" if slower else "gains little"
        text = f"{where} {verdict} ({record.speedup:.2f}x): "
        if small:
            text += (
                f"at {record.tokens:,} tokens the attention that merging removes is a small part of the call "
                f"(even a zero-cost merge of the same tokens, the ideal, is only {ideal_speedup:.2f}x), so "
                + (f"{own_cost} costs more than it saves" if slower else "there is little to gain")
                + ". Merging pays off with more tokens: larger images (e.g. --resolution "
                f"{2 * record.resolution})."
            )
        elif ideal_speedup is not None:
            text += (
                f"a zero-cost merge of the same tokens (the ideal) would be {ideal_speedup:.2f}x, but "
                f"{own_cost} costs more than that saves here."
            )
        else:
            text += f"{own_cost} costs more than it saves here."
        lines.append(text)
    return lines


def _dash_lines(records: Sequence[Record]) -> list[str]:
    ok = [r for r in records if r.status == "ok"]
    reasons = []
    if any(r.variant == "baseline" for r in records):
        column = "setting" if any(r.setting for r in records) else "ratio"  # as build_table names it
        reasons.append(f"{column}: the baseline merges nothing")
    if any(_saving(r) == "-" for r in ok):
        reasons.append(
            "saving: the baseline itself, or a row whose ideal saves under "
            f"{MIN_AVAILABLE_SAVING:.0%} of the call (a share of almost nothing is only noise)"
        )
    if any(r.flops is None for r in ok):
        reasons.append("GFLOPs: not counted (--no-flops or --compile)")
    if any(r.peak_mem_bytes is None for r in ok):
        reasons.append("peak MiB, mem/base: not measured (--no-memory)")
    if any(r.max_rel_diff_vs_tomesd is None for r in ok):
        reasons.append(
            "Δ tomesd: only on tomediff rows run beside tomesd (--compare tomesd) with the same computation "
            "(no --use-rand, no method options)"
        )
    if len(ok) < len(records):
        reasons.append("a failed row: its error is in the table")
    return ['"-" in the table: ' + "; ".join(reasons) + "."] if reasons else []


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def write_csv(records: Sequence[Record], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for record in sorted(records, key=_sort_key):
            row = record.to_dict()
            row["latencies_s"] = ";".join(f"{t:.6f}" for t in record.latencies_s)
            writer.writerow({name: "" if row[name] is None else row[name] for name in CSV_FIELDS})


def plot_speedup(records: Sequence[Record], path: Path) -> None:
    """Speedup over the baseline vs resolution: one panel per model, one line per variant and ratio."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    styles = {"tomediff": "-", "tomesd": "--", "ideal": ":"}
    for ax, model in zip(axes[0], models, strict=True):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in records:
            if r.model != model or r.variant == "baseline" or r.speedup is None:
                continue
            if r.setting is not None:
                name = r.setting if r.variant != "ideal" else f"ideal ({r.setting})"
            elif r.ratio is not None:
                name = f"{r.variant} r={r.ratio:g}"
            else:
                continue
            lines.setdefault((r.variant, name), []).append((r.resolution, r.speedup))
        for (variant, name), points in lines.items():
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                styles.get(variant, "-"),
                marker="o",
                label=name,
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(model)
        ax.set_xlabel("resolution (px, square)")
        ax.set_ylabel("speedup vs baseline")
        resolutions = sorted({r.resolution for r in records if r.model == model})
        ax.set_xticks(resolutions)
        if lines:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.csv`` and ``speedup.png`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "bench.json",
        "csv": out_dir / "bench.csv",
        "plot": out_dir / "speedup.png",
    }
    write_json(result, paths["json"])
    write_csv(result.records, paths["csv"])
    plot_speedup(result.records, paths["plot"])
    return paths
