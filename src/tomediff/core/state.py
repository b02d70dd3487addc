"""Per-patch state (configuration, private RNG, caches) and per-call state (one per model call and thread)."""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tomediff.config import ToMeConfig
from tomediff.core.methods import Method
from tomediff.core.reducers import PlanRequest, Reducer, WrappingReducer
from tomediff.core.selection import Selection
from tomediff.core.spec import Caller, TokenGroups
from tomediff.errors import MergeCallError

__all__ = ["BlockStats", "CallState", "PlanEvent", "ThreadMemory", "ToMeState", "downsampled_size"]


def downsampled_size(size: int, factor: int) -> int:
    """Size after ``log2(factor)`` stride-2 downsamplings with padding (``ceil`` each time)."""
    while factor > 1:
        size = math.ceil(size / 2)
        factor //= 2
    return size


@dataclass
class BlockStats:
    """What the last call of one block did. ``height × width`` is its image's grid; a call holding
    several images (an edit model's reference images) lists the others' grids in ``other_grids``, and
    ``tokens`` counts every image's tokens."""

    height: int
    width: int
    downsample: int | None
    tokens: int
    tokens_after_merge: int
    other_grids: tuple[tuple[int, ...], ...] = ()

    @property
    def removed(self) -> int:
        return self.tokens - self.tokens_after_merge


@dataclass(frozen=True)
class PlanEvent:
    """A plan made for one block call, as seen by an observer (see ``ToMeHandle.watch``).

    Attributes:
        block: the block's qualified name.
        call: which model call of the calling thread made it (1 for the thread's first call of the
            patched model; each thread counts its own calls, so an observer can pick one call of
            each thread when several threads share a patched model).
        height, width: the block's token grid (``N = height * width`` tokens, row-major).
        plan: the plan itself (for merging, a :class:`tomediff.ops.MergePlan`, whose ``local_slot``
            gives each token's group). For a call holding several images (an edit model's reference
            images), the output image's own plan, grid and tokens.
    """

    block: str
    call: int
    height: int
    width: int
    plan: Any


@dataclass
class CallState:
    """What one call of the patched model knows, private to the thread making it.

    Attributes:
        input_size: ``(H, W)`` of the call's ``[B, C, H, W]`` model input, if it had one.
        grids: token grid recorded by each grid-source hook (by the source's index) in this call (the
            images' :class:`~tomediff.core.spec.TokenGroups` for a call holding several).
        offsets: ``[blocks, windows]`` dst offsets drawn for this call when partitions are random
            (row ``i`` for block ``i``, as many windows as the full-resolution grid has); else None.
        plans: the plan of each block (by index) while that block runs.
        requests: what each running block (by index) asks of the reducer, until its first site makes
            the plan from it (a block whose sites never run is never planned).
        sites_left: sites of each running block whose action still needs the plan.
        active: whether the step schedule has the method on in this call.
        shared_plans: plans shared by several blocks within this call (``reuse_level``).
        number: which call of its thread this is (1 for the first; 0 for blocks called outside a
            model call, or a compiled call that read nothing eagerly).
        inside: sites (their :class:`~tomediff.core.hooks.SiteCall` ids) reduced inside their module in
            this call, from their pre-hook to their post-hook, because a cache keeps the module's output.
        cfg_layout: with ``reuse_cfg`` and ``cfg_layout="auto"``, what the caller said of this call's
            batch: ``"uncond_cond"`` (a guidance pair), None (no pair), ``"auto"`` (it could not tell).
        batch, device: the batch size and device of the call's main input (a tensor, or Z-Image's list of
            per-sample latents); None when it has neither.
    """

    input_size: tuple[int, int] | None
    grids: dict[int, tuple[int, ...] | TokenGroups | None] = field(default_factory=dict)
    offsets: torch.Tensor | None = None
    plans: dict[int, Any] = field(default_factory=dict)
    requests: dict[int, PlanRequest] = field(default_factory=dict)
    sites_left: dict[int, int] = field(default_factory=dict)
    active: bool = True
    shared_plans: dict[tuple[object, ...], Any] = field(default_factory=dict)
    number: int = 0
    cfg_layout: str | None = "auto"
    inside: set[int] = field(default_factory=set)
    batch: int | None = None
    device: torch.device | None = None


