"""Per-patch state (configuration, private RNG, caches) and per-call state (one per model call and thread)."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from tomediff.config import ToMeConfig
from tomediff.errors import ConfigError
from tomediff.ops import (
    KeepPlan,
    Partition,
    PlanConstants,
    TokenPlan,
    draw_dst_offsets,
    grid_partition,
    num_windows,
    plan_constants,
    plan_merge,
    window_tokens,
)

__all__ = ["BlockStats", "CallState", "PlanEvent", "Planner", "ToMeState", "downsampled_size"]

Planner = Literal["similarity", "ideal"]
T = TypeVar("T")


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


@dataclass(frozen=True)
class PlanEvent:
    """A plan made for one block call, as seen by an observer (see ``ToMeHandle.watch``).

    Attributes:
        block: the block's qualified name.
        call: which model call of the patch made it (1 for the first call).
        height, width: the block's token grid (``N = height * width`` tokens, row-major).
        plan: the plan itself (for merging, a :class:`tomediff.ops.MergePlan`, whose ``local_slot``
            gives each token's group).
    """

    block: str
    call: int
    height: int
    width: int
    plan: TokenPlan


@dataclass
class CallState:
    """What one call of the patched model knows, private to the thread making it.

    Attributes:
        input_size: ``(H, W)`` of the call's ``[B, C, H, W]`` model input, if it had one.
        grids: token grid recorded by each grid-source hook (by the source's index) in this call.
        offsets: ``[blocks, windows]`` dst offsets drawn for this call when partitions are random
            (row ``i`` for block ``i``, as many windows as the full-resolution grid has); else None.
        plans: the plan of each block (by index) while that block runs.
        sites_left: merge sites of each running block not yet unmerged.
    """

    input_size: tuple[int, int] | None
    grids: dict[int, tuple[int, int] | None] = field(default_factory=dict)
    offsets: torch.Tensor | None = None
    plans: dict[int, TokenPlan | None] = field(default_factory=dict)
    sites_left: dict[int, int] = field(default_factory=dict)


class ToMeState:
    """Shared by all hooks of one patched model.

    Attributes:
        config: the validated settings.
        max_downsample: the resolved level limit (``config.max_downsample`` or the highest-resolution
            level with transformer blocks).
        planner: ``"similarity"`` (ToMe) or ``"ideal"`` (keep-and-copy reference, for benchmarks).
        stats: what each block's last call did, by block name (not updated while compiled).
        calls: model calls so far (counted in eager mode and, with ``use_rand``, compiled too).
    """

    def __init__(
        self, config: ToMeConfig, max_downsample: int, num_blocks: int, planner: Planner = "similarity"
    ) -> None:
        if planner not in ("similarity", "ideal"):
            raise ConfigError(f"planner must be 'similarity' or 'ideal', got {planner!r}.")
        self.config = config
        self.max_downsample = max_downsample
        self.num_blocks = num_blocks
        self.planner: Planner = planner
        self.generator = config.generator if config.generator is not None else torch.Generator()
        if config.generator is None:
            self.generator.manual_seed(config.seed)
        self.stats: dict[str, BlockStats] = {}
        self.calls = 0
        self._local = threading.local()
        self._latest_call: CallState | None = None
        self._warned: set[tuple[str, int, int]] = set()
        self.observers: list[Callable[[PlanEvent], None]] = []
        # Built once per shape and device and shared by the threads; the values are constant tensors.
        self._partitions: dict[tuple[int, int, str], Partition] = {}
        self._window_tables: dict[tuple[int, int, str], torch.Tensor] = {}
        self._constants: dict[tuple[int, int, int, int, str], PlanConstants] = {}
        self._keep_plans: dict[tuple[int, int, int, str], KeepPlan] = {}

    def __getstate__(self) -> dict[str, object]:
        # Per-call state is private to the threads of this process; a copy starts without calls.
        # Observers are callbacks of this process (often closures), so a copy starts without them.
        skip = ("_local", "_latest_call", "observers")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._latest_call = None
        self.observers = []

    def notify(self, block: str, height: int, width: int, plan: TokenPlan) -> None:
        """Pass a new plan to the observers (eager calls only; compiled graphs skip observers)."""
        event = PlanEvent(block, self.calls, height, width, plan)
        for observer in list(self.observers):
            observer(event)

    # Per-call state -------------------------------------------------------------------------------

    @property
    def call(self) -> CallState:
        """The state of the calling thread's current model call.

        A thread that started no call sees the latest call of any thread: that is how gradient
        checkpointing's recomputation, run by autograd's device threads during backward, reproduces
        the partitions of the forward call it recomputes."""
        call = getattr(self._local, "call", None)
        if call is None:
            call = self._latest_call
            if call is None:  # a block called directly, outside a patched model call
                call = self._latest_call = CallState(None)
        return call

    def start_call(self, sample: object) -> None:
        """Begin a model call whose main input is ``sample`` (a ``[B, C, H, W]`` map for UNets/DiTs)."""
        is_map = isinstance(sample, torch.Tensor) and sample.dim() == 4
        input_size = (int(sample.shape[-2]), int(sample.shape[-1])) if is_map else None
        call = self._local.call = CallState(input_size)
        self._latest_call = call
        if not torch.compiler.is_compiling():
            self.calls += 1
            call.offsets = self._draw_call_offsets(sample)
        elif self.config.use_rand:
            # The draw from the CPU generator cannot be traced: it runs eagerly, before the blocks.
            call.offsets = self._count_and_draw(sample)

    @torch.compiler.disable
    def _count_and_draw(self, sample: object) -> torch.Tensor | None:
        self.calls += 1
        return self._draw_call_offsets(sample)

    def _draw_call_offsets(self, sample: object) -> torch.Tensor | None:
        """One draw per call for every block's random partition (one host-to-device copy per call)."""
        cfg = self.config
        if not cfg.use_rand or self.planner != "similarity":
            return None
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[0] % 2:
            return None
        height, width = int(sample.shape[-2]), int(sample.shape[-1])
        windows = max(1, num_windows(height, width, cfg.sx, cfg.sy))
        # int64: the blocks use them as gather indices as they are, without a conversion kernel.
        offsets = torch.randint(cfg.sx * cfg.sy, (self.num_blocks, windows), generator=self.generator)
        return offsets.to(sample.device, non_blocking=True)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the partition RNG (from ``seed``, default the config's seed)."""
        self.generator.manual_seed(self.config.seed if seed is None else seed)

    # Grids ----------------------------------------------------------------------------------------

    def grid_for_downsample(self, factor: int) -> tuple[int, int] | None:
        """Token grid of a UNet level downsampled ``factor`` times, from the model's input size."""
        input_size = self.call.input_size
        if input_size is None:
            return None
        return downsampled_size(input_size[0], factor), downsampled_size(input_size[1], factor)

    def infer_level(self, height: int, width: int) -> int | None:
        """The downsample factor whose grid matches ``height × width`` (None if the input size is unknown)."""
        input_size = self.call.input_size
        if input_size is None:
            return None
        factor = 1
        while factor <= max(input_size):
            if self.grid_for_downsample(factor) == (height, width):
                return factor
            factor *= 2
        return None

    # Plans ----------------------------------------------------------------------------------------

    def make_plan(self, metric: torch.Tensor, height: int, width: int, block_index: int) -> TokenPlan | None:
        """The merge plan for one block call whose input is ``metric: [B, N, C]``, ``N = h * w``."""
        batch, num_tokens, _ = metric.shape
        num_remove = int(num_tokens * self.config.ratio)
        if num_remove <= 0:
            return None
        device = metric.device
        if self.planner == "ideal":
            return self._keep_plan(batch, num_tokens, num_tokens - num_remove, device)
        partition = self.partition(height, width, batch, device, block_index)
        num_remove = min(num_remove, partition.num_src)
        if num_remove <= 0 or partition.num_dst == 0:
            return None
        constants = self._plan_constants(batch, partition, num_remove, device)
        return plan_merge(metric, partition, num_remove, constants=constants)

    def warn_merges_nothing(self, block_name: str, height: int, width: int) -> None:
        """Say (once per block and grid) that a patched block ran unmerged because of the settings."""
        key = (block_name, height, width)
        if key in self._warned or self.config.ratio == 0:  # ratio 0 turns merging off on purpose
            return
        self._warned.add(key)
        cfg = self.config
        reason = (
            f"its {height}x{width} token grid has no full {cfg.sx}x{cfg.sy} window (sx={cfg.sx}, sy={cfg.sy})"
            if height < cfg.sy or width < cfg.sx
            else f"ratio={cfg.ratio} removes less than one of its {height * width} tokens"
        )
        warnings.warn(
            f"tomediff merges nothing in block '{block_name}': {reason}. Use smaller sx/sy or a larger "
            "ratio, or limit max_downsample to the levels where merging applies.",
            UserWarning,
            stacklevel=2,
        )

    def partition(
        self, height: int, width: int, batch: int, device: torch.device, block_index: int = 0
    ) -> Partition:
        cfg = self.config
        # An odd batch means cond and uncond halves of CFG run in separate calls; a random partition
        # would then differ between them, so (as tomesd does) fall back to the fixed top-left one.
        if cfg.use_rand and batch % 2 == 0:
            windows = num_windows(height, width, cfg.sx, cfg.sy)
            table = self.call.offsets
            if table is not None and table.shape[1] >= windows and table.device == device:
                offsets = table[block_index, :windows]
            else:  # no per-call draw (no [B, C, H, W] model input): draw for this block alone
                offsets = draw_dst_offsets(height, width, cfg.sx, cfg.sy, self.generator).to(device)
            return grid_partition(
                height, width, cfg.sx, cfg.sy, offsets, windows=self._windows(height, width, device)
            )
        key = (height, width, str(device))
        return self._cached(self._partitions, key, lambda: self._fixed_partition(height, width, device))

    def _windows(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        sx, sy = self.config.sx, self.config.sy
        key = (height, width, str(device))
        return self._cached(self._window_tables, key, lambda: window_tokens(height, width, sx, sy, device))

    def _fixed_partition(self, height: int, width: int, device: torch.device) -> Partition:
        cfg = self.config
        offsets = torch.zeros(height // cfg.sy, width // cfg.sx, dtype=torch.int64, device=device)
        return grid_partition(height, width, cfg.sx, cfg.sy, offsets)

    def _plan_constants(
        self, batch: int, partition: Partition, num_remove: int, device: torch.device
    ) -> PlanConstants:
        num_dst, num_src = partition.num_dst, partition.num_src
        key = (batch, num_dst, num_src, num_remove, str(device))
        return self._cached(
            self._constants, key, lambda: plan_constants(batch, num_dst, num_src, num_remove, device)
        )

    def _keep_plan(self, batch: int, num_tokens: int, num_merged: int, device: torch.device) -> KeepPlan:
        key = (batch, num_tokens, num_merged, str(device))
        return self._cached(
            self._keep_plans, key, lambda: KeepPlan.build(batch, num_tokens, num_merged, device)
        )

    @staticmethod
    def _cached(cache: dict[Any, T], key: Any, build: Callable[[], T]) -> T:
        """``build()``, kept in ``cache`` under ``key`` in eager mode. Under torch.compile it is built
        inline: it is traced once into the graph, and reading a cache would add guards on it."""
        if torch.compiler.is_compiling():
            return build()
        value = cache.get(key)
        if value is None:
            value = cache[key] = build()
        return value
