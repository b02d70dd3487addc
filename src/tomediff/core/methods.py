"""The two seams every token-reduction method plugs into.

* A :class:`Reducer` decides what plan a block call gets: ToMe's similarity matching
  (:class:`MatchReducer`), a downsampled grid (:class:`DownsampleReducer`), or an earlier plan
  (:class:`ReusingReducer`, wrapping another reducer).
* A :class:`SiteAction` decides what happens around a submodule of the block with that plan: merge
  its input and unmerge its output (:class:`MergeAction`), or keep the queries and pass reduced keys
  and values (:class:`KeyValueAction`).

The hooks call these through the :class:`Method` a config builds (:func:`build_method`) and know
neither by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from tomediff.config import ToMeConfig
from tomediff.core.calls import Args, Kwargs, find_input, replace_input
from tomediff.core.selection import LevelSetting
from tomediff.core.spec import BlockSpec, Site, SiteKind
from tomediff.errors import ConfigError, MergeCallError
from tomediff.ops import (
    GridDownsample,
    Partition,
    PlanConstants,
    SharedMergePlan,
    TokenPlan,
    draw_dst_offsets,
    grid_partition,
    merge_trailing,
    num_windows,
    plan_constants,
    plan_merge,
    reduce_rotary,
    shared_metric,
    unmerge_trailing,
    window_tokens,
)

if TYPE_CHECKING:
    from tomediff.core.state import CallState, ToMeState

__all__ = [
    "DownsampleReducer",
    "ImageTokensMergeAction",
    "KeyValueAction",
    "MatchReducer",
    "MergeAction",
    "Method",
    "PlanRequest",
    "ReduceInputAction",
    "Reducer",
    "ReusingReducer",
    "SiteAction",
    "build_method",
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
    """

    metric: torch.Tensor
    height: int
    width: int
    level: int | None
    setting: LevelSetting
    block_index: int
    block_name: str
    batch_shared: bool = False


class Reducer:
    """What plan a block call gets. One instance per patch, shared by the threads calling the model."""

    def draws_per_call(self) -> bool:
        """Whether :meth:`begin_call` draws random numbers (it then runs eagerly under torch.compile)."""
        return False

    def begin_call(self, state: ToMeState, call: CallState, sample: object) -> None:
        """Prepare a model call (e.g. draw its random numbers) before any block runs."""

    def plan(self, state: ToMeState, request: PlanRequest) -> Any:
        """The plan of one block call, or None to leave the block unreduced."""
        raise NotImplementedError

    def nothing_reason(self, request: PlanRequest) -> str | None:
        """Why :meth:`plan` returned None although the block was selected, if the settings are to
        blame (said once as a warning); None when that was intended (e.g. ratio 0)."""
        return None