@dataclass(eq=False)  # compared by identity: the patch keeps a weak set of them
class ThreadMemory:
    """What one thread's calls remember of earlier calls (plans kept by ``reuse_steps``).

    A generation's plans are never those of an earlier one. A generation starts where it is said to:
    at each call of the patched pipeline (its :class:`~tomediff.core.spec.Caller` tells), after
    ``handle.new_generation()`` in this thread, or after ``handle.reseed()`` in any thread. Else the
    timestep tells, as a fallback: within a generation it falls from step to step; a call at the
    timestep of the previous one is the other half of a classifier-free-guidance step run as two calls
    (``repeat`` 1, with plans of its own); a third call at one timestep, or a timestep going up, starts a
    new generation (a one-step model called at one timestep image after image therefore never reuses a
    plan). A generation cut short and followed by one starting below its last timestep looks like one
    generation to the timesteps alone: only a pipeline or ``new_generation()`` can tell.

    Attributes:
        calls: model calls this thread made.
        steps: denoising steps this thread saw (calls at a new timestep; every call when unknown).
        repeat: which call at the current timestep this is (0 first, 1 second).
        generation: generations this thread started.
        last_timestep: the timestep of the thread's previous call (None if unknown).
        plans: kept plans, by reuse key: ``(plan, step made at, generation)``.
        marked: ``handle.new_generation()`` was called in this thread since its last call.
        epoch: the patch's reseed count at this thread's last call.
        caller_generation: what the caller last said the generation was (compared with ``is``).
    """

    calls: int = 0
    steps: int = 0
    repeat: int = 0
    generation: int = 0
    last_timestep: float | None = None
    plans: dict[tuple[object, ...], tuple[Any, int, int]] = field(default_factory=dict)
    marked: bool = False
    epoch: int = 0
    caller_generation: object = None

    def advance(self, timestep: float | None, epoch: int = 0, caller_generation: object = None) -> None:
        """Account for a call at ``timestep``, made at the patch's reseed count ``epoch``, in the
        generation the caller calls ``caller_generation`` (None: it cannot tell)."""
        self.calls += 1
        last, self.last_timestep = self.last_timestep, timestep
        said = self.marked or epoch != self.epoch
        if caller_generation is not None:
            said = said or caller_generation is not self.caller_generation
            self.caller_generation = caller_generation
        self.marked, self.epoch = False, epoch
        if said:
            self._start_generation()
        elif timestep is None or last is None or timestep < last:
            self.steps, self.repeat = self.steps + 1, 0
        elif timestep == last and self.repeat == 0:
            self.repeat = 1
        else:  # the timestep went up, or a third call at one timestep
            self._start_generation()

    def _start_generation(self) -> None:
        self.generation += 1
        self.plans.clear()
        self.steps, self.repeat = self.steps + 1, 0


