"""Forward hooks that merge and unmerge tokens around a block's submodules.

Every callable registered here is a :class:`ToMeHook`, so detaching can find them in a module's
hook tables without any marker attribute on the module itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tomediff.core.actions import SiteAction
from tomediff.core.calls import Args, Kwargs, find_input, forward_parameters
from tomediff.core.reducers import PlanRequest
from tomediff.core.spec import BlockSpec, GridSource, Site
from tomediff.core.state import BlockStats, CallState, ToMeState
from tomediff.errors import MergeCallError

__all__ = ["ToMeHook", "install", "remove_hooks"]

_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


class ToMeHook:
    """Base class of every hook tomediff registers (what :func:`remove_hooks` looks for)."""


class RootHook(ToMeHook):
    """Pre-hook on the patched model: starts a call (per thread) and records its ``[B, C, H, W]`` size
    and its timestep (a ``timestep`` keyword, or the positional argument at that parameter's place in
    the model's ``forward``: second in a UNet, fourth in SD3/Flux transformers)."""

    def __init__(self, state: ToMeState, root: nn.Module) -> None:
        self.state = state
        self.timestep_position = _timestep_position(root)

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        _, sample = find_input(args, kwargs, ("sample", "hidden_states", "x"))
        timestep = next((kwargs[name] for name in _TIMESTEP_NAMES if kwargs.get(name) is not None), None)
        position = self.timestep_position
        if timestep is None and position is not None and len(args) > position:
            timestep = args[position]
        self.state.start_call(sample, timestep)


def _timestep_position(root: nn.Module) -> int | None:
    """Index among the positional arguments of ``root.forward`` of its timestep parameter (1, a
    UNet's place, when the signature cannot be read)."""
    parameters = forward_parameters(root)
    if parameters is None:
        return 1
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for index, parameter in enumerate(positional):
        if parameter.name in _TIMESTEP_NAMES:
            return index
    return None


class GridHook(ToMeHook):
    """Pre-hook on a grid source: records the token grid its blocks will see in this call."""

    def __init__(self, state: ToMeState, source: GridSource, index: int) -> None:
        self.state = state
        self.source = source
        self.index = index

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        self.state.call.grids[self.index] = self.source.read(args, kwargs)


class BlockCall:
    """How one block finds its grid and plan; the plan itself lives in the per-call state.

    Attributes:
        index: the block's position among the patched blocks (its row of per-call random offsets).
        grid_index: index of the block's grid source, if it has one.
        num_sites: merge sites hooked in this block.
    """

    def __init__(self, state: ToMeState, spec: BlockSpec, index: int, grid_index: int | None) -> None:
        self.state = state
        self.spec = spec
        self.index = index
        self.grid_index = grid_index
        self.num_sites = 0

    @property
    def plan(self) -> Any:
        """The calling thread's plan for this block (None outside the block or when it merges nothing)."""
        return self.state.call.plans.get(self.index)

    def site_done(self, call: CallState) -> None:
        """Called after each site that used the plan: once the last is done the plan's tensors are
        released, so they do not add to the memory peak of the rest of the block (e.g. an unmerged MLP)."""
        left = call.sites_left.get(self.index, 0) - 1
        call.sites_left[self.index] = left
        if left <= 0:
            call.plans[self.index] = None

    def _grid_candidates(self, call: CallState, num_tokens: int) -> Iterator[tuple[int, ...] | None]:
        """Possible token grids, most reliable first; produced lazily since the first usually fits."""
        state, spec = self.state, self.spec
        if self.grid_index is not None:
            yield call.grids.get(self.grid_index)
        if spec.downsample is not None:
            yield state.grid_for_downsample(spec.downsample)
        if call.input_size is not None:
            factor = 1
            while factor <= max(call.input_size):
                yield state.grid_for_downsample(factor)
                factor *= 2
        side = math.isqrt(num_tokens)
        if side * side == num_tokens:
            yield (side, side)

    def image_tokens(self, call: CallState, num_inputs: int) -> int:
        """How many of a block's ``num_inputs`` input tokens are image tokens, from its grid source."""
        grid = call.grids.get(self.grid_index) if self.grid_index is not None else None
        if grid is None or not 0 < math.prod(grid) <= num_inputs:
            raise MergeCallError(
                f"tomediff cannot tell how many of the {num_inputs} tokens block '{self.spec.name}' "
                f"receives are image tokens: its model call gave the token grid {grid}. Call the model "
                "with the position ids of one full image grid."
            )
        return math.prod(grid)

    def token_grid(self, call: CallState, num_tokens: int) -> tuple[int, ...]:
        """``(height, width)``, or ``(frames, height, width)`` for a video grid source."""
        for grid in self._grid_candidates(call, num_tokens):
            if grid is not None and math.prod(grid) == num_tokens:
                return grid
        raise MergeCallError(
            f"tomediff cannot tell the token grid of block '{self.spec.name}': it received {num_tokens} "
            f"tokens, and the model input size {call.input_size} does not explain that count. Call the "
            "patched model with its [B, C, H, W] input (positionally or as sample=/hidden_states=)."
        )


class BlockPreHook(ToMeHook):
    def __init__(self, block: BlockCall) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        block = self.block
        state, spec = block.state, block.spec
        _, x = find_input(args, kwargs, spec.input_names)
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MergeCallError(
                f"tomediff expected block '{spec.name}' to receive hidden states of shape "
                f"[batch, tokens, channels], got {shape}."
            )
        call = state.call
        num_tokens = int(x.shape[1])
        if spec.image_last:  # [text, image]: the image tokens are the last N of the grid source's grid
            num_tokens = block.image_tokens(call, num_tokens)
            x = x[:, -num_tokens:]
        grid = block.token_grid(call, num_tokens)
        frames = grid[0] if len(grid) == 3 else 1
        height, width = frames * grid[-2], grid[-1]  # a video's frames stacked: one 2-D grid per call
        level = spec.downsample if spec.downsample is not None else state.infer_level(height, width)
        setting = state.selection.setting(level)
        plan = None
        if setting is not None and call.active and state.selection.block_active(num_tokens):
            request = PlanRequest(
                x,
                height,
                width,
                level,
                setting,
                block.index,
                spec.name,
                batch_shared=spec.batch_shared,
                frames=frames,
            )
            plan = state.make_plan(request)
        call.plans[block.index] = plan
        call.sites_left[block.index] = block.num_sites
        if not torch.compiler.is_compiling():  # a report entry; compiled graphs skip the bookkeeping
            merged = plan.num_merged if plan is not None else x.shape[1]
            state.stats[spec.name] = BlockStats(height, width, level, int(x.shape[1]), merged)
            if plan is not None and state.observers:
                state.notify(spec.name, height, width, plan)


class BlockPostHook(ToMeHook):
    """Drops the plan when the block returns (registered with ``always_call``, so errors do too)."""

    def __init__(self, block: BlockCall) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> None:
        self.block.state.call.plans[self.block.index] = None


class SiteCall:
    def __init__(self, block: BlockCall, site: Site, action: SiteAction) -> None:
        self.block = block
        self.site = site
        self.action = action


class SitePreHook(ToMeHook):
    """Runs the site action's ``before`` with the block's plan (e.g. merges the token input)."""

    def __init__(self, call: SiteCall) -> None:
        self.call = call

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs] | None:
        call = self.call
        plan = call.block.plan
        if plan is None:
            return None
        site = call.site
        if site.unsupported is not None and (reason := site.unsupported()) is not None:
            raise MergeCallError(reason)
        return call.action.before(plan, site, call.block.spec.name, args, kwargs)


