"""The variants compared by the benchmark: baseline, tomediff, tomesd and the ideal merge.

Each merging variant carries a :class:`MergeSettings`, derived from ToMeConfig's fields.

A variant patches a model in place and removes its patch again, so one model instance serves every
variant and the timed calls of all of them can be interleaved.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

import tomediff
from tomediff.config import config_from, tomesd_arguments
from tomediff.core.reducers import PlanRequest, Reducer, cached
from tomediff.eval.settings import SETTING_FIELDS, normalise, setting_fields
from tomediff.ops import KeepPlan

__all__ = [
    "ALL_VARIANTS",
    "MERGING_VARIANTS",
    "KeepReducer",
    "MergeSettings",
    "Variant",
    "make_variant",
    "tomesd_version",
]

# Order of columns in tables and of variants within a timing round.
ALL_VARIANTS: tuple[str, ...] = ("baseline", "tomediff", "tomesd", "ideal")
MERGING_VARIANTS: tuple[str, ...] = ("tomediff", "tomesd", "ideal")


def tomesd_version() -> str | None:
    """Installed tomesd version, or None when it is not installed."""
    if importlib.util.find_spec("tomesd") is None:
        return None
    try:
        return importlib.metadata.version("tomesd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_MergeFields = dataclasses.make_dataclass("_MergeFields", setting_fields(use_rand=False), frozen=True)


@dataclass(frozen=True)
class MergeSettings(_MergeFields):  # type: ignore[misc, valid-type]
    """The ToMeConfig of one merging variant: every :class:`tomediff.ToMeConfig` field (but
    ``generator``), derived from ToMeConfig's own fields and validated by it on construction.

    Only ``use_rand``'s default differs (deterministic partitions, so tomediff and tomesd outputs can
    be compared). The classic rows (``--ratio``) set ``max_downsample`` from the model spec, because
    tomesd's default of 1 patches nothing in SDXL; tomediff and the ideal get the same value.
    """

    def __post_init__(self) -> None:
        normalise(self)  # raises ConfigError for a value ToMeConfig refuses

    def tome_config(self) -> tomediff.ToMeConfig:
        return config_from(self)

    @classmethod
    def of(cls, config: tomediff.ToMeConfig) -> MergeSettings:
        return cls(**{f.name: getattr(config, f.name) for f in SETTING_FIELDS})

    @property
    def varies_over_steps(self) -> bool:
        """Whether a call's cost depends on the denoising step (a schedule, plans or token caches kept
        between calls), so one call does not represent a generation."""
        return self.start > 0.0 or self.stop < 1.0 or self.reuse_steps > 1 or self.method == "cache"

    def ideal(self, default_level: int) -> MergeSettings | None:
        """The settings of this variant's zero-cost reference: the same blocks, sites, ratios and
        schedule, no plan reuse (keeping tokens costs nothing to recompute), the model's top level
        made explicit so equal selections compare equal; None for ``method="downsample"``, which keeps
        every query and has no merge to make free."""
        if self.method != "merge":
            return None
        level = self.max_downsample
        if level is None and self.level_ratios is None:
            level = default_level
        # Any: the fields come from make_dataclass, which mypy cannot see.
        return dataclasses.replace(
            cast(Any, self),
            max_downsample=level,
            use_rand=False,
            seed=0,
            reuse_level=False,
            reuse_steps=1,
            reuse_cfg=False,
        )


class Variant:
    """One way of running the model; ``apply`` before a call, ``remove`` after.

    ``label`` names the setting of the run it belongs to (``--setting NAME``); classic rows (``--ratio``)
    have none and are told apart by their ratio."""

    name: str = "variant"

    def __init__(self, settings: MergeSettings | None, label: str | None = None) -> None:
        self.settings = settings
        self.label = label

    @property
    def ratio(self) -> float | None:
        s = self.settings
        if s is None or s.method != "merge" or s.level_ratios is not None:
            return None
        return s.ratio

    @property
    def key(self) -> str:
        """Unique within a run: the name plus the setting's label, or the ratio for classic rows."""
        if self.label is not None:
            return f"{self.name}:{self.label}"
        return self.name if self.settings is None else f"{self.name}@{self.settings.ratio:g}"

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError


class Baseline(Variant):
    name = "baseline"

    def apply(self, model: nn.Module) -> None:
        pass

    def remove(self, model: nn.Module) -> None:
        pass


class KeepReducer(Reducer):
    """The zero-cost reference ("ideal"): each block keeps ``N - r`` tokens with no matching at all
    (:class:`tomediff.ops.KeepPlan`), so a model patched with it runs as fast as any merging method
    could at the same token counts. Its outputs are not meaningful images."""

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int, int, str], KeepPlan] = {}

    def plan(self, state: Any, request: PlanRequest) -> KeepPlan | None:
        batch, num_tokens, _ = request.metric.shape
        num_kept = num_tokens - int(num_tokens * request.setting.ratio)
        if num_kept >= num_tokens:
            return None
        device: torch.device = request.metric.device
        key = (batch, num_tokens, num_kept, str(device))
        return cached(self._plans, key, lambda: KeepPlan.build(batch, num_tokens, num_kept, device))


class TomediffVariant(Variant):
    """tomediff through its public API; ``ideal=True`` is the zero-cost reference merge
    (:class:`KeepReducer`) at the same settings."""

    def __init__(self, settings: MergeSettings, ideal: bool = False, label: str | None = None) -> None:
        super().__init__(settings, label)
        self.ideal = ideal
        self.name = "ideal" if ideal else "tomediff"
        self._handle: Any = None

    def apply(self, model: nn.Module) -> None:
        assert self.settings is not None
        config = self.settings.tome_config()
        if config.reuse_cfg and config.cfg_layout == "auto":
            # The benchmark calls the bare model with a batch of 2 standing for diffusers' guidance pair;
            # no pipeline is there to say so.
            config = config.replace(cfg_layout="uncond_cond")
        if self.ideal:
            self._handle = tomediff.apply_reducer(model, KeepReducer(), config)
        else:
            self._handle = tomediff.apply_tome(model, config)

    def remove(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class TomesdVariant(Variant):
    name = "tomesd"

    def apply(self, model: nn.Module) -> None:
        import tomesd

        assert self.settings is not None
        tomesd.apply_patch(model, **tomesd_arguments(self.settings.tome_config()))

    def remove(self, model: nn.Module) -> None:
        import tomesd

        tomesd.remove_patch(model)


def make_variant(name: str, settings: MergeSettings | None, label: str | None = None) -> Variant:
    if name == "baseline":
        return Baseline(None)
    if settings is None:
        raise ValueError(f"variant {name!r} needs merge settings")
    if name == "tomediff":
        return TomediffVariant(settings, label=label)
    if name == "ideal":
        return TomediffVariant(settings, ideal=True, label=label)
    if name == "tomesd":
        if tomesd_version() is None:
            raise ValueError("--compare tomesd needs tomesd installed: pip install tomesd==0.1.3")
        return TomesdVariant(settings, label)
    raise ValueError(f"Unknown variant {name!r}; choose from: {', '.join(ALL_VARIANTS)}.")
