"""Per-patch state: the configuration, the private RNG, image size of the current call, caches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tomediff.config import ToMeConfig
from tomediff.ops import KeepPlan, Partition, TokenPlan, draw_dst_offsets, grid_partition, plan_merge

__all__ = ["BlockStats", "Planner", "ToMeState", "downsampled_size"]

Planner = Literal["similarity", "ideal"]


def downsampled_size(size: int, factor: int) -> int:
    """Size after ``log2(factor)`` stride-2 downsamplings with padding (``ceil`` each time)."""
    while factor > 1:
        size = math.ceil(size / 2)
        factor //= 2
    return size


@dataclass
class BlockStats:
    """What the last call of one block did."""

    height: int
    width: int
    downsample: int | None
    tokens: int
    tokens_after_merge: int

    @property
    def removed(self) -> int:
        return self.tokens - self.tokens_after_merge


class ToMeState:
    """Shared by all hooks of one patched model.

    Attributes:
        config: the validated settings.
        max_downsample: the resolved level limit (``config.max_downsample`` or the highest-resolution
            level with transformer blocks).
        planner: ``"similarity"`` (ToMe) or ``"ideal"`` (keep-and-copy reference, for benchmarks).
        input_size: ``(H, W)`` of the current call's ``[B, C, H, W]`` model input, if it had one.
        grids: token grid recorded by each grid-source hook for the current call.
    """

    def __init__(self, config: ToMeConfig, max_downsample: int, planner: Planner = "similarity") -> None:
        if planner not in ("similarity", "ideal"):
            raise ValueError(f"planner must be 'similarity' or 'ideal', got {planner!r}.")
        self.config = config
        self.max_downsample = max_downsample
        self.planner: Planner = planner
        self.generator = config.generator if config.generator is not None else torch.Generator()
        if config.generator is None:
            self.generator.manual_seed(config.seed)
        self.input_size: tuple[int, int] | None = None
        self.grids: dict[int, tuple[int, int]] = {}
        self.stats: dict[str, BlockStats] = {}
        self.calls = 0
        self._partitions: dict[tuple[int, int, str], Partition] = {}
        self._keep_plans: dict[tuple[int, int, int, str], KeepPlan] = {}

    def reseed(self, seed: int | None = None) -> None:
        """Restart the partition RNG (from ``seed``, default the config's seed)."""
        self.generator.manual_seed(self.config.seed if seed is None else seed)

    def grid_for_downsample(self, factor: int) -> tuple[int, int] | None:
        """Token grid of a UNet level downsampled ``factor`` times, from the model's input size."""
        if self.input_size is None:
            return None
        return downsampled_size(self.input_size[0], factor), downsampled_size(self.input_size[1], factor)

    def infer_level(self, height: int, width: int) -> int | None:
        """The downsample factor whose grid matches ``height × width`` (None if the input size is unknown)."""
        if self.input_size is None:
            return None
        factor = 1
        while factor <= max(self.input_size):
            if self.grid_for_downsample(factor) == (height, width):
                return factor
            factor *= 2
        return None

    def make_plan(self, metric: torch.Tensor, height: int, width: int) -> TokenPlan | None:
        """The merge plan for one block call whose input is ``metric: [B, N, C]``, ``N = h * w``."""
        batch, num_tokens, _ = metric.shape
        num_remove = int(num_tokens * self.config.ratio)
        if num_remove <= 0:
            return None
        device = metric.device
        if self.planner == "ideal":
            key = (batch, num_tokens, num_tokens - num_remove, str(device))
            plan = self._keep_plans.get(key)
            if plan is None:
                plan = self._keep_plans[key] = KeepPlan.build(
                    batch, num_tokens, num_tokens - num_remove, device
                )
            return plan
        return plan_merge(metric, self.partition(height, width, batch, device), num_remove)

    def partition(self, height: int, width: int, batch: int, device: torch.device) -> Partition:
        cfg = self.config
        # An odd batch means cond and uncond halves of CFG run in separate calls; a random partition
        # would then differ between them, so (as tomesd does) fall back to the fixed top-left one.
        if cfg.use_rand and batch % 2 == 0:
            offsets = draw_dst_offsets(height, width, cfg.sx, cfg.sy, self.generator)
            return grid_partition(height, width, cfg.sx, cfg.sy, offsets, device)
        key = (height, width, str(device))
        part = self._partitions.get(key)
        if part is None:
            offsets = draw_dst_offsets(height, width, cfg.sx, cfg.sy, None)
            part = self._partitions[key] = grid_partition(height, width, cfg.sx, cfg.sy, offsets, device)
        return part