class SitePostHook(ToMeHook):
    """Runs the site action's ``after`` with the block's plan (e.g. unmerges the output)."""

    def __init__(self, call: SiteCall) -> None:
        self.call = call

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> Any:
        block = self.call.block
        state_call = block.state.call
        plan = state_call.plans.get(block.index)
        if plan is None:
            return None
        block.site_done(state_call)
        return self.call.action.after(plan, output)


def install(root: nn.Module, specs: Sequence[BlockSpec], state: ToMeState) -> list[RemovableHandle]:
    """Register the hooks of one patch (a site gets hooks when the method has an action for its
    kind); returns their handles."""
    handles = [root.register_forward_pre_hook(RootHook(state, root), with_kwargs=True, prepend=True)]
    grid_sources: dict[int, tuple[int, GridSource]] = {}
    for index, spec in enumerate(specs):
        grid_index = None
        if spec.grid is not None:
            grid_index = grid_sources.setdefault(id(spec.grid), (len(grid_sources), spec.grid))[0]
        block_call = BlockCall(state, spec, index, grid_index)
        handles.append(spec.block.register_forward_pre_hook(BlockPreHook(block_call), with_kwargs=True))
        handles.append(
            spec.block.register_forward_hook(BlockPostHook(block_call), with_kwargs=True, always_call=True)
        )
        for site in spec.sites:
            action = state.method.action_for(site, spec.name)
            if action is None:
                continue
            site_call = SiteCall(block_call, site, action)
            handles.append(site.module.register_forward_pre_hook(SitePreHook(site_call), with_kwargs=True))
            if action.uses_output:
                block_call.num_sites += 1
                post = SitePostHook(site_call)
                handles.append(
                    site.module.register_forward_hook(
                        post, with_kwargs=True, always_call=action.after_on_error
                    )
                )
    for grid_index, source in grid_sources.values():
        hook = GridHook(state, source, grid_index)
        handles.append(source.module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks")
_FLAG_TABLES = (
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def remove_hooks(model: nn.Module) -> int:
    """Remove every tomediff hook from ``model`` and its submodules; returns how many were removed.

    Works from the hook tables alone, so it also cleans a model that was pickled or deep-copied
    while patched.
    """
    removed = 0
    for module in model.modules():
        for table_name in _HOOK_TABLES:
            table = getattr(module, table_name)
            for hook_id in [k for k, hook in table.items() if isinstance(hook, ToMeHook)]:
                del table[hook_id]
                for flag_name in _FLAG_TABLES:
                    getattr(module, flag_name, {}).pop(hook_id, None)
                removed += 1
    return removed
