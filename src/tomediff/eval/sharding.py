"""Resumable, sharded generation: batches split across processes with Hugging Face Accelerate.

Launch with ``accelerate launch --num_processes N -m tomediff.eval ...`` on GPUs (and across nodes as
Accelerate supports); on CPUs use ``accelerate launch --multi_gpu --num_processes N -m tomediff.eval --cpu``
(``--multi_gpu`` is what makes Accelerate start N processes with torchrun; they talk over gloo).
Batch ``k`` runs on process ``k % N``; every sample's noise depends only on its seed
and every batch's merge partitions only on ``(setting, k)``, so the union over processes equals a
single-process run. Each batch is saved as ``OUT/images/<setting>/batch_<k>.npz`` and skipped when
already there (resume); ``OUT/images/<setting>/settings.json`` records everything that made those
images (model, steps, guidance, sampler, seeds and batching, method settings, device, library
versions), and a rerun whose settings differ in any of these is refused before any work
(:class:`~tomediff.errors.ResumeMismatchError`), so finished results are never mixed with or overwritten
by others. Finished batches are gathered on the main process, which writes any it lacks
(nodes without a shared filesystem) and computes the metrics.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from tomediff.errors import ResumeMismatchError
from tomediff.eval.settings import METHOD_FIELDS, SETTING_FIELDS, Setting
from tomediff.progress import ProgressBar

__all__ = [
    "LONG_RUN_S",
    "SETTINGS_FILE",
    "Batch",
    "DistContext",
    "Samples",
    "check_resume",
    "estimate_text",
    "generate_settings",
    "load_samples",
    "plan_batches",
    "setting_key",
]

# Next to a setting's batches: the settings that made them (what resuming must match).
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class Batch:
    """Which samples one generation call makes: ``class_ids[i]`` with noise seed ``seeds[i]``."""

    index: int
    class_ids: tuple[int, ...]
    seeds: tuple[int, ...]


def plan_batches(
    samples_per_class: int, num_classes: int, batch_size: int, base_seed: int = 0
) -> list[Batch]:
    """Sample ``j`` is class ``j % num_classes`` with seed ``base_seed + j``; consecutive samples batch.

    The same plan is used for every setting, so settings differ only in merging (paired comparison).
    """
    total = samples_per_class * num_classes
    batches = []
    for index, start in enumerate(range(0, total, batch_size)):
        js = range(start, min(start + batch_size, total))
        batches.append(Batch(index, tuple(j % num_classes for j in js), tuple(base_seed + j for j in js)))
    return batches


@dataclass
class Samples:
    """All images of one setting, ordered like the plan."""

    images: np.ndarray  # uint8 (N, H, W) or (N, H, W, 3)
    class_ids: np.ndarray  # (N,)
    seeds: np.ndarray  # (N,) noise seeds actually used (offset for the different-seed control)
    seconds_per_step: np.ndarray  # (num_batches,) wall time of one denoising step per batch


class DistContext:
    """Process rank/count and device from Accelerate when it is installed and launched; else 1 process."""

    def __init__(self, cpu: bool = False) -> None:
        self.state: Any = None
        try:
            from accelerate import PartialState

            self.state = PartialState(cpu=cpu)
        except ImportError:
            self.state = None
        if self.state is not None:
            self.rank, self.world, self.device = (
                self.state.process_index,
                self.state.num_processes,
                self.state.device,
            )
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def gather(self, items: list[Any]) -> list[Any]:
        """Concatenate every process's ``items`` (on all processes)."""
        if self.state is None or self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def _batch_path(out_dir: Path, setting: Setting, batch: Batch) -> Path:
    return out_dir / "images" / setting.slug / f"batch_{batch.index:05d}.npz"


