"""Reducers: what plan a block call gets.

* :class:`MatchReducer`: ToMe for SD's similarity matching (:func:`tomediff.ops.plan_merge`).
* :class:`DownsampleReducer`: ToDo's downsampled grid for keys and values.
* :class:`ReusingReducer`: an earlier plan, shared across a level's blocks or kept for ``k`` calls.
* :class:`GroupedReducer`: a plan per image for a call holding several (an edit model's references).

A reducer knows nothing of hooks or sites; :mod:`tomediff.core.actions` applies its plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from tomediff.config import ToMeConfig
from tomediff.core.selection import LevelSetting
from tomediff.core.spec import TokenGroups
from tomediff.ops import (
    GridDownsample,
    Partition,
    PlanConstants,
    SharedMergePlan,
    TokenPlan,
    combine_group_plans,
    grid_partition,
    group_starts,
    num_windows,
    plan_constants,
    plan_merge,
    shared_metric,
    window_tokens,
)

if TYPE_CHECKING:
    from tomediff.core.state import CallState, ToMeState
    from tomediff.ops.downsample import DownsampleMode

__all__ = [
    "DownsampleReducer",
    "GroupedReducer",
    "MatchReducer",
    "PlanRequest",
    "Reducer",
    "ReusingReducer",
    "WrappingReducer",
    "cached",
]

T = TypeVar("T")


def cached(cache: dict[Any, T], key: Any, build: Callable[[], T]) -> T:
    """``build()``, kept in ``cache`` under ``key`` in eager mode. Under torch.compile it is built
    inline: it is traced once into the graph, and reading a cache would add guards on it."""
    if torch.compiler.is_compiling():
        return build()
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
    return value


@dataclass(frozen=True, eq=False)
class PlanRequest:
    """One block call asking for a plan.

    Attributes:
        metric: ``[B, N, C]`` the block's input, ``N = height * width`` (row-major grid).
        level: the block's downsample level (None when it cannot be told).
        setting: the ratio / factor the selection gives that level.
        block_index: the block's position among the patched blocks.
        block_name: its qualified name (for messages).
        batch_shared: the plan must reduce every batch element alike and say which token's position
            each slot keeps (a rotary table shared by the batch is reduced with it).
        frames: for a video, the number of frames stacked in ``height`` (each ``height // frames`` rows).
        groups: the call's image tokens are several images (an edit model's output image then its
            references), ``N = groups.num_tokens``; ``height``, ``width`` and ``frames`` are then the
            first group's. Only a reducer whose :meth:`Reducer.plans_groups` is true gets such requests;
            :class:`GroupedReducer` asks its inner reducer once per group, with ``groups=None``.
    """

    metric: torch.Tensor
    height: int
    width: int
    level: int | None
    setting: LevelSetting
    block_index: int
    block_name: str
    batch_shared: bool = False
    frames: int = 1
    groups: TokenGroups | None = None


class Reducer:
    """What plan a block call gets. One instance per patch, shared by the threads calling the model."""

    def draws_per_call(self) -> bool:
        """Whether :meth:`begin_call` draws random numbers (it then runs eagerly under torch.compile)."""
        return False

    def begin_call(self, state: ToMeState, call: CallState, sample: object) -> None:
        """Prepare a model call (e.g. draw its random numbers) before any block runs."""

    def grids_read(self, state: ToMeState, call: CallState) -> None:
        """Prepare a model call once every grid source has read its grid (still before the blocks)."""

    def keeps_between_calls(self) -> bool:
        """Whether plans (or caches) outlive a model call: the calls' timesteps and the caller's
        generations are then read, and compiled calls are refused."""
        return False

    def plans_groups(self) -> bool:
        """Whether :meth:`plan` takes requests with :attr:`PlanRequest.groups` (several images)."""
        return False

    def plan(self, state: ToMeState, request: PlanRequest) -> Any:
        """The plan of one block call, or None to leave the block unreduced."""
        raise NotImplementedError

    def report_lines(self) -> list[str]:
        """Lines the patch's report adds about what the reducer did (none by default)."""
        return []

    def nothing_reason(self, request: PlanRequest) -> str | None:
        """Why :meth:`plan` returned None although the block was selected, if the settings are to
        blame (said once as a warning); None when that was intended (e.g. ratio 0)."""
        return None


