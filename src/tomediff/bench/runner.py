"""The benchmark loop: build each model once, interleave the variants' timed calls, collect records."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from tomediff.bench.measure import (
    count_flops,
    cpu_peak_in_subprocess,
    cuda_peak_bytes,
    forward,
    timed_forward,
)
from tomediff.bench.models import ModelSpec, build_model, get_model_spec, make_inputs, parameter_count
from tomediff.bench.variants import ALL_VARIANTS, MergeSettings, Variant, make_variant, tomesd_version

__all__ = ["DTYPES", "BenchConfig", "BenchResult", "Record", "environment", "run_benchmark"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Saving realised is reported only when the ideal is at least this much faster than the baseline.
MIN_AVAILABLE_SAVING = 0.02

# Progress callback: (description of the current step, number of steps just completed).
ProgressFn = Callable[[str, int], None]


@dataclass
class BenchConfig:
    """Everything one run measures. ``variants`` always includes baseline, tomediff and ideal."""

    models: Sequence[str] = ("sd15",)
    resolutions: Sequence[int] = (512,)
    ratios: Sequence[float] = (0.5,)
    batch: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    repeats: int = 3
    warmup: int = 1
    variants: Sequence[str] = ("baseline", "tomediff", "ideal")
    use_rand: bool = False
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    threads: int | None = None
    memory: bool = True
    flops: bool = True
    seed: int = 0
    compile: bool = False
    compile_mode: str = "default"

    def settings(self, spec: ModelSpec, ratio: float) -> MergeSettings:
        return MergeSettings(
            ratio=ratio,
            max_downsample=spec.max_downsample,
            use_rand=self.use_rand,
            merge_attn=self.merge_attn,
            merge_crossattn=self.merge_crossattn,
            merge_mlp=self.merge_mlp,
            seed=self.seed,
        )

    def ordered_variants(self) -> list[str]:
        return [v for v in ALL_VARIANTS if v in self.variants]

    def total_steps(self) -> int:
        """Progress units: one per model call (warm-up, timed, memory)."""
        per_res = 1 + (len(self.ordered_variants()) - 1) * len(self.ratios)
        calls = self.warmup + self.repeats + (1 if self.memory else 0)
        return len(self.models) * len(self.resolutions) * per_res * calls


@dataclass
class Record:
    """One (model, resolution, variant, ratio) result row. Times in seconds, memory in bytes."""

    model: str
    resolution: int
    variant: str
    ratio: float | None
    batch: int
    device: str
    dtype: str
    tokens: int
    status: str = "ok"
    error: str | None = None
    latency_median_s: float | None = None
    latency_min_s: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    speedup: float | None = None
    saving_realised: float | None = None
    flops: int | None = None
    flops_vs_baseline: float | None = None
    peak_mem_bytes: int | None = None
    model_mem_bytes: int | None = None
    mem_vs_baseline: float | None = None
    max_rel_diff_vs_baseline: float | None = None
    max_rel_diff_vs_tomesd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict[str, Any]
    records: list[Record]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "environment": self.environment,
            "records": [r.to_dict() for r in self.records],
        }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the marketing name.
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and library versions, recorded with every result."""
    import tomediff

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "tomesd": tomesd_version(),
        "tomediff": tomediff.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _tokens(spec: ModelSpec, resolution: int) -> int:
    """Image tokens at the level where merging happens."""
    side = resolution // 8
    if spec.kind == "pixart":
        side //= int(spec.config["patch_size"])
    for _ in range(spec.max_downsample.bit_length() - 1):
        side = (side + 1) // 2
    return side * side


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().clamp_min(1e-12)
    return float((out - ref).abs().max() / scale)


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile(model)`` for variants that patch the model after it is compiled.

    Dynamo does not guard on module hooks by default (``skip_nnmodule_hook_guards``), so a graph traced
    for one variant would silently run for all: turn the hook guards on, and leave room in dynamo's
    cache for every variant, since each patch (and each resolution) is its own set of guards."""
    config = torch._dynamo.config
    config.skip_nnmodule_hook_guards = False
    for name in (
        "cache_size_limit",
        "recompile_limit",
        "accumulated_cache_size_limit",
        "accumulated_recompile_limit",
    ):
        if hasattr(config, name):
            setattr(config, name, max(256, getattr(config, name)))
    return torch.compile(model, mode=None if mode == "default" else mode)


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


class _Runner:
    def __init__(self, config: BenchConfig, progress: ProgressFn | None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.progress = progress or (lambda description, advance: None)

    def variants_for(self, spec: ModelSpec) -> list[Variant]:
        names = self.config.ordered_variants()
        variants = [make_variant("baseline", None)] if "baseline" in names else []
        for ratio in self.config.ratios:
            settings = self.config.settings(spec, ratio)
            variants += [make_variant(name, settings) for name in names if name != "baseline"]
        return variants

    def run(self) -> list[Record]:
        records: list[Record] = []
        for name in self.config.models:
            records += self.run_model(get_model_spec(name))
        return records

    def run_model(self, spec: ModelSpec) -> list[Record]:
        cfg = self.config
        table: dict[tuple[int, str], Record] = {}
        for resolution in cfg.resolutions:
            for variant in self.variants_for(spec):
                table[resolution, variant.key] = Record(
                    model=spec.name,
                    resolution=resolution,
                    variant=variant.name,
                    ratio=variant.ratio,
                    batch=cfg.batch,
                    device=str(self.device),
                    dtype=cfg.dtype,
                    tokens=_tokens(spec, resolution),
                )
        self.progress(f"{spec.name}: building the model", 0)
        try:
            model = build_model(spec, self.device, self.dtype, seed=cfg.seed)
        except (RuntimeError, MemoryError) as error:  # typically out of memory
            for record in table.values():
                record.status, record.error = "error", f"building the model: {_error_text(error)}"
            self.progress(spec.name, cfg.total_steps() // max(1, len(cfg.models)))
            return list(table.values())
        caller = compiled(model, cfg.compile_mode) if cfg.compile else model
        for resolution in cfg.resolutions:
            self.time_resolution(spec, model, resolution, table, caller)
        if cfg.memory and self.device.type == "cpu":
            # Free the timing model first: the worker builds its own copy, and two SDXL copies in
            # fp32 (10 GB each) may not fit.
            del model
            gc.collect()
            self.cpu_memory(spec, table)
        _derive(list(table.values()))
        return list(table.values())

    def time_resolution(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        resolution: int,
        table: dict[tuple[int, str], Record],
        caller: torch.nn.Module | None = None,
    ) -> None:
        """Time every variant at one resolution. Variants patch ``model``; calls go through ``caller``
        (the same model, or its ``torch.compile`` wrapper, which then compiles once per variant)."""
        cfg = self.config
        caller = model if caller is None else caller
        inputs = make_inputs(spec, cfg.batch, resolution, self.device, self.dtype, seed=1)
        variants = self.variants_for(spec)
        outputs: dict[str, torch.Tensor] = {}
        alive: list[Variant] = []
        label = f"{spec.name} {resolution}²"
        # Warm-up, one variant after another; the first call of each also counts its FLOPs and
        # keeps its output for the equivalence check.
        for variant in variants:
            record = table[resolution, variant.key]
            try:
                variant.apply(model)
                try:
                    for i in range(cfg.warmup):
                        self.progress(f"{label} {variant.key}: warm-up", 0)
                        if i == 0 and cfg.flops:
                            record.flops, out = count_flops(caller, inputs)
                        else:
                            out = forward(caller, inputs)
                        if i == 0:
                            outputs[variant.key] = out.detach().float().cpu()
                        del out
                        self.progress(f"{label} {variant.key}: warm-up", 1)
                finally:
                    variant.remove(model)
            except Exception as error:  # recorded, and the other variants still run
                record.status, record.error = "error", _error_text(error)
                self.progress(label, cfg.warmup)
                continue
            alive.append(variant)
        if cfg.warmup == 0 and cfg.flops:
            for variant in alive:
                variant.apply(model)
                try:
                    table[resolution, variant.key].flops, out = count_flops(caller, inputs)
                    outputs[variant.key] = out.detach().float().cpu()
                finally:
                    variant.remove(model)
        # Timed calls: each round visits every variant once, starting one later each round, so a slow
        # drift of the machine (thermal, other processes) hits all variants alike.
        times: dict[str, list[float]] = {v.key: [] for v in alive}
        for round_index in range(cfg.repeats):
            shift = round_index % max(1, len(alive))
            for variant in alive[shift:] + alive[:shift]:
                self.progress(f"{label} {variant.key}: timing {round_index + 1}/{cfg.repeats}", 0)
                variant.apply(model)
                try:
                    seconds, out = timed_forward(caller, inputs, self.device)
                    del out
                finally:
                    variant.remove(model)
                times[variant.key].append(seconds)
                self.progress(f"{label} {variant.key}: timing {round_index + 1}/{cfg.repeats}", 1)
        failed = [v for v in variants if v not in alive]
        self.progress(label, len(failed) * cfg.repeats)
        for key, samples in times.items():
            record = table[resolution, key]
            record.latencies_s = samples
            if samples:
                record.latency_median_s = statistics.median(samples)
                record.latency_min_s = min(samples)
        if cfg.memory and self.device.type == "cuda":
            for variant in alive:
                self.progress(f"{label} {variant.key}: peak memory", 0)
                variant.apply(model)
                try:
                    peak, before = cuda_peak_bytes(caller, inputs, self.device)
                finally:
                    variant.remove(model)
                record = table[resolution, variant.key]
                record.peak_mem_bytes, record.model_mem_bytes = peak, before
                self.progress(f"{label} {variant.key}: peak memory", 1)
            self.progress(label, len(failed))
        self._compare_outputs(resolution, outputs, table)
        del inputs, outputs

    def _compare_outputs(
        self, resolution: int, outputs: dict[str, torch.Tensor], table: dict[tuple[int, str], Record]
    ) -> None:
        base = outputs.get("baseline")
        for key, out in outputs.items():
            record = table[resolution, key]
            if base is not None:
                record.max_rel_diff_vs_baseline = _rel_diff(out, base)
            # tomediff must compute what tomesd computes; only comparable when partitions are not
            # random (the two libraries draw them from different generators).
            tomesd_out = outputs.get(f"tomesd@{record.ratio:g}") if record.ratio is not None else None
            if record.variant == "tomediff" and tomesd_out is not None and not self.config.use_rand:
                record.max_rel_diff_vs_tomesd = _rel_diff(out, tomesd_out)

    def cpu_memory(self, spec: ModelSpec, table: dict[tuple[int, str], Record]) -> None:
        cfg = self.config
        jobs: list[tuple[Record, dict[str, Any], str]] = []
        for resolution in cfg.resolutions:
            for variant in self.variants_for(spec):
                record = table[resolution, variant.key]
                label = f"{spec.name} {resolution}² {variant.key}: peak memory (own process)"
                if record.status != "ok":
                    self.progress(label, 1)
                    continue
                job = {
                    "model": spec.name,
                    "resolution": resolution,
                    "batch": cfg.batch,
                    "dtype": cfg.dtype,
                    "variant": variant.name,
                    "settings": None if variant.settings is None else dataclasses.asdict(variant.settings),
                    "threads": cfg.threads or torch.get_num_threads(),
                    "seed": cfg.seed,
                }
                jobs.append((record, job, label))

        def measure(item: tuple[Record, dict[str, Any], str]) -> None:
            record, job, label = item
            self.progress(label, 0)
            result = cpu_peak_in_subprocess(job)
            if "error" in result:
                record.status, record.error = "error", str(result["error"])
            else:
                record.peak_mem_bytes = int(result["peak_bytes"])
                record.model_mem_bytes = int(result["model_bytes"])
            self.progress(label, 1)

        # Peak RSS is per process, so workers may overlap; that only saves wall time (mostly the
        # seconds of importing torch and diffusers) and is done only when the copies of the model fit
        # comfortably in memory.
        with ThreadPoolExecutor(max_workers=_parallel_workers(spec, self.dtype, len(jobs))) as pool:
            list(pool.map(measure, jobs))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _parallel_workers(spec: ModelSpec, dtype: torch.dtype, jobs: int) -> int:
    from tomediff.bench.models import _model_class

    with torch.device("meta"):
        params = parameter_count(_model_class(spec.kind)(**dict(spec.config)))
    model_bytes = params * torch.empty((), dtype=dtype).element_size()
    workers = min(jobs, os.cpu_count() or 1, 2)
    while workers > 1 and workers * model_bytes * 2 > _available_memory():
        workers -= 1
    return max(1, workers)


def _derive(records: list[Record]) -> None:
    """Speedup, saving realised and ratios to the baseline of the same (model, resolution)."""
    by_key = {(r.model, r.resolution, r.variant, r.ratio): r for r in records}
    for record in records:
        base = by_key.get((record.model, record.resolution, "baseline", None))
        ideal = by_key.get((record.model, record.resolution, "ideal", record.ratio))
        if base is None:
            continue
        t_base, t = base.latency_median_s, record.latency_median_s
        if t_base and t:
            record.speedup = t_base / t
            t_ideal = ideal.latency_median_s if ideal is not None else None
            # When the ideal saves almost nothing (small images, where the merged attention is a
            # sliver of the call), the ratio is noise divided by noise: leave it undefined.
            if record.ratio is not None and t_ideal and t_base - t_ideal > MIN_AVAILABLE_SAVING * t_base:
                record.saving_realised = (t_base - t) / (t_base - t_ideal)
        if base.flops and record.flops is not None:
            record.flops_vs_baseline = record.flops / base.flops
        if base.peak_mem_bytes and record.peak_mem_bytes is not None:
            record.mem_vs_baseline = record.peak_mem_bytes / base.peak_mem_bytes


def run_benchmark(config: BenchConfig, progress: ProgressFn | None = None) -> BenchResult:
    """Measure every (model, resolution, ratio, variant) of ``config``; see ``tomediff bench --help``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    env = environment(device)
    records = _Runner(config, progress).run()
    return BenchResult(config, env, records)