def _read_batch(path: Path, seeds: Sequence[int]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as data:
            payload = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None  # a partial write from a killed run: regenerate it
    if list(payload["seeds"]) != list(seeds):
        return None
    return payload


def _write_batch(path: Path, payload: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    # Any: numpy's stub would take a "allow_pickle" key of **payload for its bool keyword.
    np.savez(tmp, **cast(dict[str, Any], payload))
    tmp.replace(path)  # atomic, so an interrupted run never leaves a truncated batch behind


SampleFn = Callable[[Sequence[int], Sequence[int]], np.ndarray]


def setting_key(setting: Setting, run_key: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that decides a setting's images: the run's ``run_key`` (model, sampler, seeds,
    device, versions) plus the setting's own fields, as JSON values."""
    # Fields added after a run's record was written are left out while at their defaults, so the
    # images of an older run with the same settings stay resumable.
    later = {"label": "", "seed": 0, **{f.name: f.default for f in SETTING_FIELDS if f.name in METHOD_FIELDS}}
    values = {
        k: v for k, v in setting.as_dict().items() if k != "name" and not (k in later and v == later[k])
    }
    key = {**run_key, **{f"setting.{k}": v for k, v in values.items()}}
    if setting.library == "tomesd":
        from tomediff.bench.variants import tomesd_version

        key["tomesd"] = tomesd_version()
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _setting_dir(out_dir: Path, setting: Setting) -> Path:
    return out_dir / "images" / setting.slug


def check_resume(out_dir: Path, settings: Sequence[Setting], run_key: Mapping[str, Any]) -> None:
    """Raise :class:`ResumeMismatchError` if ``out_dir`` holds images of one of ``settings`` that were
    made with anything different (or by a run that recorded nothing); a no-op for a fresh ``out_dir``."""
    for setting in settings:
        folder = _setting_dir(out_dir, setting)
        record = folder / SETTINGS_FILE
        finished = any(folder.glob("batch_*.npz"))
        if not finished:
            continue  # nothing to reuse or to protect; the record is (re)written before generating
        if not record.is_file():
            if finished:
                raise ResumeMismatchError(
                    f"--out {out_dir} holds finished '{setting.name}' images with no record of the settings "
                    f"that made them ({record} is missing: an older tomediff made them), so they cannot be "
                    "reused safely; pass a new --out (or delete that folder to regenerate it)"
                )
            continue
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise ResumeMismatchError(f"cannot read {record} ({error}); pass a new --out") from None
        expected = setting_key(setting, run_key)
        changed = [k for k in sorted(set(recorded) | set(expected)) if recorded.get(k) != expected.get(k)]
        if changed:
            diffs = ", ".join(f"{k}={recorded.get(k)!r} (now {expected.get(k)!r})" for k in changed)
            raise ResumeMismatchError(
                f"--out {out_dir} holds '{setting.name}' images made with other settings: {diffs}; "
                "pass a new --out to keep both (finished results are never overwritten), or rerun with "
                "the same settings to resume"
            )


def _write_setting_key(folder: Path, key: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SETTINGS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    tmp.replace(folder / SETTINGS_FILE)


def generate_settings(
    settings: Sequence[Setting],
    batches: Sequence[Batch],
    unet: torch.nn.Module,
    sample_fn: SampleFn,
    num_steps: int,
    out_dir: Path,
    dist: DistContext,
    progress: bool = True,
    run_key: Mapping[str, Any] | None = None,
    long_run_hint: str = "",
    pipeline: Any = None,
) -> dict[str, Samples] | None:
    """Generate every (setting, batch) not already on disk; returns the samples on the main process.

    ``sample_fn(class_ids, seeds) -> uint8 images`` runs one batch with whatever patch is on ``unet``
    (patched through ``pipeline``, the one ``sample_fn`` calls, when given: see :meth:`Setting.apply`).
    ``run_key`` describes everything besides the setting that changes an image (see
    :func:`check_resume`); batches on disk are reused only when it and the setting match exactly.
    With ``progress``, the main process says after its first batch about how long the rest will take,
    adding ``long_run_hint`` when that is more than :data:`LONG_RUN_S`.
    """
    run_key = dict(run_key or {})
    check_resume(out_dir, settings, run_key)
    for setting in settings:
        _write_setting_key(_setting_dir(out_dir, setting), setting_key(setting, run_key))
    mine = [b for b in batches if b.index % dist.world == dist.rank]
    todo = [
        (s, b)
        for s in settings
        for b in mine
        if _read_batch(_batch_path(out_dir, s, b), _seeds(s, b)) is None
    ]
    made: list[tuple[str, int, dict[str, np.ndarray]]] = []
    announce = progress and dist.is_main
    with ProgressBar(len(todo), "batches generated", enabled=announce) as bar:
        for setting in settings:
            pending = [b for s, b in todo if s == setting]
            if not pending:
                continue
            patch = setting.apply(unet, pipeline)
            try:
                for batch in pending:
                    patch.reseed(1_000_003 * batch.index + 17)
                    seeds = _seeds(setting, batch)
                    started = time.perf_counter()
                    images = sample_fn(batch.class_ids, seeds)
                    elapsed = time.perf_counter() - started
                    payload = {
                        "images": images,
                        "class_ids": np.array(batch.class_ids),
                        "seeds": np.array(seeds),
                        "seconds_per_step": np.array(elapsed / num_steps),
                    }
                    _write_batch(_batch_path(out_dir, setting, batch), payload)
                    made.append((setting.slug, batch.index, payload))
                    bar.advance(f"{setting.name}: batch {batch.index + 1} of {len(batches)}")
                    if announce and len(made) == 1 and len(todo) > 1:
                        print(estimate_text(elapsed, len(todo) - 1, long_run_hint), file=sys.stderr)
            finally:
                patch.remove()
    # Gather what every process generated, so the main process has all of it even without a shared disk.
    gathered = dist.gather(made)
    if not dist.is_main:
        dist.barrier()
        return None
    for slug, index, payload in gathered:
        setting = next(s for s in settings if s.slug == slug)
        path = _batch_path(out_dir, setting, batches[index])
        if _read_batch(path, list(payload["seeds"])) is None:
            _write_batch(path, payload)
    result = {s.slug: load_samples(out_dir, s, batches) for s in settings}
    dist.barrier()
    return result


LONG_RUN_S = 600  # a run expected to take longer than this gets the caller's hint (e.g. a quicker preset)


def estimate_text(first_batch_s: float, batches_left: int, long_run_hint: str = "") -> str:
    """What a run says after its first batch: about how long the other ``batches_left`` will take."""
    left = first_batch_s * batches_left
    text = (
        f"first batch took {_duration(first_batch_s)}: the other {batches_left} should take about "
        f"{_duration(left)} more"
    )
    return text + (f"; {long_run_hint}" if long_run_hint and left > LONG_RUN_S else "")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def _seeds(setting: Setting, batch: Batch) -> list[int]:
    return [s + setting.seed_offset for s in batch.seeds]


def load_samples(out_dir: Path, setting: Setting, batches: Sequence[Batch]) -> Samples:
    """Read a setting's batches back in plan order (raises if one is missing)."""
    parts = []
    for batch in batches:
        payload = _read_batch(_batch_path(out_dir, setting, batch), _seeds(setting, batch))
        if payload is None:
            raise FileNotFoundError(f"missing {_batch_path(out_dir, setting, batch)}")
        parts.append(payload)
    return Samples(
        images=np.concatenate([p["images"] for p in parts]),
        class_ids=np.concatenate([p["class_ids"] for p in parts]),
        seeds=np.concatenate([p["seeds"] for p in parts]),
        seconds_per_step=np.array([float(p["seconds_per_step"]) for p in parts]),
    )