class MatchReducer(Reducer):
    """ToMe for SD: a dst token per ``sx × sy`` window, the ``r`` src tokens most similar to their best
    dst merged into it (:func:`tomediff.ops.plan_merge`). With ``reuse_cfg`` the two halves of a
    classifier-free-guidance batch share the plan matched on the conditional half."""

    def __init__(self, config: ToMeConfig) -> None:
        self.config = config
        # Built once per shape and device and shared by the threads; the values are constant tensors.
        self._partitions: dict[tuple[int, int, str], Partition] = {}
        self._window_tables: dict[tuple[int, int, str], torch.Tensor] = {}
        self._constants: dict[tuple[int, int, int, int, str], PlanConstants] = {}

    def draws_per_call(self) -> bool:
        return self.config.use_rand

    def begin_call(self, state: ToMeState, call: CallState, sample: object) -> None:
        """One draw per call for every block's random partition (one host-to-device copy per call)."""
        cfg = self.config
        if not cfg.use_rand:
            return
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[0] % 2:
            return
        height, width = int(sample.shape[-2]), int(sample.shape[-1])
        windows = max(1, num_windows(height, width, cfg.sx, cfg.sy))
        # int64: the blocks use them as gather indices as they are, without a conversion kernel.
        offsets = torch.randint(cfg.sx * cfg.sy, (state.num_blocks, windows), generator=state.generator)
        call.offsets = offsets.to(sample.device, non_blocking=True)

    def plan(self, state: ToMeState, request: PlanRequest) -> TokenPlan | None:
        metric = request.metric
        batch, num_tokens, _ = metric.shape
        num_remove = int(num_tokens * request.setting.ratio)
        if num_remove <= 0:
            return None
        device = metric.device
        partition = self.partition(state, request.height, request.width, batch, device, request.block_index)
        num_remove = min(num_remove, partition.num_src)
        if num_remove <= 0 or partition.num_dst == 0:
            return None
        share = self.config.reuse_cfg and batch % 2 == 0
        if share:  # diffusers stacks [unconditional, conditional]: match on the conditional half
            metric = metric[batch // 2 :]
        if request.batch_shared:  # one plan for the batch, matched on the mean cosine similarity
            constants = self._plan_constants(1, partition, num_remove, device)
            shared = plan_merge(shared_metric(metric), partition, num_remove, constants=constants)
            return None if shared is None else SharedMergePlan.build(shared, partition.dst_idx, batch)
        constants = self._plan_constants(metric.shape[0], partition, num_remove, device)
        plan = plan_merge(metric, partition, num_remove, constants=constants)
        return plan.repeat_batch(2) if share and plan is not None else plan

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
    ) -> Partition:
        cfg = self.config
        # An odd batch means cond and uncond halves of CFG run in separate calls; a random partition
        # would then differ between them, so (as tomesd does) fall back to the fixed top-left one.
        if cfg.use_rand and batch % 2 == 0:
            windows = num_windows(height, width, cfg.sx, cfg.sy)
            table = state.call.offsets
            if table is not None and table.shape[1] >= windows and table.device == device:
                offsets = table[block_index, :windows]
            else:  # no per-call draw (no [B, C, H, W] model input): draw for this block alone
                offsets = draw_dst_offsets(height, width, cfg.sx, cfg.sy, state.generator).to(device)
            windows_table = self._windows(height, width, device)
            return grid_partition(height, width, cfg.sx, cfg.sy, offsets, windows=windows_table)
        key = (height, width, str(device))
        return cached(self._partitions, key, lambda: self._fixed_partition(height, width, device))

    def _windows(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        sx, sy = self.config.sx, self.config.sy
        key = (height, width, str(device))
        return cached(self._window_tables, key, lambda: window_tokens(height, width, sx, sy, device))

    def _fixed_partition(self, height: int, width: int, device: torch.device) -> Partition:
        cfg = self.config
        offsets = torch.zeros(height // cfg.sy, width // cfg.sx, dtype=torch.int64, device=device)
        return grid_partition(height, width, cfg.sx, cfg.sy, offsets)

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
        plan = GridDownsample.build(batch, request.height, request.width, factor, self.config.downsample_mode)  # type: ignore[arg-type]
        return plan if plan.num_merged < plan.num_tokens else None

    def nothing_reason(self, request: PlanRequest) -> str | None:
        if request.setting.factor <= 1:
            return None
        return f"its {request.height}x{request.width} token grid is a single token"


_MISSING = object()


class ReusingReducer(Reducer):
    """Reuses the plans of another reducer: within a call across the blocks of a level (``level``),
    and across calls, recomputing a block's plan only every ``steps``-th call.

    A kept plan is reused only for the same batch size and grid, within one generation of the thread
    that made it (a generation ends when the timestep goes up, see :class:`ToMeState`)."""

    def __init__(self, inner: Reducer, level: bool, steps: int) -> None:
        self.inner = inner
        self.level = level
        self.steps = steps

    def draws_per_call(self) -> bool:
        return self.inner.draws_per_call()

    def begin_call(self, state: ToMeState, call: CallState, sample: object) -> None:
        self.inner.begin_call(state, call, sample)

    def nothing_reason(self, request: PlanRequest) -> str | None:
        return self.inner.nothing_reason(request)

    def plan(self, state: ToMeState, request: PlanRequest) -> Any:
        batch = request.metric.shape[0]
        if self.level:
            key: tuple[object, ...] = ("level", request.level, request.height, request.width, batch)
        else:
            key = ("block", request.block_index, request.height, request.width, batch)
        call = state.call
        if self.level and key in call.shared_plans:
            return call.shared_plans[key]
        plan: Any = _MISSING
        if self.steps > 1:  # eager only: ToMeState refuses reuse_steps in compiled calls
            memory = state.thread_memory()
            kept = memory.plans.get(key)
            if kept is not None and memory.calls - kept[1] < self.steps and kept[2] == memory.generation:
                plan = kept[0]
        if plan is _MISSING:
            plan = self.inner.plan(state, request)
            if self.steps > 1:
                memory = state.thread_memory()
                memory.plans[key] = (plan, memory.calls, memory.generation)
        if self.level:
            call.shared_plans[key] = plan
        return plan


class SiteAction:
    """What happens around one submodule of a block that has a plan.

    Attributes:
        uses_output: whether :meth:`after` needs the plan (it is kept alive until then).
    """

    uses_output: ClassVar[bool] = True

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        """The action for ``site`` (by its role and layout): this one, a variant, or None to leave the
        site alone. Raises :class:`ConfigError` when the method cannot act on such a site."""
        return self

    def before(
        self, plan: Any, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs] | None:
        """New ``(args, kwargs)`` for the submodule, or None to leave them."""
        raise NotImplementedError

    def after(self, plan: Any, output: Any) -> Any:
        """The submodule's new output, or None to leave it."""
        return None


def _token_input(
    plan: Any, site: Site, block_name: str, args: Args, kwargs: Kwargs
) -> tuple[int | str, torch.Tensor]:
    where, x = find_input(args, kwargs, site.input_names)
    if where is None or not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != plan.num_tokens:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MergeCallError(
            f"tomediff cannot reduce the input of the {site.kind} site in block '{block_name}': "
            f"expected [batch, {plan.num_tokens}, channels], got {shape}."
        )
    return where, x


def _is_self_attention(site: Site, kwargs: Kwargs) -> bool:
    return not any(kwargs.get(name) is not None for name in site.context_names)


class MergeAction(SiteAction):
    """Merge the input (and a self-attention mask) with the plan; unmerge ``output`` / ``output[0]``."""

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        if site.role == "key_value":  # merging reduces the whole attention at its own site
            return None
        if site.text_first or site.rotary_names:
            return ImageTokensMergeAction()
        return self

    def before(
        self, plan: TokenPlan, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        where, x = _token_input(plan, site, block_name, args, kwargs)
        args, kwargs = replace_input(args, kwargs, where, plan.merge(x))
        if _is_self_attention(site, kwargs):
            for name in site.mask_names:
                mask = kwargs.get(name)
                if isinstance(mask, torch.Tensor):
                    kwargs = {**kwargs, name: _merge_mask(mask, plan)}
        return args, kwargs

    def after(self, plan: TokenPlan, output: Any) -> Any:
        if isinstance(output, tuple):
            return (plan.unmerge(output[0]), *output[1:])
        return plan.unmerge(output)


def _merge_mask(mask: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    n = plan.num_tokens
    if mask.dim() >= 2 and mask.shape[-1] == n:
        mask = plan.merge_mask(mask, -1)
    if mask.dim() >= 3 and mask.shape[-2] == n:
        mask = plan.merge_mask(mask, -2)
    return mask


class KeyValueAction(SiteAction):
    """Self-attention with every query and the plan's reduced tokens as keys and values, passed as
    the module's context argument (``encoder_hidden_states`` in diffusers, ``context`` in LDM)."""

    uses_output = False

    def __init__(self) -> None:
        self._context_names: dict[int, str] = {}

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        if site.role == "key_value":
            return ReduceInputAction()
        if site.role == "tokens":
            return self
        if site.rotary_names:
            raise ConfigError(
                f"method='downsample' cannot reduce the keys and values of the {site.kind} site of block "
                f"'{block_name}' ({type(site.module).__name__}): its attention processor applies one "
                "rotary position table to queries and keys alike, so keys from a downsampled grid cannot "
                "keep their own positions from outside the processor. Use method='merge' for this model."
            )
        return None  # an attention computing its keys inside: its key_value sites are reduced

    def before(
        self, plan: GridDownsample, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        _, x = _token_input(plan, site, block_name, args, kwargs)
        if not _is_self_attention(site, kwargs) or len(args) > 1:
            raise MergeCallError(
                f"method='downsample' reduces self-attention keys and values, but the {site.kind} site of "
                f"block '{block_name}' was given its own context (cross-attention); use method='merge' "
                "for this model."
            )
        for name in site.mask_names:
            mask = kwargs.get(name)
            if isinstance(mask, torch.Tensor) and mask.shape[-1] == plan.num_tokens:
                raise MergeCallError(
                    f"method='downsample' cannot reduce the attention mask '{name}' given to block "
                    f"'{block_name}' (its key axis has {plan.num_tokens} tokens); use method='merge'."
                )
        return args, {**kwargs, self._context_name(site): plan.reduce(x)}

    def _context_name(self, site: Site) -> str:
        name = self._context_names.get(id(site.module))
        if name is None:
            name = self._context_names[id(site.module)] = _accepted_name(site.module, site.context_names)
        return name


def _accepted_name(module: nn.Module, names: tuple[str, ...]) -> str:
    """The first of ``names`` that ``module.forward`` takes as a parameter (the first one when it
    takes ``**kwargs`` or its signature cannot be read)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return names[0]
    for name in names:
        if name in parameters:
            return name
    return names[0]


class ImageTokensMergeAction(SiteAction):
    """Merge only the image tokens of a site: the last ``N`` of its token input (after text tokens,
    for Flux's single-stream blocks), with the rotary table's image rows reduced alike, so every kept
    token attends with its own position (a merged token with its dst's); unmerge the last tokens of
    ``output`` / ``output[0]``. Needs a plan with ``positions`` when a rotary table is passed."""

    def before(
        self, plan: TokenPlan, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        where, x = find_input(args, kwargs, site.input_names)
        num = plan.num_tokens
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or (x.shape[1] != num and not site.text_first):
            return _token_input(plan, site, block_name, args, kwargs)  # raises with the shapes
        prefix = int(x.shape[1]) - num
        if prefix < 0:
            raise MergeCallError(
                f"tomediff cannot reduce the input of the {site.kind} site in block '{block_name}': it "
                f"has {x.shape[1]} tokens, fewer than the block's {num} image tokens."
            )
        if len(args) > 1 and site.rotary_names:
            raise MergeCallError(
                f"the {site.kind} site of block '{block_name}' was called with positional arguments after "
                "its tokens; tomediff finds its rotary table only by keyword "
                f"({', '.join(site.rotary_names)})."
            )
        for name in site.mask_names:
            if isinstance(kwargs.get(name), torch.Tensor):
                raise MergeCallError(
                    f"tomediff cannot merge the image tokens of block '{block_name}' under the attention "
                    f"mask '{name}' (its rows mix text and image tokens); call the model without it, or "
                    "apply tomediff with merge_attn=False."
                )
        assert where is not None
        args, kwargs = replace_input(args, kwargs, where, merge_trailing(x, plan, prefix))
        for name in site.rotary_names:
            table = kwargs.get(name)
            if table is None:
                continue
            positions = getattr(plan, "positions", None)
            if positions is None:
                raise MergeCallError(
                    f"block '{block_name}' passes rotary positions ('{name}') shared by the batch, but its "
                    f"plan ({type(plan).__name__}) reduces samples differently and has no positions; "
                    "a reducer for such blocks must honour PlanRequest.batch_shared."
                )
            rows = [t.shape[0] for t in (table if isinstance(table, tuple) else (table,))]
            if any(r < num for r in rows):
                raise MergeCallError(
                    f"the rotary table '{name}' of block '{block_name}' has {rows} rows, fewer than its "
                    f"{num} image tokens; tomediff expects [text rows, image rows]."
                )
            kwargs = {**kwargs, name: reduce_rotary(table, positions, num)}
        return args, kwargs

    def after(self, plan: TokenPlan, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        restored = unmerge_trailing(first, plan, int(first.shape[1]) - plan.num_merged)
        return (restored, *output[1:]) if isinstance(output, tuple) else restored


class ReduceInputAction(SiteAction):
    """Replace a key or value projection's input by the plan's reduced tokens (``plan.reduce``): the
    attention around it then has every query and fewer image keys/values; its other inputs (text)
    are untouched."""

    uses_output = False

    def before(
        self, plan: GridDownsample, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        where, x = _token_input(plan, site, block_name, args, kwargs)
        return replace_input(args, kwargs, where, plan.reduce(x))


@dataclass(frozen=True)
class Method:
    """A reducer and the action each enabled site kind gets (adjusted per site by
    :meth:`SiteAction.for_site`)."""

    reducer: Reducer
    actions: Mapping[SiteKind, SiteAction]

    def action_for(self, site: Site, block_name: str) -> SiteAction | None:
        """The action ``site`` gets, or None when the method leaves it alone."""
        action = self.actions.get(site.kind)
        return None if action is None else action.for_site(site, block_name)

    def check(self, specs: Sequence[BlockSpec]) -> None:
        """Raise :class:`ConfigError` now (before anything is hooked) for a site the method cannot
        act on."""
        for spec in specs:
            for site in spec.sites:
                self.action_for(site, spec.name)


def build_method(config: ToMeConfig, enabled: set[SiteKind], reducer: Reducer | None = None) -> Method:
    """The method ``config`` describes. ``reducer`` replaces the config's reducer (benchmark
    references, research methods); its plans must suit the config's site actions."""
    if config.method == "downsample":
        base: Reducer = DownsampleReducer(config)
        return Method(reducer or base, {"attn": KeyValueAction()} if "attn" in enabled else {})
    base = MatchReducer(config)
    if config.reuse_level or config.reuse_steps > 1:
        base = ReusingReducer(base, config.reuse_level, config.reuse_steps)
    action = MergeAction()
    return Method(reducer or base, dict.fromkeys(enabled, action))
