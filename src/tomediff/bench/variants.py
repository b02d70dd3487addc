"""The variants compared by the benchmark: baseline, tomediff, tomesd and the ideal merge.

A variant patches a model in place and removes its patch again, so one model instance serves every
variant and the timed calls of all of them can be interleaved.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tomediff
from tomediff.config import config_from, tomesd_arguments
from tomediff.core.methods import PlanRequest, Reducer, cached
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


@dataclass(frozen=True)
class MergeSettings:
    """ToMe settings shared by every merging variant of one run, so they are compared like for like.

    ``max_downsample`` is explicit (from the model spec) because tomesd's default of 1 patches nothing
    in SDXL; tomediff and the ideal get the same value. Every field is a :class:`tomediff.ToMeConfig`
    field (only ``use_rand``'s default differs: deterministic partitions, so tomediff and tomesd outputs
    can be compared) and is validated by it on construction.
    """

    ratio: float
    max_downsample: int
    sx: int = 2
    sy: int = 2
    use_rand: bool = False
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.tome_config()  # raises ConfigError for a value ToMeConfig refuses

    def tome_config(self) -> tomediff.ToMeConfig:
        return config_from(self)


class Variant:
    """One way of running the model; ``apply`` before a call, ``remove`` after."""

    name: str = "variant"

    def __init__(self, settings: MergeSettings | None) -> None:
        self.settings = settings

    @property
    def ratio(self) -> float | None:
        return None if self.settings is None else self.settings.ratio

    @property
    def key(self) -> str:
        """Unique within a run: the name plus the ratio for merging variants."""
        return self.name if self.ratio is None else f"{self.name}@{self.ratio:g}"

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

    def __init__(self, settings: MergeSettings, ideal: bool = False) -> None:
        super().__init__(settings)
        self.ideal = ideal
        self.name = "ideal" if ideal else "tomediff"
        self._handle: Any = None

    def apply(self, model: nn.Module) -> None:
        assert self.settings is not None
        config = self.settings.tome_config()
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


def make_variant(name: str, settings: MergeSettings | None) -> Variant:
    if name == "baseline":
        return Baseline(None)
    if settings is None:
        raise ValueError(f"variant {name!r} needs merge settings")
    if name == "tomediff":
        return TomediffVariant(settings)
    if name == "ideal":
        return TomediffVariant(settings, ideal=True)
    if name == "tomesd":
        if tomesd_version() is None:
            raise ValueError("--compare tomesd needs tomesd installed: pip install tomesd==0.1.3")
        return TomesdVariant(settings)
    raise ValueError(f"Unknown variant {name!r}; choose from: {', '.join(ALL_VARIANTS)}.")