class ToMeState:
    """Shared by all hooks of one patched model.

    Attributes:
        config: the validated settings.
        selection: which blocks, sites and levels are active, and when.
        method: the reducer and the site actions.
        num_blocks: blocks patched.
        timestep_scale: the model's timestep horizon ``T`` (schedule progress is ``1 - t / T``).
        timestep_rises: the model is called with ``T - t`` (Z-Image, Lumina2: 0 at pure noise), which is
            turned back into ``t`` when read.
        odd_batch_top_left: whether ``use_rand`` falls back to the top-left partition for an odd batch
            (tomesd's rule, for families whose guidance halves may run as separate calls).
        partition_used: the partition the latest eager plan used with ``use_rand`` (for the report).
        stats: what each block's last call did, by block name (not updated while compiled; a block
            whose sites a cache skipped keeps those of its last run).
        calls: model calls so far (counted in eager mode, and compiled when a call draws or schedules).
        observers: called with a :class:`PlanEvent` for every plan made in an eager call.
        caller: the patched pipeline, asked at each call where a generation starts and whether the
            batch is a guidance pair (None for a model patched on its own, and in a pickled copy).
    """

    def __init__(
        self,
        config: ToMeConfig,
        selection: Selection,
        method: Method,
        num_blocks: int,
        timestep_scale: float = 1000.0,
        odd_batch_top_left: bool = True,
        caller: Caller | None = None,
        timestep_rises: bool = False,
    ) -> None:
        self.config = config
        self.selection = selection
        self.method = method
        self.num_blocks = num_blocks
        self.timestep_scale = timestep_scale
        self.timestep_rises = timestep_rises
        self.odd_batch_top_left = odd_batch_top_left
        self.partition_used: str | None = None
        self.generator = config.generator if config.generator is not None else torch.Generator()
        if config.generator is None:
            self.generator.manual_seed(config.seed)
        self.stats: dict[str, BlockStats] = {}
        self.calls = 0
        self.observers: list[Callable[[PlanEvent], None]] = []
        self._local = threading.local()
        self._latest_call: CallState | None = None
        self._warned: set[tuple[str, int, int]] = set()
        self._keeps = method.reducer.keeps_between_calls()  # plans or caches outlive a call
        self._reads_timestep = selection.has_schedule or self._keeps
        self._memories: weakref.WeakSet[ThreadMemory] = weakref.WeakSet()  # every thread's, to free
        self.caller = caller
        self._epoch = 0  # reseeds so far: every thread starts a new generation at its next call
        self._asks_guidance = config.reuse_cfg and config.cfg_layout == "auto"

    @property
    def max_downsample(self) -> int:
        return self.selection.max_downsample

    def __getstate__(self) -> dict[str, object]:
        # Per-call state is private to the threads of this process; a copy starts without calls.
        # Observers are callbacks of this process (often closures), so a copy starts without them; the
        # caller is held weakly (a pipeline), so a copy starts without it too (as a model on its own).
        skip = ("_local", "_latest_call", "observers", "caller", "_memories")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._memories = weakref.WeakSet()
        self._latest_call = None
        self.observers = []
        self.caller = None

    def notify(self, block: str, height: int, width: int, plan: Any) -> None:
        """Pass a new plan to the observers (eager calls only; compiled graphs skip observers)."""
        event = PlanEvent(block, self.call.number, height, width, plan)
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

    def thread_memory(self) -> ThreadMemory:
        """The calling thread's memory of its earlier calls."""
        memory = getattr(self._local, "memory", None)
        if memory is None:
            memory = self._local.memory = ThreadMemory()
            self._memories.add(memory)
        return memory

    def release(self) -> None:
        """Drop what every thread kept between calls (plans, token caches): the patch was removed."""
        for memory in list(self._memories):
            memory.plans.clear()

    def start_call(self, sample: object, timestep: object = None) -> None:
        """Begin a model call whose main input is ``sample`` (a ``[B, C, H, W]`` map for UNets/DiTs)
        at ``timestep`` (read only when a schedule or ``reuse_steps`` needs it)."""
        input_size: tuple[int, int] | None = None
        if isinstance(sample, torch.Tensor) and sample.dim() == 4:
            input_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        call = self._local.call = CallState(input_size)
        call.batch, call.device = _batch_and_device(sample)
        self._latest_call = call
        if not torch.compiler.is_compiling():
            self._begin(call, sample, timestep)
        elif self._reads_timestep or self._asks_guidance or self.method.reducer.draws_per_call():
            # Drawing from the CPU generator, reading the timestep or asking the caller cannot be
            # traced: it runs eagerly, before the blocks.
            self._begin_eagerly(call, sample, timestep)

    @torch.compiler.disable
    def _begin_eagerly(self, call: CallState, sample: object, timestep: object) -> None:
        if self.config.reuse_steps > 1:
            # Checked here, outside the traced code: a raise inside it would only break the graph.
            raise MergeCallError(
                f"reuse_steps={self.config.reuse_steps} keeps plans between model calls, which a compiled "
                "graph cannot; use reuse_steps=1 with torch.compile (reuse_level and reuse_cfg compile)."
            )
        if self._keeps:
            raise MergeCallError(
                f"method={self.config.method!r} keeps state between model calls, which a compiled graph "
                "cannot; run the model eagerly with it, or use method='merge' with torch.compile."
            )
        self._begin(call, sample, timestep)

    def progress(self, timestep: float) -> float:
        """The denoising progress ``1 - t / T`` at (falling) ``timestep``, clamped to [0, 1]: schedulers'
        first timestep may sit a little above ``T``, and their last one below 0."""
        return min(max(1.0 - timestep / self.timestep_scale, 0.0), 1.0)

    def _begin(self, call: CallState, sample: object, timestep: object) -> None:
        self.calls += 1
        memory = self.thread_memory()
        selection = self.selection
        t = _timestep_value(timestep) if self._reads_timestep else None
        if t is not None and self.timestep_rises:
            t = self.timestep_scale - t
        caller = self.caller
        generation = caller.generation() if caller is not None and self._keeps else None
        memory.advance(t, self._epoch, generation)
        call.number = memory.calls
        if selection.has_schedule:
            if t is None:
                raise MergeCallError(
                    f"start={self.config.start}/stop={self.config.stop} need the timestep of each "
                    f"model call, but this call passed none ({type(timestep).__name__}); call the "
                    "model with its timestep (as timestep=, or positionally where its forward takes it)."
                )
            call.active = selection.active_at(self.progress(t))
        if call.active:
            if self._asks_guidance and caller is not None:
                guided = caller.guidance(sample)
                call.cfg_layout = "auto" if guided is None else "uncond_cond" if guided else None
            self.method.reducer.begin_call(self, call, sample)

    def record_grid(self, index: int, grid: tuple[int, ...] | TokenGroups | None, num_sources: int) -> None:
        """Record the grid that grid source ``index`` read in the calling thread's call; once all
        ``num_sources`` have read theirs, the reducer may prepare the call (its random draw)."""
        call = self.call
        call.grids[index] = grid
        if len(call.grids) == num_sources and call.active:
            self.method.reducer.grids_read(self, call)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the partition RNG (from ``seed``, default the config's seed); every thread's next
        call starts a new generation (kept plans are dropped)."""
        self.generator.manual_seed(self.config.seed if seed is None else seed)
        self._epoch += 1

    def new_generation(self) -> None:
        """The calling thread's next model call starts a new generation (its kept plans are dropped)."""
        self.thread_memory().marked = True

    # Guidance pairs -------------------------------------------------------------------------------

    def conditional_half(self, batch: int) -> slice | None:
        """With ``reuse_cfg``: the rows of a block input of ``batch`` rows that hold the conditional half
        of a guidance pair (both halves get its plan); None when the call holds no pair."""
        if not self.config.reuse_cfg or batch % 2:
            return None
        layout: str | None = self.config.cfg_layout
        if layout == "auto":
            layout = self.call.cfg_layout
        if layout == "uncond_cond":
            return slice(batch // 2, None)
        if layout == "cond_uncond":
            return slice(None, batch // 2)
        if layout is None:
            return None
        if self.caller is None:
            why = "the model was patched on its own, so nothing says whether guidance is on"
            fix = "apply tomediff to the pipeline instead (apply_tome(pipe, ...)), set"
        else:
            why = f"its caller, {self.caller.name}, does not say whether this call is guided"
            fix = "set"
        raise MergeCallError(
            f"reuse_cfg=True gives both halves of a classifier-free-guidance batch one plan, but tomediff "
            f"cannot tell whether this batch of {batch} is such a pair: {why}. To fix it, {fix} "
            "cfg_layout='uncond_cond' if every even batch is [unconditional, conditional] (diffusers' "
            "order) or cfg_layout='cond_uncond' if it is [conditional, unconditional], or use "
            "reuse_cfg=False."
        )

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

    def make_plan(self, request: PlanRequest) -> Any:
        """The plan of one block call (None: the block runs unreduced), warning once when the
        settings leave a selected block unreduced."""
        reducer = self.method.reducer
        if request.groups is not None and not reducer.plans_groups():
            raise MergeCallError(
                f"block '{request.block_name}' receives the tokens of {len(request.groups.grids)} images "
                f"(grids {list(request.groups.grids)}: an edit model's output image and its reference "
                f"images), but {type(_given(reducer)).__name__} plans one image grid per block call. Use "
                "method='merge' or 'downsample' for such calls, or run them without tomediff."
            )
        plan = reducer.plan(self, request)
        if plan is not None and not all(hasattr(plan, a) for a in ("batch", "num_tokens", "num_merged")):
            raise MergeCallError(
                f"{type(_given(reducer)).__name__}.plan returned a {type(plan).__name__} for block "
                f"'{request.block_name}'; a reducer must return None or a plan with batch, num_tokens and "
                "num_merged (and what the site actions use: merge/unmerge, or reduce)."
            )
        if plan is None and not torch.compiler.is_compiling():
            reason = reducer.nothing_reason(request)
            key = (request.block_name, request.height, request.width)
            if reason is not None and key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"tomediff reduces nothing in block '{request.block_name}': {reason}.",
                    UserWarning,
                    stacklevel=3,
                )
        return plan


def _given(reducer: Reducer) -> Reducer:
    """The reducer inside the wrappers every method gets (plan reuse, one plan per image, key/value
    plans), for messages."""
    while isinstance(reducer, WrappingReducer):
        reducer = reducer.inner
    return reducer


def _batch_and_device(sample: object) -> tuple[int | None, torch.device | None]:
    """The batch size and device of a model call's main input: a batch-first tensor, or a list of
    per-sample tensors (Z-Image's latents)."""
    if isinstance(sample, torch.Tensor) and sample.dim() >= 2:
        return int(sample.shape[0]), sample.device
    if isinstance(sample, (list, tuple)) and sample and all(isinstance(x, torch.Tensor) for x in sample):
        return len(sample), sample[0].device
    return None, None


def _timestep_value(timestep: object) -> float | None:
    """The call's timestep as a float (the first one of a per-sample tensor); None when absent."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    return None
