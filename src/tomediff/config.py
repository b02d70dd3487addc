"""``ToMeConfig``: every knob of token merging, validated once, never mutated."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

__all__ = ["ToMeConfig"]


@dataclass(frozen=True)
class ToMeConfig:
    """Settings for token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023).

    Args:
        ratio: fraction of a block's image tokens removed by merging, ``r = int(ratio * N)``.
            0 disables merging (outputs are bit-identical to the unpatched model). The largest
            allowed value is ``1 - 1/(sx*sy)`` (every src token merged); 0.5 is the paper's
            recommended setting.
        max_downsample: merge only in transformer blocks whose token grid is downsampled at most
            this much relative to the model's full-resolution token grid (1, 2, 4 or 8 in a
            Stable Diffusion UNet). ``None`` (default) picks the highest-resolution level that has
            transformer blocks: 1 for SD 1.x/2.x and DiTs, 2 for SDXL, whose first level has none.
        sx: width of the window in which one destination (dst) token is chosen.
        sy: height of that window.
        use_rand: choose each window's dst token at random (from the library's own generator)
            instead of always the top-left one. Random choice avoids grid artifacts. As in tomesd,
            an odd batch size falls back to top-left: it means the conditional and unconditional
            halves of classifier-free guidance are not in the same call, and they must share the
            partition.
        merge_attn: merge tokens before self-attention (the main speed-up).
        merge_crossattn: merge tokens before cross-attention (its queries only).
        merge_mlp: merge tokens before the feed-forward layer (fast but hurts quality).
        seed: seed of the library's private generator for ``use_rand``. The same seed gives
            the same partitions in every process; the global torch RNG is never touched.
        generator: a ``torch.Generator`` to draw partitions from instead of a private one seeded
            with ``seed``. It is used as given (its state advances); must be a CPU generator so
            partitions do not depend on the model's device.
    """

    ratio: float = 0.5
    max_downsample: int | None = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0
    generator: torch.Generator | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer window size, got {value!r}.")
        if self.sx * self.sy < 2:
            raise ValueError(
                f"sx*sy must be at least 2 so each window has a src token to merge, got sx={self.sx}, "
                f"sy={self.sy}; use the default sx=2, sy=2."
            )
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio):
            raise ValueError(f"ratio must be a number in [0, {self.max_ratio:g}], got {ratio!r}.")
        if not 0.0 <= ratio <= self.max_ratio + 1e-12:
            raise ValueError(
                f"ratio={ratio!r} is outside [0, {self.max_ratio:g}]: with sx={self.sx}, sy={self.sy} "
                f"at most 1 - 1/(sx*sy) = {self.max_ratio:g} of the tokens can be merged. "
                "Lower ratio or use larger sx/sy."
            )
        md = self.max_downsample
        if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1):
            raise ValueError(
                f"max_downsample must be a positive integer (1, 2, 4, 8, ...) or None for "
                f"'highest-resolution level with transformer blocks', got {md!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError(
                "merge_attn, merge_crossattn and merge_mlp are all False, so nothing would be merged; "
                "enable at least one (merge_attn=True is the recommended default)."
            )
        gen = self.generator
        if gen is not None:
            if not isinstance(gen, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(gen).__name__}.")
            if gen.device.type != "cpu":
                raise ValueError(
                    f"generator must live on the CPU (got device {gen.device}); partitions are drawn "
                    "on the CPU so the same seed gives the same result on every device."
                )

    @property
    def max_ratio(self) -> float:
        """Largest mergeable fraction, ``1 - 1/(sx*sy)``."""
        return 1.0 - 1.0 / (self.sx * self.sy)

    def replace(self, **overrides: object) -> ToMeConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            names = ", ".join(sorted(unknown))
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"Unknown ToMeConfig option(s): {names}. Valid options: {valid}.")
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]
