"""Speed against quality on the bundled trained DiT: tomediff's methods, diffusers' caches and their
stacks, over whole sampling trajectories (issue 16, item 4).

Every setting generates the same images (same classes, seeds, steps, sampler, guidance) as the
unaccelerated run. Timing is interleaved: batch ``b`` of every setting runs before batch ``b + 1`` of
any, the order rotating with ``b``, so a setting's speed-up is the median over batches of the
unaccelerated time of that batch over its own, which other jobs on the machine slow alike. Metrics as
``tomediff eval`` computes them (:mod:`tomediff.eval.quality`): class accuracy by the bundled classifier,
Fréchet distance of its features to the real test images, PSNR against the unaccelerated image of the
same seed, each with a bootstrap 95% interval.

A setting is ``NAME:OPTIONS`` where OPTIONS are ``tomediff eval --setting`` options (ToMeConfig fields,
or a preset as NAME) plus at most one ``cache=KIND[:KEY=VALUE/KEY=VALUE...]``, a diffusers cache enabled
with ``transformer.enable_cache``. A setting with a cache and no ToMeConfig option runs the cache alone.

    python -m tomediff.eval.pareto --out runs/pareto --samples-per-class 20 \\
        --setting fbc0.1:cache=fbc:threshold=0.1 --setting kv.5:ratio=0,kv_ratio=0.5 \\
        --setting stack:ratio=0,kv_ratio=0.5,cache=fbc:threshold=0.1
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomediff.errors import ConfigError
from tomediff.eval.settings import PRESETS, NamedSetting, parse_setting

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_SETTINGS",
    "PARETO_PRESETS",
    "CacheKind",
    "CacheSpec",
    "ParetoOptions",
    "ParetoSetting",
    "main",
    "pareto_front",
    "parse_cache",
    "parse_pareto_setting",
    "run_pareto",
]


@dataclass(frozen=True)
class CacheKind:
    """One of diffusers' caches: its config class, and this harness's short option names, each mapped to
    the config field it sets and its type (``fixed``: fields always set, for this model and pipeline)."""

    config_class: str
    about: str
    options: Mapping[str, tuple[str, type]]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    needs_timestep: bool = False  # the config takes current_timestep_callback
    needs_calibration: bool = False  # MagCache: mag_ratios from a calibration run of the same steps


CACHE_KINDS: dict[str, CacheKind] = {
    "fbc": CacheKind(
        "FirstBlockCacheConfig",
        "FirstBlockCache: skip the other blocks while the first block's residual changes less than threshold",
        {"threshold": ("threshold", float)},
    ),
    "taylorseer": CacheKind(
        "TaylorSeerCacheConfig",
        "TaylorSeer: compute attention/blocks every interval steps, forecast them between (Taylor order)",
        {
            "interval": ("cache_interval", int),
            "warmup": ("disable_cache_before_step", int),
            "order": ("max_order", int),
        },
        # bfloat16 factors cost a cast per block on a CPU and round the forecast; the model runs float32.
        fixed={"taylor_factors_dtype": "float32"},
    ),
    "pab": CacheKind(
        "PyramidAttentionBroadcastConfig",
        "Pyramid Attention Broadcast: reuse attention outputs for every-1 of every steps in (t_low, t_high)",
        {
            "every": ("spatial_attention_block_skip_range", int),
            "t_low": ("spatial_attention_timestep_skip_range.0", int),
            "t_high": ("spatial_attention_timestep_skip_range.1", int),
        },
        fixed={"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
        needs_timestep=True,
    ),
    "faster": CacheKind(
        "FasterCacheConfig",
        "FasterCache, attention part: reuse/extrapolate attention outputs every steps in (t_low, t_high); "
        "its guidance-half approximation expects video-shaped states, so it runs with "
        "is_guidance_distilled=True",
        {
            "every": ("spatial_attention_block_skip_range", int),
            "t_low": ("spatial_attention_timestep_skip_range.0", int),
            "t_high": ("spatial_attention_timestep_skip_range.1", int),
        },
        fixed={"is_guidance_distilled": True, "spatial_attention_timestep_skip_range": (-1, 681)},
        needs_timestep=True,
    ),
    "mag": CacheKind(
        "MagCacheConfig",
        "MagCache: skip the blocks while the calibrated residual-magnitude error stays under threshold",
        {
            "threshold": ("threshold", float),
            "max_skip": ("max_skip_steps", int),
            "retention": ("retention_ratio", float),
        },
        needs_calibration=True,
    ),
    "sea": CacheKind(
        "SeaCacheConfig",
        "SeaCache: skip the blocks while the spectrally weighted input change stays under threshold",
        {"threshold": ("threshold", float), "max_cached": ("max_consecutive_cached", int)},
    ),
}

_KEY = re.compile(r"^[a-z_]+$")


@dataclass(frozen=True)
class CacheSpec:
    """A diffusers cache and its options (short names of :data:`CACHE_KINDS`)."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def text(self) -> str:
        """As written after ``cache=``."""
        if not self.options:
            return self.kind
        return (
            self.kind
            + ":"
            + "/".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options)
        )

    def config(self, pipe: Any = None, mag_ratios: Sequence[float] | None = None, steps: int = 20) -> Any:
        """The diffusers config for ``pipe`` (a DemoDiTPipeline: its ``current_timestep`` for PAB and
        FasterCache), ``mag_ratios`` for MagCache calibrated at ``steps`` steps."""
        import diffusers.hooks
        import torch

        kind = CACHE_KINDS[self.kind]
        values: dict[str, Any] = dict(kind.fixed)
        for key, value in self.options:
            target, _ = kind.options[key]
            name, _, index = target.partition(".")
            if index:  # one end of a (low, high) range
                pair = list(values[name])
                pair[int(index)] = value
                values[name] = tuple(pair)
            else:
                values[name] = value
        if values.get("taylor_factors_dtype") == "float32":
            values["taylor_factors_dtype"] = torch.float32
        if kind.needs_timestep:
            if pipe is None:
                raise ConfigError(f"cache={self.text} needs the pipeline (its current timestep)")
            values["current_timestep_callback"] = lambda: pipe.current_timestep
        if kind.needs_calibration:
            if mag_ratios is None:
                raise ConfigError(f"cache={self.text} needs mag_ratios from a calibration run")
            values.update(mag_ratios=list(mag_ratios), num_inference_steps=steps)
        if self.kind == "sea":
            values["raw_vision_callback"] = _dit_raw_vision
        return getattr(diffusers.hooks, kind.config_class)(**values)


