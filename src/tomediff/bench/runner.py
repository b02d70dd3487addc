"""The benchmark loop: build each model once, interleave the variants' timed calls, collect records."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from tomediff.bench.measure import (
    count_flops,
    cpu_peak_in_subprocess,
    cuda_peak_bytes,
    forward,
    timed_forward,
)
from tomediff.bench.models import (
    ModelInputs,
    ModelSpec,
    build_model,
    get_model_spec,
    make_inputs,
    parameter_count,
)
from tomediff.bench.variants import ALL_VARIANTS, MergeSettings, Variant, make_variant, tomesd_version
from tomediff.eval.settings import NamedSetting

__all__ = [
    "DTYPES",
    "BenchConfig",
    "BenchResult",
    "Record",
    "at_timestep",
    "environment",
    "run_benchmark",
    "trajectory_timesteps",
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Saving realised is reported only when the ideal is at least this much faster than the baseline.
MIN_AVAILABLE_SAVING = 0.02

# Progress callback: (description of the current step, number of steps just completed).
ProgressFn = Callable[[str, int], None]


@dataclass
class BenchConfig:
    """Everything one run measures.

    Classic rows: baseline, tomediff and ideal at each of ``ratios`` (plus tomesd when in ``variants``),
    all with ``shared`` (ToMeConfig fields tomesd also has: ``use_rand``, the merge sites, ``seed``;
    MergeSettings' defaults otherwise) and, for tomediff and the ideal, ``options`` (the other fields).
    With ``named`` settings instead: baseline, each named setting (tomediff or tomesd, as the setting
    says), and the ideal of each distinct selection of blocks, ratios and schedule (none for
    ``method="downsample"``).

    ``trajectory``: a variant whose cost changes over the denoising (a ``start``/``stop`` schedule,
    ``reuse_steps > 1``) is timed over that many consecutive calls at evenly spaced timesteps, one
    patch for all of them (see :func:`trajectory_timesteps`); its sample is the mean time per call.
    """

    models: Sequence[str] = ("sd15",)
    resolutions: Sequence[int] = (512,)
    ratios: Sequence[float] = (0.5,)
    batch: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    repeats: int = 3
    warmup: int = 1
    variants: Sequence[str] = ("baseline", "tomediff", "ideal")
    shared: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None
    memory: bool = True
    flops: bool = True
    seed: int = 0  # random weights and inputs (the merging seed, a ToMeConfig field, is in ``shared``)
    compile: bool = False
    compile_mode: str = "default"
    options: Mapping[str, Any] = field(default_factory=dict)
    named: Sequence[NamedSetting] = ()
    trajectory: int = 2

    def settings(self, spec: ModelSpec, ratio: float) -> MergeSettings:
        """The classic rows' settings at ``ratio``, with ``shared`` but without ``options`` (what tomesd
        gets). Both mappings hold ToMeConfig fields; MergeSettings validates them."""
        return MergeSettings(ratio=ratio, max_downsample=spec.max_downsample, **self.shared)

    def ordered_variants(self) -> list[str]:
        return [v for v in ALL_VARIANTS if v in self.variants]

    def variants_for(self, spec: ModelSpec) -> list[Variant]:
        """Every variant of one model, in table order (also the order of a timing round)."""
        names = self.ordered_variants()
        variants = [make_variant("baseline", None)] if "baseline" in names or self.named else []
        if self.named:
            ideals: dict[MergeSettings, str] = {}
            for named in self.named:
                settings = MergeSettings.of(named.config())
                variants.append(make_variant(named.library, settings, named.name))
                ideal = settings.ideal(spec.max_downsample)
                if ideal is not None and ideal not in ideals:
                    ideals[ideal] = named.name
                    variants.append(make_variant("ideal", ideal, named.name))
            return variants
        for ratio in self.ratios:
            plain = self.settings(spec, ratio)
            ours = dataclasses.replace(plain, **self.options) if self.options else plain
            for name in names:
                if name == "tomediff":
                    variants.append(make_variant(name, ours))
                elif name == "tomesd":
                    variants.append(make_variant(name, plain))
                elif name == "ideal" and ours.ideal(spec.max_downsample) is not None:
                    variants.append(make_variant(name, ours.ideal(spec.max_downsample)))
        return variants

    def calls_per_sample(self, variant: Variant) -> int:
        settings = variant.settings
        return self.trajectory if settings is not None and settings.varies_over_steps else 1

    def total_steps(self) -> int:
        """Progress units: one per model call (warm-up, timed, memory)."""
        total = 0
        for name in self.models:
            variants = self.variants_for(get_model_spec(name))
            calls = sum(self.calls_per_sample(v) for v in variants) * (self.warmup + self.repeats)
            total += len(self.resolutions) * (calls + (len(variants) if self.memory else 0))
        return total


def trajectory_timesteps(calls: int, horizon: float = 1000.0) -> list[int]:
    """The timesteps of a ``calls``-call trajectory: the midpoints of ``calls`` equal slices of the
    denoising, ``t_i = T * (1 - (i + 1/2) / calls)`` (progress ``(i + 1/2) / calls``), so a schedule
    ``[start, stop)`` is active in the share of calls a long sampling run would give it when
    ``stop - start`` is a multiple of ``1 / calls``."""
    return [round(horizon * (1 - (i + 0.5) / calls)) for i in range(calls)]


def at_timestep(spec: ModelSpec, inputs: ModelInputs, timestep: int) -> ModelInputs:
    """``inputs`` with the denoising timestep set to ``timestep`` (added as a keyword for a bare
    ``Transformer2DModel``, which takes one and ignores it with layer norms)."""
    args, kwargs = list(inputs.args), dict(inputs.kwargs)
    if "timestep" in kwargs:
        old = kwargs["timestep"]
    elif spec.kind == "unet":
        old = args[1]
    else:
        old = None
    batch = int(args[0].shape[0])
    device = args[0].device if old is None else old.device
    if spec.kind in ("flux", "flux2", "qwenimage"):  # their pipelines pass t / 1000
        value = torch.full(
            (batch,), timestep / 1000, dtype=old.dtype if old is not None else None, device=device
        )
    else:
        dtype = old.dtype if old is not None else torch.long
        value = torch.full((batch,), timestep, dtype=dtype, device=device)
    if spec.kind == "unet" and "timestep" not in kwargs:
        args[1] = value
    else:
        kwargs["timestep"] = value
    return ModelInputs(tuple(args), kwargs)


@dataclass
class Record:
    """One (model, resolution, variant, setting or ratio) result row. Times in seconds, memory in bytes.

    ``setting``: the name of a named setting (None for the classic rows, told apart by ``ratio``);
    ``options``: its ToMeConfig options as ``key=value,...``; ``key``: unique within a (model,
    resolution); ``reference``: the key of the ideal this row's saving is measured against (None: no
    meaningful ideal); ``calls_per_sample``: calls averaged in one timed sample (a trajectory for a
    schedule or ``reuse_steps``); ``note``: what the row needs said (trajectory, no ideal).
    """

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
    setting: str | None = None
    options: str | None = None
    key: str | None = None
    reference: str | None = None
    calls_per_sample: int = 1
    note: str | None = None

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
    """Image (or video) tokens at the level where merging happens."""
    if spec.kind in ("wan", "hunyuanvideo"):
        if spec.kind == "wan":
            pt, ph, pw = (int(p) for p in spec.config["patch_size"])
        else:
            pt, ph, pw = (
                int(spec.config["patch_size_t"]),
                int(spec.config["patch_size"]),
                int(spec.config["patch_size"]),
            )
        height, width = spec.frame_size(resolution)
        return (spec.latent_frames() // pt) * (height // 8 // ph) * (width // 8 // pw)
    side = resolution // 8 // spec.input_downsample
    if spec.kind in ("pixart", "sd3"):
        side //= int(spec.config["patch_size"])
    elif spec.kind in ("flux", "flux2", "qwenimage"):  # their pipelines pack 2x2 latent patches per token
        side //= 2
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
    # On a module torch.compile returns an OptimizedModule (an nn.Module); its stub says only Callable.
    return cast(torch.nn.Module, torch.compile(model, mode=None if mode == "default" else mode))


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
        return self.config.variants_for(spec)

    def new_record(
        self, spec: ModelSpec, resolution: int, variant: Variant, ideals: dict[Any, str]
    ) -> Record:
        cfg = self.config
        record = Record(
            model=spec.name,
            resolution=resolution,
            variant=variant.name,
            ratio=variant.ratio,
            batch=cfg.batch,
            device=str(self.device),
            dtype=cfg.dtype,
            tokens=_tokens(spec, resolution),
            setting=variant.label,
            key=variant.key,
            calls_per_sample=cfg.calls_per_sample(variant),
        )
        settings = variant.settings
        if settings is None:
            return record
        named = {n.name: n for n in cfg.named}.get(variant.label or "")
        if named is not None:
            record.options = named.text
        elif cfg.options and variant.name != "tomesd":
            record.options = ",".join(f"{k}={v}" for k, v in cfg.options.items())
        ideal = settings.ideal(spec.max_downsample)
        record.reference = variant.key if variant.name == "ideal" else ideals.get(ideal)
        notes = []
        if ideal is None and settings.method == "cache":
            notes.append(
                "no ideal: token caching computes fewer tokens in whole blocks, no merge to make free"
            )
        elif ideal is None:
            notes.append("no ideal: downsampling keeps every query, there is no merge to make free")
        if variant.name == "ideal":
            users = [
                v.label or v.key
                for v in self.variants_for(spec)
                if v.name != "ideal"
                and v.settings is not None
                and v.settings.ideal(spec.max_downsample) == settings
            ]
            if users and variant.label is not None:
                notes.append("the ideal of " + ", ".join(users))
        if record.calls_per_sample > 1:
            notes.append(_trajectory_note(settings, record.calls_per_sample))
        record.note = "; ".join(notes) or None
        return record

    def run(self) -> list[Record]:
        records: list[Record] = []
        for name in self.config.models:
            records += self.run_model(get_model_spec(name))
        return records

    def run_model(self, spec: ModelSpec) -> list[Record]:
        cfg = self.config
        table: dict[tuple[int, str], Record] = {}
        variants = self.variants_for(spec)
        ideals = {v.settings: v.key for v in variants if v.name == "ideal"}
        for resolution in cfg.resolutions:
            for variant in variants:
                table[resolution, variant.key] = self.new_record(spec, resolution, variant, ideals)
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
        calls = {v.key: self.calls_of(spec, v, inputs) for v in variants}
        for variant in variants:
            record = table[resolution, variant.key]
            try:
                variant.apply(model)
                try:
                    for i in range(cfg.warmup):
                        self.progress(f"{label} {variant.key}: warm-up", 0)
                        if i == 0 and cfg.flops:
                            record.flops = self.flops(caller, calls[variant.key], outputs, variant.key)
                        else:
                            for call in calls[variant.key]:
                                out = forward(caller, call)
                                if i == 0 and len(calls[variant.key]) == 1:
                                    outputs[variant.key] = out.detach().float().cpu()
                                del out
                        self.progress(f"{label} {variant.key}: warm-up", len(calls[variant.key]))
                finally:
                    variant.remove(model)
            except Exception as error:  # recorded, and the other variants still run
                record.status, record.error = "error", _error_text(error)
                self.progress(label, cfg.warmup * len(calls[variant.key]))
                continue
            alive.append(variant)
        if cfg.warmup == 0 and cfg.flops:
            for variant in alive:
                variant.apply(model)
                try:
                    flops = self.flops(caller, calls[variant.key], outputs, variant.key)
                    table[resolution, variant.key].flops = flops
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
                    seconds = 0.0
                    for call in calls[variant.key]:  # one patch for a whole trajectory
                        elapsed, out = timed_forward(caller, call, self.device)
                        seconds += elapsed
                        del out
                finally:
                    variant.remove(model)
                times[variant.key].append(seconds / len(calls[variant.key]))
                done = len(calls[variant.key])
                self.progress(f"{label} {variant.key}: timing {round_index + 1}/{cfg.repeats}", done)
        failed = [v for v in variants if v not in alive]
        self.progress(label, sum(len(calls[v.key]) for v in failed) * cfg.repeats)
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

    def calls_of(self, spec: ModelSpec, variant: Variant, inputs: ModelInputs) -> list[ModelInputs]:
        """The calls of one timed sample: ``inputs`` once, or a trajectory for a variant whose cost
        changes over the denoising."""
        count = self.config.calls_per_sample(variant)
        if count == 1:
            return [inputs]
        return [at_timestep(spec, inputs, t) for t in trajectory_timesteps(count)]

    def flops(
        self,
        caller: torch.nn.Module,
        calls: list[ModelInputs],
        outputs: dict[str, torch.Tensor],
        key: str,
    ) -> int:
        """FLOPs per call (the mean over a trajectory); keeps a single call's output for the
        comparisons (a trajectory's calls run at other timesteps than the baseline's)."""
        total = 0
        for call in calls:
            flops, out = count_flops(caller, call)
            total += flops
            if len(calls) == 1:
                outputs[key] = out.detach().float().cpu()
            del out
        return round(total / len(calls))

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
            comparable = not self.config.shared.get("use_rand", False) and not self.config.options
            if record.variant == "tomediff" and tomesd_out is not None and comparable:
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
                    # A trajectory's first call: the schedule is on and plans are made (its peak).
                    "timestep": trajectory_timesteps(record.calls_per_sample)[0]
                    if record.calls_per_sample > 1
                    else None,
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


def _trajectory_note(settings: MergeSettings, calls: int) -> str:
    steps = trajectory_timesteps(calls)
    progress = [(i + 0.5) / calls for i in range(calls)]
    active = sum(settings.start <= p < settings.stop for p in progress)
    text = f"mean of {calls} calls at t={'/'.join(map(str, steps))}: reduced in {active}"
    if settings.reuse_steps > 1:
        text += f", matched in {-(-calls // settings.reuse_steps)}"
    if settings.method == "cache":
        text += f", every token computed in {-(-calls // settings.cache_interval)}"
    return text


def _derive(records: list[Record]) -> None:
    """Speedup, saving realised and ratios to the baseline of the same (model, resolution)."""
    by_key = {(r.model, r.resolution, r.variant, r.ratio): r for r in records if r.setting is None}
    by_name: dict[tuple[str, int, str | None], Record] = {
        (r.model, r.resolution, r.key): r for r in records if r.key is not None
    }
    for record in records:
        base = by_key.get((record.model, record.resolution, "baseline", None))
        if record.key is not None:  # rows made by the runner name their ideal (or have none)
            ideal = by_name.get((record.model, record.resolution, record.reference))
        else:
            ideal = by_key.get((record.model, record.resolution, "ideal", record.ratio))
        if base is None:
            continue
        t_base, t = base.latency_median_s, record.latency_median_s
        if t_base and t:
            record.speedup = t_base / t
            t_ideal = ideal.latency_median_s if ideal is not None else None
            # When the ideal saves almost nothing (small images, where the merged attention is a
            # sliver of the call), the ratio is noise divided by noise: leave it undefined.
            merging = record.ratio is not None or ideal is not None
            if merging and t_ideal and t_base - t_ideal > MIN_AVAILABLE_SAVING * t_base:
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