def _images(read: tuple[int, ...] | TokenGroups | None) -> tuple[tuple[int, ...], ...]:
    """The image grids a grid source read: one, one per image of an edit model's call, or none."""
    if read is None:
        return ()
    return read.grids if isinstance(read, TokenGroups) else (read,)


def _stacked(grid: tuple[int, ...]) -> tuple[int, int]:
    """``(h, w)``, or a video's ``(frames, h, w)`` as its frames stacked: ``(frames * h, w)``."""
    return (grid[0] * grid[1], grid[2]) if len(grid) == 3 else (grid[0], grid[1])


class MatchReducer(Reducer):
    """ToMe for SD: a dst token per ``sx × sy`` window, the ``r`` src tokens most similar to their best
    dst merged into it (:func:`tomediff.ops.plan_merge`). With ``reuse_cfg`` the two halves of a
    classifier-free-guidance batch share the plan matched on the conditional half (which half, and
    whether a batch is such a pair: :meth:`ToMeState.conditional_half`)."""

    def __init__(self, config: ToMeConfig) -> None:
        self.config = config
        # Built once per shape and device and shared by the threads; the values are constant tensors.
        self._partitions: dict[tuple[int, int, int, str], Partition] = {}
        self._window_tables: dict[tuple[int, int, int, str], torch.Tensor] = {}
        self._constants: dict[tuple[int, int, int, int, str], PlanConstants] = {}

    def draws_per_call(self) -> bool:
        return self.config.use_rand

    def begin_call(self, state: ToMeState, call: CallState, sample: object) -> None:
        """One draw per call for every block's random partition (one host-to-device copy per call):
        here when the model input is a ``[B, C, H, W]`` map, which tells the call's largest grid;
        otherwise (``[B, N, C]`` packed tokens as Flux takes, video latents) once the call's grid
        sources have read their grids (:meth:`grids_read`), else at the first block that needs it."""
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            return
        if self.random_partition(state, int(sample.shape[0])):
            self._draw_offsets(state, call, int(sample.shape[-2]), int(sample.shape[-1]), sample.device)

    def grids_read(self, state: ToMeState, call: CallState) -> None:
        """The draw of a call whose model input did not tell its grid, made before the blocks: a block
        compiled on its own (regional compilation, ``fullgraph=True``) cannot draw from the CPU generator.
        The grids read are every grid the blocks can see, so the table is the one the first block would
        draw."""
        if call.offsets is not None or call.batch is None or call.device is None:
            return
        grids = [_stacked(g) for read in call.grids.values() for g in _images(read)]
        if grids and self.random_partition(state, call.batch):
            self._draw_offsets(state, call, *grids[0], call.device)

    def random_partition(self, state: ToMeState, batch: int) -> bool:
        """Whether a block call with ``batch`` samples gets a random partition (else the top-left one).

        An odd batch may be one half of classifier-free guidance run as its own call; the two halves
        would then get different random partitions, so (as tomesd does) it falls back to top-left,
        unless the model family's calls carry whole predictions (``ToMeState.odd_batch_top_left``)."""
        return self.config.use_rand and (batch % 2 == 0 or not state.odd_batch_top_left)

    @torch.compiler.disable  # a CPU generator draw cannot be traced: run eagerly, at most once per call
    def _draw_offsets(
        self, state: ToMeState, call: CallState, height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """Draw the call's offsets for the grid with the most windows among ``height × width`` and those
        the call has recorded so far (its grid sources, its input size), so one draw serves every block."""
        cfg = self.config
        # A video grid (frames, h, w) has at most as many windows as its frames stacked into one grid.
        grids = [(height, width), *(_stacked(g) for read in call.grids.values() for g in _images(read))]
        if call.input_size is not None:
            grids.append(call.input_size)
        windows = max(max(1, num_windows(h, w, cfg.sx, cfg.sy)) for h, w in grids)
        # int64: the blocks use them as gather indices as they are, without a conversion kernel.
        window_size = cfg.sx * cfg.sy * cfg.st
        offsets = torch.randint(window_size, (state.num_blocks, windows), generator=state.generator)
        call.offsets = offsets.to(device, non_blocking=True)
        return call.offsets

    def plan(self, state: ToMeState, request: PlanRequest) -> TokenPlan | None:
        metric = request.metric
        batch, num_tokens, _ = metric.shape
        num_remove = int(num_tokens * request.setting.ratio)
        if num_remove <= 0:
            return None
        device = metric.device
        partition = self.partition(
            state, request.height, request.width, batch, device, request.block_index, request.frames
        )
        num_remove = min(num_remove, partition.num_src)
        if num_remove <= 0 or partition.num_dst == 0:
            return None
        conditional = state.conditional_half(batch)
        if conditional is not None:  # a guidance pair: match on the conditional half
            metric = metric[conditional]
        if request.batch_shared:  # one plan for the batch, matched on the mean cosine similarity
            constants = self._plan_constants(1, partition, num_remove, device)
            shared = plan_merge(shared_metric(metric), partition, num_remove, constants=constants)
            return None if shared is None else SharedMergePlan.build(shared, partition.dst_idx, batch)
        constants = self._plan_constants(metric.shape[0], partition, num_remove, device)
        plan = plan_merge(metric, partition, num_remove, constants=constants)
        return plan.repeat_batch(2) if conditional is not None and plan is not None else plan

    def nothing_reason(self, request: PlanRequest) -> str | None:
        cfg, height, width = self.config, request.height, request.width
        if request.setting.ratio == 0:  # ratio 0 turns merging off on purpose
            return None
        if height < cfg.sy or width < cfg.sx:
            return (
                f"its {height}x{width} token grid has no full {cfg.sx}x{cfg.sy} window "
                f"(sx={cfg.sx}, sy={cfg.sy}). Use smaller sx/sy, or limit the levels merged"
            )
        return (
            f"ratio={request.setting.ratio} removes less than one of its {height * width} tokens. "
            "Use a larger ratio, or limit the levels merged"
        )

    def partition(
        self,
        state: ToMeState,
        height: int,
        width: int,
        batch: int,
        device: torch.device,
        block_index: int = 0,
        frames: int = 1,
    ) -> Partition:
        """The dst/src partition of a block's grid (``frames`` frames stacked in ``height``: windows of
        ``st`` frames, never crossing others)."""
        cfg = self.config
        st = cfg.st if frames > 1 else 1
        random = self.random_partition(state, batch)
        if cfg.use_rand and not torch.compiler.is_compiling():  # what the report says was used
            state.partition_used = "random" if random else f"top-left (odd batch of {batch})"
        if random:
            windows = num_windows(height, width, cfg.sx, cfg.sy, frames, st)
            call = state.call
            table = call.offsets
            if table is None or table.shape[1] < windows:
                # Not drawn when the call began (no [B, C, H, W] model input): drawn now, once for the call.
                table = self._draw_offsets(state, call, height, width, device)
            offsets = table[block_index, :windows].to(device)  # a no-op on the table's device
            if st < cfg.st:  # drawn for st-frame windows, used in one frame: still uniform
                offsets = offsets.remainder(cfg.sx * cfg.sy)
            windows_table = self._windows(height, width, device, frames, st)
            return grid_partition(
                height, width, cfg.sx, cfg.sy, offsets, windows=windows_table, frames=frames, st=st
            )
        key = (height, width, frames, str(device))
        return cached(self._partitions, key, lambda: self._fixed_partition(height, width, device, frames, st))

    def _windows(self, height: int, width: int, device: torch.device, frames: int, st: int) -> torch.Tensor:
        sx, sy = self.config.sx, self.config.sy
        key = (height, width, frames, str(device))
        return cached(
            self._window_tables, key, lambda: window_tokens(height, width, sx, sy, device, frames, st)
        )

    def _fixed_partition(
        self, height: int, width: int, device: torch.device, frames: int, st: int
    ) -> Partition:
        cfg = self.config
        windows = num_windows(height, width, cfg.sx, cfg.sy, frames, st)
        offsets = torch.zeros(windows, dtype=torch.int64, device=device)
        return grid_partition(height, width, cfg.sx, cfg.sy, offsets, frames=frames, st=st)

    def _plan_constants(
        self, batch: int, partition: Partition, num_remove: int, device: torch.device
    ) -> PlanConstants:
        num_dst, num_src = partition.num_dst, partition.num_src
        key = (batch, num_dst, num_src, num_remove, str(device))
        return cached(
            self._constants, key, lambda: plan_constants(batch, num_dst, num_src, num_remove, device)
        )


class DownsampleReducer(Reducer):
    """ToDo: the keys and values of self-attention come from the grid downsampled by the level's
    factor (``downsample_factor`` / ``downsample_factor_next``); no matching."""

    def __init__(self, config: ToMeConfig) -> None:
        self.config = config

    def plan(self, state: ToMeState, request: PlanRequest) -> GridDownsample | None:
        factor = request.setting.factor
        if factor <= 1:
            return None
        batch = request.metric.shape[0]
        # ToMeConfig validates downsample_mode against DOWNSAMPLE_MODES.
        mode = cast("DownsampleMode", self.config.downsample_mode)
        time_factor = self.config.downsample_factor_time if request.frames > 1 else 1
        plan = GridDownsample.build(
            batch, request.height, request.width, factor, mode, request.frames, time_factor
        )
        return plan if plan.num_merged < plan.num_tokens else None

    def nothing_reason(self, request: PlanRequest) -> str | None:
        if request.setting.factor <= 1:
            return None
        return f"its {request.height}x{request.width} token grid is a single token"


_MISSING = object()


class WrappingReducer(Reducer):
    """A reducer around another one (``inner``: plan reuse, one plan per image, separate key/value plans):
    everything it is not told otherwise it asks ``inner``; subclasses change :meth:`plan` and what else
    their wrapping changes."""

    def __init__(self, inner: Reducer) -> None:
        self.inner = inner

    def draws_per_call(self) -> bool:
        return self.inner.draws_per_call()

    def begin_call(self, state: ToMeState, call: CallState, sample: object) -> None:
        self.inner.begin_call(state, call, sample)

    def grids_read(self, state: ToMeState, call: CallState) -> None:
        self.inner.grids_read(state, call)

    def keeps_between_calls(self) -> bool:
        return self.inner.keeps_between_calls()

    def plans_groups(self) -> bool:
        return self.inner.plans_groups()

    def report_lines(self) -> list[str]:
        return self.inner.report_lines()

    def nothing_reason(self, request: PlanRequest) -> str | None:
        return self.inner.nothing_reason(request)

    def plan(self, state: ToMeState, request: PlanRequest) -> Any:
        return self.inner.plan(state, request)


class ReusingReducer(WrappingReducer):
    """Reuses the plans of another reducer: within a call across the blocks of a level (``level``),
    and across calls, recomputing a block's plan only every ``steps``-th call.

    A kept plan is reused only for the same batch size, grid and device, by the same call of a later step
    (the first or second call at a timestep: the two halves of a guidance step run as two calls keep
    plans of their own), within one generation of the thread that made it (see
    :class:`tomediff.core.state.ThreadMemory`). Its age is counted in denoising steps."""

    def __init__(self, inner: Reducer, level: bool, steps: int) -> None:
        super().__init__(inner)
        self.level = level
        self.steps = steps

    def keeps_between_calls(self) -> bool:
        return self.steps > 1 or self.inner.keeps_between_calls()

    def plan(self, state: ToMeState, request: PlanRequest) -> Any:
        batch, device = request.metric.shape[0], str(request.metric.device)
        # The group layout is part of the key: a plan for one image never serves a call with references.
        grid = (request.height, request.width, request.groups)
        if self.level:
            key: tuple[object, ...] = ("level", request.level, *grid, batch, device)
        else:
            key = ("block", request.block_index, *grid, batch, device)
        call = state.call
        if self.level and key in call.shared_plans:
            return call.shared_plans[key]
        plan: Any = _MISSING
        memory = state.thread_memory() if self.steps > 1 else None
        if memory is not None:  # eager only: ToMeState refuses reuse_steps in compiled calls
            key = (*key, memory.repeat)
            kept = memory.plans.get(key)
            if kept is not None and memory.steps - kept[1] < self.steps and kept[2] == memory.generation:
                plan = kept[0]
        if plan is _MISSING:
            plan = self.inner.plan(state, request)
            if memory is not None:
                memory.plans[key] = (plan, memory.steps, memory.generation)
        if self.level:
            call.shared_plans[key] = plan
        return plan


class GroupedReducer(WrappingReducer):
    """Plans a call whose image tokens are several images (:attr:`PlanRequest.groups`: an edit model's
    output image then its reference images) one image at a time, each on its own grid, and combines
    the plans (:class:`~tomediff.ops.GroupedPlan`, :class:`~tomediff.ops.GroupedDownsample`), so no
    token is merged with another image's. The output images are planned by ``inner`` with the request's
    setting; the reference images by ``reference`` at ``reference_ratio`` (queries and keys/values
    alike), or, when ``reference`` is None, by ``inner`` as the output images. Requests of one image
    go to ``inner`` as they are."""

    def __init__(
        self, inner: Reducer, reference: Reducer | None = None, reference_ratio: float | None = None
    ) -> None:
        if (reference is None) != (reference_ratio is None):
            raise ValueError("GroupedReducer takes a reference reducer and its reference_ratio together.")
        super().__init__(inner)
        self.reference = reference
        self.reference_ratio = reference_ratio

    def plans_groups(self) -> bool:
        return True

    def nothing_reason(self, request: PlanRequest) -> str | None:
        groups = request.groups
        if groups is None:
            return self.inner.nothing_reason(request)
        return self.inner.nothing_reason(self.group_requests(request)[0])  # what the output image's ratio did

    def group_requests(self, request: PlanRequest) -> list[PlanRequest]:
        """One request per group of ``request.groups``: its slice of the metric, its own grid, and for a
        reference image (with a ``reference`` reducer) the setting ``reference_ratio``."""
        groups = request.groups
        assert groups is not None
        requests = []
        for index, (grid, size, start) in enumerate(
            zip(groups.grids, groups.sizes, group_starts(groups.sizes), strict=True)
        ):
            setting = request.setting
            if groups.is_reference(index) and self.reference_ratio is not None:
                setting = LevelSetting(self.reference_ratio, setting.factor)
            height, width = _stacked(grid)
            requests.append(
                dataclasses.replace(
                    request,
                    metric=request.metric[:, start : start + size],
                    height=height,
                    width=width,
                    frames=grid[0] if len(grid) == 3 else 1,
                    setting=setting,
                    groups=None,
                )
            )
        return requests

    def plan(self, state: ToMeState, request: PlanRequest) -> Any:
        groups = request.groups
        if groups is None:
            return self.inner.plan(state, request)
        plans = []
        for index, group_request in enumerate(self.group_requests(request)):
            reducer = self.inner
            if groups.is_reference(index) and self.reference is not None:
                reducer = self.reference
            plans.append(reducer.plan(state, group_request))
        return combine_group_plans(
            plans, groups.sizes, int(request.metric.shape[0]), f"block '{request.block_name}'"
        )
