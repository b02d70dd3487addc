"""Which blocks and sites are active, with which strength, and when: one place for levels, ratios,
downsampling factors, minimum token counts and the step schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tomediff.config import ToMeConfig
from tomediff.core.spec import BlockSpec, SiteKind
from tomediff.errors import NothingToPatchError

__all__ = ["LevelSetting", "Selection"]

_SITE_SWITCHES: dict[SiteKind, str] = {
    "attn": "merge_attn",
    "crossattn": "merge_crossattn",
    "mlp": "merge_mlp",
}


@dataclass(frozen=True)
class LevelSetting:
    """How strongly the blocks of one level are reduced: ``ratio`` for merging, ``factor`` for
    downsampling (the method reads the one it uses)."""

    ratio: float
    factor: int


class Selection:
    """The config's choice of blocks and sites, resolved against the levels a model has.

    Attributes:
        levels_found: downsample levels of the model's blocks (empty when only calls can tell).
        top_level: the highest-resolution level with blocks (1 when unknown).
        max_downsample: the deepest level selected.
    """

    def __init__(self, config: ToMeConfig, levels_found: Sequence[int]) -> None:
        self.config = config
        self.levels_found = tuple(sorted(set(levels_found)))
        self.top_level = self.levels_found[0] if self.levels_found else 1
        self._level_ratios = dict(config.level_ratios) if config.level_ratios is not None else None
        if self._level_ratios is not None:
            self.max_downsample = max(self._level_ratios)
        elif config.max_downsample is not None:
            self.max_downsample = config.max_downsample
        elif config.method == "downsample" and config.downsample_factor_next > 1:
            deeper = [level for level in self.levels_found if level > self.top_level]
            self.max_downsample = deeper[0] if deeper else self.top_level * 2
        else:
            self.max_downsample = self.top_level

    def setting(self, level: int | None) -> LevelSetting | None:
        """The setting of a block at ``level`` (None: unknown, treated as the top level), or None when
        that level is not selected."""
        cfg = self.config
        if level is None:
            level = self.top_level
        if self._level_ratios is not None:
            ratio = self._level_ratios.get(level)
            return None if ratio is None else LevelSetting(ratio, 1)
        if level > self.max_downsample:
            return None
        factor = cfg.downsample_factor if level <= self.top_level else cfg.downsample_factor_next
        return LevelSetting(cfg.ratio, factor)

    def site_enabled(self, kind: SiteKind) -> bool:
        return bool(getattr(self.config, _SITE_SWITCHES[kind]))

    def enabled_kinds(self) -> set[SiteKind]:
        return {kind for kind in _SITE_SWITCHES if self.site_enabled(kind)}

    def blocks(self, specs: Sequence[BlockSpec], model_name: str) -> list[BlockSpec]:
        """The blocks to hook: those at a selected level (or whose level only a call can tell), less the
        first and last ``skip_blocks`` of them.

        Raises:
            NothingToPatchError: the levels or sites selected leave nothing to reduce.
        """
        selected = [s for s in specs if s.downsample is None or self.setting(s.downsample) is not None]
        if not selected:
            cfg = self.config
            levels = list(self.levels_found)
            top = levels[0] if levels else 1
            if cfg.level_ratios is not None:
                chosen = f"level_ratios={dict(cfg.level_ratios)}"
                fix = f"give ratios for levels among {levels}"
            else:
                chosen = f"max_downsample={cfg.max_downsample}"
                fix = f"use max_downsample={top} or more (None: the highest-resolution level)"
            raise NothingToPatchError(
                f"{chosen} selects none of the {len(specs)} transformer blocks of {model_name}: they sit "
                f"at downsample levels {levels}. To merge, {fix}."
            )
        first, last = self.config.skip_blocks
        if first or last:
            kept = selected[first : len(selected) - last]
            if not kept:
                raise NothingToPatchError(
                    f"skip_blocks={self.config.skip_blocks} skips all {len(selected)} selected transformer "
                    f"blocks of {model_name}; skip fewer (first + last < {len(selected)})."
                )
            selected = kept
        enabled = self.enabled_kinds()
        if not any(site.kind in enabled for spec in selected for site in spec.sites):
            present = sorted({site.kind for spec in selected for site in spec.sites})
            # Blocks of other levels may have them (e.g. a UNet without self-attention at its top level).
            levels = sorted(
                {
                    spec.downsample
                    for spec in specs
                    if spec.downsample is not None and any(site.kind in enabled for site in spec.sites)
                }
            )
            elsewhere = ""
            if levels and self.config.level_ratios is None:
                elsewhere = (
                    f", or select the downsample levels {levels} whose blocks have them "
                    f"(max_downsample={levels[0]})"
                )
            raise NothingToPatchError(
                f"the enabled merge sites {sorted(enabled)} do not exist in the selected blocks of "
                f"{model_name} (they have {present}); enable one of those{elsewhere}."
            )
        return selected

    def block_active(self, num_tokens: int) -> bool:
        """Whether a block with ``num_tokens`` tokens is reduced at all (``min_tokens``)."""
        return num_tokens >= self.config.min_tokens

    @property
    def has_schedule(self) -> bool:
        return self.config.start > 0.0 or self.config.stop < 1.0

    def active_at(self, progress: float) -> bool:
        """Whether the schedule is on at denoising ``progress`` (in [0, 1], as :meth:`ToMeState.progress`
        gives it): in ``[start, stop)``, closed at 1 when ``stop == 1`` so that the final step (``t = 0``)
        counts as the end of ``[start, 1]`` exactly as it does for the unscheduled ``(0, 1)``; never when
        ``start == stop``."""
        start, stop = self.config.start, self.config.stop
        if start >= stop:
            return False
        return start <= progress and (progress < stop or stop == 1.0)