def _dit_raw_vision(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """SeaCache's view of the bundled DiT's input: per sample the latent ``(C, T=1, H, W)`` its image
    tokens ``(B, H*W, C)`` hold (the model has no built-in SeaCache adapter)."""
    from tomediff.eval.model import tokens_to_latents

    tokens = args[0] if args else kwargs["hidden_states"]
    side = math.isqrt(tokens.shape[1])  # the demo DiTs' grids are square
    latents = tokens_to_latents(tokens, side, side)
    return [latent.unsqueeze(1) for latent in latents]


def parse_cache(text: str) -> CacheSpec:
    """``KIND`` or ``KIND:KEY=VALUE/KEY=VALUE`` (see :data:`CACHE_KINDS`). Raises ConfigError."""
    kind_name, _, rest = text.strip().partition(":")
    kind = CACHE_KINDS.get(kind_name.strip())
    if kind is None:
        raise ConfigError(f"cache={text!r}: unknown cache {kind_name!r}; caches are {', '.join(CACHE_KINDS)}")
    options: dict[str, Any] = {}
    for item in rest.split("/"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(f"cache={text!r}: expected KEY=VALUE after {kind_name}:, got {item!r}")
        if key not in kind.options:
            raise ConfigError(
                f"cache={text!r}: {kind_name} takes {', '.join(kind.options)}, not {key!r} "
                f"(e.g. cache={kind_name}:{next(iter(kind.options))}=...)"
            )
        _, kind_type = kind.options[key]
        try:
            number = kind_type(value.strip())
        except ValueError:
            raise ConfigError(f"cache={text!r}: {key} must be {kind_type.__name__}, got {value!r}") from None
        if number < 0 or (kind_type is float and number != number):
            raise ConfigError(f"cache={text!r}: {key} must be >= 0, got {value!r}")
        options[key] = number
    spec = CacheSpec(kind_name.strip(), tuple(options.items()))
    try:  # diffusers' own checks, with a stand-in pipeline and calibration
        spec.config(pipe=argparse.Namespace(current_timestep=0), mag_ratios=[1.0] * 20)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"cache={text!r}: diffusers refuses it: {error}") from None
    return spec


@dataclass(frozen=True)
class ParetoSetting:
    """One row: tomediff's setting (None: no token reduction) and a diffusers cache (None: none)."""

    name: str
    tome: NamedSetting | None = None
    cache: CacheSpec | None = None

    @property
    def text(self) -> str:
        parts = [self.tome.text] if self.tome is not None and self.tome.text else []
        if self.tome is not None and not self.tome.text:
            parts.append(f"preset {self.tome.name}")
        if self.cache is not None:
            parts.append(f"cache={self.cache.text}")
        return ",".join(parts) or "unaccelerated"


# The Pareto-best points of docs/methods.md "Pareto on the trained DiT" (speed-up against PSNR), by name.
PARETO_PRESETS: dict[str, str] = {
    "dit-mag": "cache=mag:threshold=0.4/max_skip=8",  # recommended: 2.79x inside the quality bar, 27.8 dB
    "dit-mag-fidelity": "cache=mag:threshold=0.15/max_skip=5",  # 1.97x, 32.4 dB
    "dit-faster": "cache=faster:every=2",  # 1.16x, 43.8 dB: closest to unaccelerated
    # tomediff's token caching (docs/methods.md "Partial steps that compute no image token"; 1,024-token
    # DiT, 100 images): refreshes after a warm-up, the linear forecast, no image token computed between
    # refreshes. Speed-ups of two runs with the caches (batch 50 / 25) where both measured it. At the
    # high-fidelity end a refresh every 2nd step after a 20% warm-up: 1.71x at 48.0 dB, above every cache.
    "dit-tokencache": "method=cache,cache_interval=2,cache_ratio=0,start=0.2,cache_forecast=linear",
    # Every 3rd step from progress 0.45: 1.98x at 44.9 dB, 1.60x the fastest cache at or above it.
    "dit-tokencache-fast": (
        "method=cache,cache_interval=2,cache_intervals=0.45:3,cache_ratio=0,start=0.2,cache_forecast=linear"
    ),
    # Every 4th step from progress 0.45: 2.45x / 2.34x at 39.6 dB, 1.69x / 1.89x FasterCache's speed.
    "dit-tokencache-faster": (
        "method=cache,cache_interval=2,cache_intervals=0.45:4,cache_ratio=0,start=0.2,cache_forecast=linear"
    ),
    # A 15% warm-up, then every 3rd step, from 0.4 every 4th, from 0.6 every 5th (refreshes at steps 3, 6,
    # 10 and 15 of 20): 3.17x / 2.78x at 35.8 dB inside the accuracy/Frechet bar, 1.71x / 1.60x the fastest
    # cache at or above that PSNR (MagCache 0.1). The recommended setting on the 1,024-token DiT.
    "dit-tokencache-fastest": (
        "method=cache,cache_interval=3,cache_intervals=0.4:4/0.6:5,cache_ratio=0,start=0.15,cache_forecast=linear"
    ),
    # The high-resolution DiT (--image-size 64): fastest inside the accuracy/Frechet bar, 3.84x at +3.7%
    # Frechet and 18.7 dB (MagCache 1.0 alone: 3.51x, +14.7%). Not for the 256-token DiT (-5.5 points).
    "dit-hires-mag-merge": "ratio=0.3,skip_blocks=1/1,cache=mag:threshold=1.0/max_skip=10",
}


def parse_pareto_setting(text: str) -> ParetoSetting:
    """``NAME:OPTIONS`` as :func:`~tomediff.eval.settings.parse_setting` takes them, plus one
    ``cache=KIND[:KEY=VALUE/...]``; NAME alone may be one of :data:`PARETO_PRESETS`. Raises ConfigError."""
    name, _, rest = text.partition(":")
    if name.strip() in PARETO_PRESETS and not rest.strip():
        rest = PARETO_PRESETS[name.strip()]
    cache: CacheSpec | None = None
    tome_items = []
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "cache":
            if cache is not None:
                raise ConfigError(f"setting {name!r}: one cache= per setting, got two")
            cache = parse_cache(value)
        elif item.strip():
            tome_items.append(item.strip())
    tome = None
    if tome_items or name.strip() in PRESETS:
        tome = parse_setting(name + (":" + ",".join(tome_items) if tome_items else ""))
        if tome.library != "tomediff":
            raise ConfigError(
                f"setting {name!r}: only tomediff settings run on the DiT, not library={tome.library}"
            )
    elif cache is None:
        raise ConfigError(
            f"setting {name!r}: give ToMeConfig options, a preset name or cache=KIND "
            "(e.g. fbc:cache=fbc:threshold=0.1); the unaccelerated row is always there"
        )
    else:
        parse_setting(name + ":ratio=0")  # the name's own checks
    return ParetoSetting(name.strip(), tome, cache)


# What the documented runs compare (docs/methods.md "Pareto on the trained DiT").
DEFAULT_SETTINGS: tuple[str, ...] = (
    "tokencache-i2:method=cache,cache_interval=2,cache_ratio=0.25",
    "tokencache-i3:method=cache,cache_interval=3,cache_ratio=0.25",
    "tokencache-i2h:method=cache,cache_interval=2,cache_ratio=0.5",
    "merge0.3-skip1:ratio=0.3,skip_blocks=1/1",
    "kv0.5:ratio=0,kv_ratio=0.5",
    "fbc0.2:cache=fbc:threshold=0.2",
    "taylorseer3:cache=taylorseer:interval=3/warmup=3/order=1",
    "taylorseer4:cache=taylorseer:interval=4/warmup=2/order=2",
    "pab:cache=pab:every=2/t_low=100/t_high=800",
    "faster:cache=faster:every=2",
    "mag0.15:cache=mag:threshold=0.15/max_skip=5",
    "mag0.25:cache=mag:threshold=0.25/max_skip=5",
    "mag0.4:cache=mag:threshold=0.4/max_skip=8",
    "mag0.6:cache=mag:threshold=0.6/max_skip=8",
    "mag1.0:cache=mag:threshold=1.0/max_skip=10",
    "pab+merge0.3-skip1:ratio=0.3,skip_blocks=1/1,cache=pab:every=2/t_low=100/t_high=800",
    "mag0.15+kv0.25:ratio=0,kv_ratio=0.25,cache=mag:threshold=0.15/max_skip=5",
)


class _Applied:
    """A setting put on the pipeline (tomediff first, then the cache); :meth:`remove` takes both off."""

    def __init__(self, setting: ParetoSetting, pipe: Any, mag_ratios: Sequence[float] | None, steps: int):
        import tomediff

        self.pipe, self.handle = pipe, None
        if setting.tome is not None:
            self.handle = tomediff.apply_tome(pipe, setting.tome.config())
        if setting.cache is not None:
            try:
                pipe.transformer.enable_cache(setting.cache.config(pipe, mag_ratios, steps))
            except Exception:
                self.remove()
                raise

    def remove(self) -> None:
        if getattr(self.pipe.transformer, "is_cache_enabled", False):
            self.pipe.transformer.disable_cache()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def calibrate_mag_ratios(
    pipe: Any, class_ids: Sequence[int], seeds: Sequence[int], steps: int, guidance: float
) -> list[float]:
    """MagCache's own calibration (``calibrate=True``) on one unaccelerated batch: the mean ratio of
    successive residual magnitudes per step, as diffusers logs it at the end of the trajectory."""
    import diffusers.hooks

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = _Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    pipe.transformer.enable_cache(diffusers.hooks.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # diffusers also prints the list
            pipe(class_ids, seeds, num_inference_steps=steps, guidance_scale=guidance)
    finally:
        pipe.transformer.disable_cache()
        logger.removeHandler(handler)
        logger.setLevel(level)
    found = [r for r in records if "Calibration Results" in r]
    if not found:
        raise RuntimeError(
            "MagCache calibration logged no ratios (diffusers changed its calibration output?)"
        )
    ratios = [float(x) for x in re.findall(r"[-+0-9.e]+", found[-1].split(":", 1)[1])]
    if len(ratios) != steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


def pareto_front(points: Mapping[str, tuple[float, float]]) -> set[str]:
    """Names whose (speed-up, PSNR) no other point matches or beats in both and beats in one."""
    front = set()
    for name, (speed, quality) in points.items():
        dominated = any(
            s >= speed and q >= quality and (s > speed or q > quality)
            for other, (s, q) in points.items()
            if other != name
        )
        if not dominated:
            front.add(name)
    return front


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


@dataclass
class ParetoOptions:
    settings: Sequence[ParetoSetting]
    out_dir: Path = Path("runs/pareto")
    samples_per_class: int = 20
    batch_size: int = 50
    steps: int = 20
    guidance: float = 3.0
    base_seed: int = 0
    bootstrap: int = 1000
    image_size: int = 32  # 64: the high-resolution DiT (1,024 image tokens)
    progress: bool = True
    assets_dir: Path | None = None  # other DiT/classifier weights in the shipped layout (tests: tiny ones)
    command: str = field(default_factory=lambda: " ".join(sys.argv))


def run_pareto(options: ParetoOptions, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Generate every setting's images batch by batch (interleaved, see the module docstring), then
    compute the metrics; writes ``results.json``, ``results.csv`` and ``results.md`` into ``out_dir``."""
    import numpy as np
    import torch

    from tomediff.eval.classifier import classify, load_classifier, load_reference_stats
    from tomediff.eval.metrics import frechet_with_ci, mean_with_ci, psnr
    from tomediff.eval.pipeline import ASSETS_DIR, load_demo_dit
    from tomediff.eval.quality import environment
    from tomediff.eval.report import write_csv, write_json
    from tomediff.eval.sharding import DistContext, plan_batches

    names = [s.name for s in options.settings]
    if len(set(names)) != len(names) or "unaccelerated" in names:
        raise ConfigError(f"setting names must be unique and not 'unaccelerated', got {', '.join(names)}")
    rows_in = [ParetoSetting("unaccelerated"), *options.settings]
    assets = options.assets_dir or ASSETS_DIR
    pipe = load_demo_dit(assets, image_size=options.image_size)
    batches = plan_batches(
        options.samples_per_class, len(pipe.class_names), options.batch_size, options.base_seed
    )
    needs_mag = any(s.cache is not None and CACHE_KINDS[s.cache.kind].needs_calibration for s in rows_in)
    mag_ratios = None
    if needs_mag:  # calibrated on seeds none of the measured images use
        first = batches[0]
        calibration_seeds = [s + 1_000_000 for s in first.seeds]
        mag_ratios = calibrate_mag_ratios(
            pipe, first.class_ids, calibration_seeds, options.steps, options.guidance
        )
        say(f"MagCache ratios ({options.steps} steps): {', '.join(f'{r:.3f}' for r in mag_ratios)}")
    for setting in rows_in:  # every setting attaches (or is refused) before any long work
        _Applied(setting, pipe, mag_ratios, options.steps).remove()
    pipe(batches[0].class_ids[:2], batches[0].seeds[:2], num_inference_steps=2)  # warm-up
    images: dict[str, list[Any]] = {s.name: [] for s in rows_in}
    seconds: dict[str, list[float]] = {s.name: [] for s in rows_in}
    loads = [_load()]
    started = time.time()
    for b, batch in enumerate(batches):
        order = rows_in[b % len(rows_in) :] + rows_in[: b % len(rows_in)]
        for setting in order:
            applied = _Applied(setting, pipe, mag_ratios, options.steps)
            try:
                start = time.perf_counter()
                out = pipe(
                    batch.class_ids,
                    batch.seeds,
                    num_inference_steps=options.steps,
                    guidance_scale=options.guidance,
                )
                seconds[setting.name].append(time.perf_counter() - start)
            finally:
                applied.remove()
            images[setting.name].append(out)
        loads.append(_load())
        if options.progress:
            say(f"batch {b + 1}/{len(batches)} done, {time.time() - started:.0f} s, load {loads[-1][0]:.1f}")
    classifier = load_classifier(assets)
    ref_mu, ref_sigma = load_reference_stats(assets)
    class_ids = np.concatenate([np.asarray(b.class_ids) for b in batches])
    base_images = np.concatenate(images["unaccelerated"])
    base_seconds = np.asarray(seconds["unaccelerated"])
    rows: list[dict[str, Any]] = []
    for setting in rows_in:
        sample = np.concatenate(images[setting.name])
        predicted, features = classify(classifier, sample)
        correct = (predicted == class_ids).astype(np.float64) * 100
        mine = np.asarray(seconds[setting.name])
        ratios = base_seconds / mine
        row: dict[str, Any] = {
            "name": setting.name,
            "setting": setting.text,
            "tomediff": setting.tome.text if setting.tome is not None else "",
            "cache": setting.cache.text if setting.cache is not None else "",
            "num_images": len(sample),
            "seconds_per_image": float(np.median(mine)) / options.batch_size,
            "speedup": float(np.median(ratios)),
            "speedup_min": float(ratios.min()),
            "speedup_max": float(ratios.max()),
            "accuracy": mean_with_ci(correct, resamples=options.bootstrap).as_dict(),
            "frechet": frechet_with_ci(
                features, ref_mu, ref_sigma, resamples=max(50, options.bootstrap // 5)
            ).as_dict(),
            "psnr": None
            if setting.name == "unaccelerated"
            else mean_with_ci(psnr(sample, base_images), resamples=options.bootstrap).as_dict(),
            "batch_seconds": mine.tolist(),
        }
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["delta_accuracy"] = row["accuracy"]["value"] - base["accuracy"]["value"]
        row["delta_frechet_pct"] = 100 * (row["frechet"]["value"] / base["frechet"]["value"] - 1)
        row["quality_target"] = row["delta_accuracy"] >= -2 and row["delta_frechet_pct"] <= 10
    measured = {r["name"]: (r["speedup"], r["psnr"]["value"]) for r in rows[1:]}
    front = pareto_front(measured)
    for row in rows:
        row["pareto"] = row["name"] in front
    meta = {
        "command": options.command,
        "model": f"bundled DiT (tomediff.eval.load_demo_dit(image_size={options.image_size}))",
        "image_tokens": (options.image_size // 2) ** 2,
        "samples_per_class": options.samples_per_class,
        "images_per_setting": len(base_images),
        "batch_size": options.batch_size,
        "steps": options.steps,
        "guidance": options.guidance,
        "sampler": "FlowMatchEulerDiscreteScheduler (shift 1)",
        "mag_ratios": mag_ratios,
        "load_average_1min": [round(x[0], 2) for x in loads],
        "wall_seconds": round(time.time() - started, 1),
        "environment": environment(DistContext(cpu=True)),
        "torch_threads": torch.get_num_threads(),
    }
    out_dir = options.out_dir
    write_json(out_dir / "results.json", {"meta": meta, "rows": rows})
    write_csv(out_dir / "results.csv", [{k: v for k, v in r.items() if k != "batch_seconds"} for r in rows])
    table = markdown(rows)
    (out_dir / "results.md").write_text(table + "\n")
    say(table)
    say(f"wrote {out_dir}/results.json, results.csv, results.md")
    return rows


def _ci(metric: dict[str, float] | None, digits: int) -> str:
    if metric is None:
        return "–"
    return f"{metric['value']:.{digits}f} [{metric['ci_low']:.{digits}f}, {metric['ci_high']:.{digits}f}]"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table; Pareto-best (speed-up vs PSNR) names in bold."""
    lines = [
        "| setting | tomediff | diffusers cache | s / image | speed-up (min–max) | class accuracy (%) "
        "| Δ acc | Fréchet | Δ Fréchet | PSNR vs unaccelerated (dB) | acc ±2, Fréchet +10% |",
        "|---|---|---|--:|--:|---|--:|---|--:|---|:-:|",
    ]
    for row in rows:
        name = f"**{row['name']}**" if row.get("pareto") else row["name"]
        base = row["name"] == "unaccelerated"
        delta_accuracy = "–" if base else f"{row['delta_accuracy']:+.1f}"
        delta_frechet = "–" if base else f"{row['delta_frechet_pct']:+.1f}%"
        lines.append(
            f"| {name} | {row['tomediff'] or '–'} | {row['cache'] or '–'} | {row['seconds_per_image']:.3f} | "
            + (
                "1.00"
                if base
                else f"{row['speedup']:.2f} ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})"
            )
            + f" | {_ci(row['accuracy'], 1)} | {delta_accuracy} | "
            f"{_ci(row['frechet'], 1)} | {delta_frechet} | "
            f"{_ci(row['psnr'], 2)} | {'–' if base else ('yes' if row['quality_target'] else 'no')} |"
        )
    return "\n".join(lines)


def build_settings(texts: Sequence[str]) -> list[ParetoSetting]:
    """The parsed settings, in order (raises ConfigError at the first bad one)."""
    return [parse_pareto_setting(text) for text in texts]


def parser() -> argparse.ArgumentParser:
    kinds = "; ".join(
        f"{name} ({', '.join(kind.options)}): {kind.about}" for name, kind in CACHE_KINDS.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m tomediff.eval.pareto",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="NAME:OPTIONS",
        help="repeatable: tomediff eval --setting options plus cache=KIND[:KEY=VALUE/...], or a preset "
        f"({', '.join(f'{k} = {v}' for k, v in PARETO_PRESETS.items())}). Caches: "
        f"{kinds}. Default: the documented list (DEFAULT_SETTINGS)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/pareto"), help="output folder. Default: runs/pareto"
    )
    p.add_argument(
        "--samples-per-class", type=int, default=20, help="images per class per setting. Default: 20"
    )
    p.add_argument("--batch-size", type=int, default=50, help="images per sampling call. Default: 50")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (all settings). Default: 20")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale. Default: 3.0")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image. Default: 0")
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        choices=(32, 64),
        help="which bundled DiT: 32 (256 image tokens) or 64 (the high-resolution one, 1,024 image "
        "tokens). Default: 32",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads. Default: 1")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples. Default: 1000")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("samples_per_class", "batch_size", "steps", "threads", "bootstrap"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        settings = build_settings(args.setting or DEFAULT_SETTINGS)
    except ConfigError as error:
        parser().error(str(error))
    import torch

    torch.set_num_threads(args.threads)
    run_pareto(
        ParetoOptions(
            settings=settings,
            out_dir=args.out,
            samples_per_class=args.samples_per_class,
            batch_size=args.batch_size,
            steps=args.steps,
            guidance=args.guidance,
            base_seed=args.seed,
            bootstrap=args.bootstrap,
            image_size=args.image_size,
            progress=not args.no_progress,
        ),
        say=lambda text: print(text, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
