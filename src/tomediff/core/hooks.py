"""Forward hooks that merge and unmerge tokens around a block's submodules.

Every callable registered here is a :class:`ToMeHook`, so detaching can find them in a module's
hook tables without any marker attribute on the module itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tomediff.core.actions import SiteAction
from tomediff.core.attention import PendingPlan
from tomediff.core.calls import Args, Kwargs, find_input, forward_parameters
from tomediff.core.parallel import gather_sequence, ulysses_group
from tomediff.core.reducers import PlanRequest
from tomediff.core.spec import BlockSpec, GridSource, Site, TokenGroups, grid_tokens
from tomediff.core.state import BlockStats, CallState, ToMeState
from tomediff.errors import MergeCallError

__all__ = ["SavedHooks", "ToMeHook", "has_hooks", "install", "remove_hooks", "save_hooks"]

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
    """Pre-hook on a grid source: records the token grid its blocks will see in this call (one of the
    patch's ``num_sources`` grid sources)."""

    def __init__(self, state: ToMeState, source: GridSource, index: int, num_sources: int) -> None:
        self.state = state
        self.source = source
        self.index = index
        self.num_sources = num_sources

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        self.state.record_grid(self.index, self.source.read(args, kwargs), self.num_sources)


class BlockCall:
    """How one block finds its grid and plan; the plan itself lives in the per-call state.

    Attributes:
        index: the block's position among the patched blocks (its row of per-call random offsets).
        grid_index: index of the block's grid source, if it has one.
        num_sites: merge sites hooked in this block.
        sites: the sites hooked in this block (those the method acts on).
    """

    def __init__(self, state: ToMeState, spec: BlockSpec, index: int, grid_index: int | None) -> None:
        self.state = state
        self.spec = spec
        self.index = index
        self.grid_index = grid_index
        self.num_sites = 0
        self.sites: list[Site] = []

    @property
    def plan(self) -> Any:
        """The calling thread's plan for this block (None outside the block, before a site made it, or
        when it merges nothing)."""
        return self.state.call.plans.get(self.index)

    def plan_for_site(self, call: CallState) -> Any:
        """The block's plan in ``call``, made now if the block's request is still pending.

        Made here, at the first site that needs it, rather than when the block is entered: a block
        whose forward a cache replaces (diffusers' FirstBlockCache runs the block's pre-hooks, then
        returns a cached output without running its sites) is never planned."""
        request = call.requests.pop(self.index, None)
        if request is None:
            return call.plans.get(self.index)
        state = self.state
        plan = call.plans[self.index] = state.make_plan(request)
        if not torch.compiler.is_compiling():  # a report entry; compiled graphs skip the bookkeeping
            num_tokens = request.metric.shape[1]
            merged = plan.num_merged if plan is not None else num_tokens
            groups = request.groups
            state.stats[self.spec.name] = BlockStats(
                request.height,
                request.width,
                request.level,
                int(num_tokens),
                int(merged),
                groups.grids[1:] if groups is not None else (),
            )
            # Several images: observers see the output image's plan, the grid they are told of.
            observed = plan if request.groups is None else getattr(plan, "plans", (None,))[0]
            if observed is not None and state.observers:
                state.notify(self.spec.name, request.height, request.width, observed)
        return plan

    def has_work(self, call: CallState) -> bool:
        """Whether the block has a plan in ``call``, or a request to make one from."""
        return self.index in call.requests or call.plans.get(self.index) is not None

    def site_done(self, call: CallState) -> None:
        """Called after each site that used the plan: once the last is done the plan's tensors are
        released, so they do not add to the memory peak of the rest of the block (e.g. an unmerged MLP)."""
        left = call.sites_left.get(self.index, 0) - 1
        call.sites_left[self.index] = left
        if left <= 0:
            call.plans[self.index] = None

    def _grid_candidates(self, call: CallState) -> Iterator[tuple[int, ...] | TokenGroups | None]:
        """Token grids the call's inputs give, most reliable first (lazily: the first usually fits).
        What the adapter says wins: the grid its grid source read in this call (None when that input
        shows no single grid), else the grid of the block's level; only a block whose level only a call
        can tell tries every level of the model's input. A grid is never guessed from the token count."""
        state, spec = self.state, self.spec
        if self.grid_index is not None and self.grid_index in call.grids:
            yield call.grids[self.grid_index]
        elif spec.downsample is not None:
            yield state.grid_for_downsample(spec.downsample)
        elif call.input_size is not None:
            factor = 1
            while factor <= max(call.input_size):
                yield state.grid_for_downsample(factor)
                factor *= 2

    def image_tokens(self, call: CallState, num_inputs: int) -> int:
        """How many of a block's ``num_inputs`` input tokens are image tokens, from its grid source."""
        grid = call.grids.get(self.grid_index) if self.grid_index is not None else None
        if grid is None or not 0 < grid_tokens(grid) <= num_inputs:
            source = self.spec.grid
            start = (
                f"tomediff cannot tell how many of the {num_inputs} tokens block '{self.spec.name}' receives"
            )
            if grid is None and source is not None:
                inputs = "/".join(source.input_names)
                raise MergeCallError(
                    f"{start} are image tokens: the model's {inputs} in this call do not describe the token "
                    f"grids of its images ({source.unreadable_example})."
                )
            raise MergeCallError(
                f"{start} are image tokens: its model call gave the token grid {grid}, which does not fit "
                "them. Call the model with the position ids or sizes of exactly the image tokens it is given."
            )
        return grid_tokens(grid)

    def fits_grid(self, call: CallState, num_tokens: int) -> bool:
        """Whether one of the call's token grids has ``num_tokens`` tokens."""
        return any(g is not None and grid_tokens(g) == num_tokens for g in self._grid_candidates(call))

    def token_grid(self, call: CallState, num_tokens: int) -> tuple[int, ...] | TokenGroups:
        """``(height, width)``, ``(frames, height, width)`` for a video grid source, or the images'
        :class:`TokenGroups` for a call holding several (an edit model's reference images)."""
        for grid in self._grid_candidates(call):
            if grid is not None and grid_tokens(grid) == num_tokens:
                return grid
        read = call.grids.get(self.grid_index) if self.grid_index is not None else None
        if isinstance(read, TokenGroups):
            raise MergeCallError(
                f"tomediff cannot reduce block '{self.spec.name}': its model call describes "
                f"{len(read.grids)} images of {read.sizes} tokens ({read.num_tokens} in all, grids "
                f"{list(read.grids)}), but the block received {num_tokens} image tokens. Give the model the "
                "ids / shapes of exactly the image tokens it is called with."
            )
        name = self.spec.name
        if (
            self.grid_index is not None
            and self.grid_index in call.grids
            and call.grids[self.grid_index] is None
        ):
            # The grid source ran in this call and could not read one grid from it.
            source = self.spec.grid
            inputs = "/".join(source.input_names) if source is not None else "input"
            example = source.unreadable_example if source is not None else ""
            raise MergeCallError(
                f"tomediff cannot tell the token grid of block '{name}': the model's {inputs} in this call "
                f"do not describe one image grid of its {num_tokens} tokens ({example}), and tomediff "
                "never guesses one, since tokens of different images would be merged together. Run such "
                "calls without tomediff (tomediff.remove_tome(pipe), or the tomediff.tome(...) context "
                "manager around the others)."
            )
        raise MergeCallError(
            f"tomediff cannot tell the token grid of block '{name}': it received {num_tokens} tokens, and "
            f"neither its model's input size {call.input_size} nor the adapter explains that count "
            "(tomediff never guesses a grid from the token count). Call the patched model with its "
            "[B, C, H, W] input (positionally or as sample=/hidden_states=); a block called on its own "
            "takes the grid of the last call of the patched model, so call it with that call's token count."
        )


class BlockPreHook(ToMeHook):
    def __init__(self, block: BlockCall) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        block = self.block
        state, spec = block.state, block.spec
        _, x = find_input(args, kwargs, spec.input_names)
        if spec.sequence_first and isinstance(x, torch.Tensor) and x.dim() == 3:
            x = x.transpose(0, 1)
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MergeCallError(
                f"tomediff expected block '{spec.name}' to receive hidden states of shape "
                f"[batch, tokens, channels], got {shape}."
            )
        call = state.call
        group = ulysses_group(block.sites, spec.name)
        if group is not None and not block.fits_grid(call, int(x.shape[1])):
            # Ulysses: a shard of the sequence (diffusers splits it inside the first block's forward, after
            # this hook); the plan is made from the whole sequence, as the attention call sees it.
            x = gather_sequence(x, group)
        num_tokens = int(x.shape[1])
        if spec.image_last:  # [text, image]: the image tokens are the last N of the grid source's grid
            num_tokens = block.image_tokens(call, num_tokens)
            x = x[:, -num_tokens:]
        elif spec.image_first:  # [image, others]: the first N
            num_tokens = block.image_tokens(call, num_tokens)
            x = x[:, :num_tokens]
        grid = block.token_grid(call, num_tokens)
        groups = grid if isinstance(grid, TokenGroups) else None
        if isinstance(grid, TokenGroups):  # several images: the first one's grid names the block call
            grid = grid.grids[0]
        frames = grid[0] if len(grid) == 3 else 1
        height, width = frames * grid[-2], grid[-1]  # a video's frames stacked: one 2-D grid per call
        level = spec.downsample if spec.downsample is not None else state.infer_level(height, width)
        setting = state.selection.setting(level)
        call.plans[block.index] = None
        call.sites_left[block.index] = block.num_sites
        if setting is not None and call.active and state.selection.block_active(num_tokens):
            # Planned by the first site that runs (plan_for_site): a block a cache skips costs nothing.
            call.requests[block.index] = PlanRequest(
                x,
                height,
                width,
                level,
                setting,
                block.index,
                spec.name,
                batch_shared=spec.batch_shared,
                frames=frames,
                groups=groups,
            )
            if torch.compiler.is_compiling():
                # Traced, the plan is made here, in the block's frame: made in a site's pre-hook, which
                # dynamo may trace as a frame of its own, it would share that frame with the attention
                # call's torch-function mode, which dynamo cannot carry out of a frame it created it in.
                block.plan_for_site(call)
        else:
            call.requests.pop(block.index, None)
            if not torch.compiler.is_compiling():  # a report entry; compiled graphs skip the bookkeeping
                others = groups.grids[1:] if groups is not None else ()
                state.stats[spec.name] = BlockStats(height, width, level, num_tokens, num_tokens, others)


class BlockPostHook(ToMeHook):
    """Drops the plan when the block returns (registered with ``always_call``, so errors do too)."""

    def __init__(self, block: BlockCall) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> None:
        call = self.block.state.call
        call.plans[self.block.index] = None
        call.requests.pop(self.block.index, None)  # not planned: no site ran (e.g. a cache skipped it)


class SiteCall:
    """A site's hooks' shared view: its block, the site, its action, and (``inside``) the attention-call
    site and action that reduce inside the module instead while a cache keeps its output."""

    def __init__(
        self, block: BlockCall, site: Site, action: SiteAction, inside: tuple[Site, SiteAction] | None = None
    ) -> None:
        self.block = block
        self.site = site
        self.action = action
        self.inside = inside


class SitePreHook(ToMeHook):
    """Runs the site action's ``before`` with the block's plan (e.g. merges the token input)."""

    def __init__(self, call: SiteCall) -> None:
        self.call = call

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs] | None:
        call = self.call
        block, site = call.block, call.site
        state_call = block.state.call
        if call.inside is not None and block.has_work(state_call) and _kept_by_cache(site):
            return self._reduce_inside(call.inside, args, kwargs)
        if site.skipped is not None and site.skipped():
            return None  # not run in this call: no plan (BlockPostHook drops the request)
        plan = block.plan_for_site(state_call)
        if plan is None:
            return None
        if site.unsupported is not None and (reason := site.unsupported()) is not None:
            raise MergeCallError(reason)
        if call.action.uses_output and site.conflict is not None and (reason := site.conflict()) is not None:
            raise MergeCallError(reason)
        return call.action.before(plan, site, block.spec.name, args, kwargs)

    def _reduce_inside(
        self, inside: tuple[Site, SiteAction], args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs] | None:
        """A cache keeps this module's output across steps: reduce inside it (at its attention call),
        so the output it keeps has the full token order. The plan is made at the first attention call,
        so a step at which the cache does not compute the module makes none; InsidePostHook undoes
        this."""
        call = self.call
        block, site = call.block, call.site
        if site.unsupported is not None and (reason := site.unsupported()) is not None:
            raise MergeCallError(reason)
        state_call = block.state.call
        pending = PendingPlan(lambda: block.plan_for_site(state_call))
        inside_site, inside_action = inside
        new_inputs = inside_action.before(pending, inside_site, block.spec.name, args, kwargs)
        state_call.inside.add(id(call))  # only once ``before`` set up what the post-hook undoes
        return new_inputs


def _kept_by_cache(site: Site) -> bool:
    return site.conflict is not None and site.conflict() is not None


class SitePostHook(ToMeHook):
    """Runs the site action's ``after`` with the block's plan (e.g. unmerges the output)."""

    def __init__(self, call: SiteCall) -> None:
        self.call = call

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> Any:
        block = self.call.block
        state_call = block.state.call
        plan = state_call.plans.get(block.index)
        if plan is None or id(self.call) in state_call.inside:  # reduced inside: InsidePostHook's
            return None
        block.site_done(state_call)
        return self.call.action.after(plan, output)


class InsidePostHook(ToMeHook):
    """Runs the inside action's ``after`` when the site was reduced inside its module in this call
    (registered with ``always_call``, so the attention-call mode is popped on errors too)."""

    def __init__(self, call: SiteCall) -> None:
        self.call = call

    def __call__(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> Any:
        call = self.call
        state_call = call.block.state.call
        if id(call) not in state_call.inside or call.inside is None:
            return None
        state_call.inside.discard(id(call))
        plan = state_call.plans.get(call.block.index)
        call.block.site_done(state_call)
        return call.inside[1].after(plan, output)


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
        sites = [(site, state.method.action_for(site, spec.name)) for site in spec.sites]
        if spec.block_site is not None:
            # After the block's pre-hook (which asks for the plan) and before its post-hook (which
            # drops it): hooks of one module run in the order they were registered.
            sites.append((spec.block_site, state.method.block_action_for(spec)))
        for site, action in sites:
            if action is None:
                continue
            # Only a site whose output is unmerged can conflict with a cache, and be reduced inside instead.
            inside_action = state.method.inside_action_for(site, spec.name) if action.uses_output else None
            inside = (site.inside, inside_action) if site.inside and inside_action else None
            site_call = SiteCall(block_call, site, action, inside)
            block_call.sites.append(site)
            handles.append(site.module.register_forward_pre_hook(SitePreHook(site_call), with_kwargs=True))
            if action.uses_output:
                block_call.num_sites += 1
                post = SitePostHook(site_call)
                handles.append(
                    site.module.register_forward_hook(
                        post, with_kwargs=True, always_call=action.after_on_error
                    )
                )
            if inside is not None:
                handles.append(
                    site.module.register_forward_hook(
                        InsidePostHook(site_call), with_kwargs=True, always_call=True
                    )
                )
        handles.append(
            spec.block.register_forward_hook(BlockPostHook(block_call), with_kwargs=True, always_call=True)
        )
    for grid_index, source in grid_sources.values():
        hook = GridHook(state, source, grid_index, len(grid_sources))
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
                hook = table.pop(hook_id)
                if isinstance(hook, RootHook):  # what its patch kept between calls goes with it
                    hook.state.release()
                for flag_name in _FLAG_TABLES:
                    getattr(module, flag_name, {}).pop(hook_id, None)
                removed += 1
    return removed


def has_hooks(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule carries a tomediff hook."""
    return any(
        isinstance(hook, ToMeHook)
        for module in model.modules()
        for table_name in _HOOK_TABLES
        for hook in getattr(module, table_name).values()
    )


class SavedHooks:
    """The tomediff hooks a model carried at one moment (:func:`save_hooks`), to put back after a
    temporary patch replaced them: each under its old id, flags and place among the module's hooks,
    so the handle that installed them is active again."""

    def __init__(self, model: nn.Module) -> None:
        # (hook table, its key order then, our hooks in it, their flag tables' entries)
        self._tables: list[
            tuple[dict[int, Any], list[int], dict[int, ToMeHook], list[tuple[dict[int, Any], int, Any]]]
        ] = []
        for module in model.modules():
            for table_name in _HOOK_TABLES:
                table = getattr(module, table_name)
                ours = {key: hook for key, hook in table.items() if isinstance(hook, ToMeHook)}
                if not ours:
                    continue
                flags = [
                    (flag_table, key, flag_table[key])
                    for flag_name in _FLAG_TABLES
                    if (flag_table := getattr(module, flag_name, None)) is not None
                    for key in ours
                    if key in flag_table
                ]
                self._tables.append((table, list(table), ours, flags))

    def restore(self) -> None:
        """Put the saved hooks back (in place: the handles' weak references see the same tables);
        hooks added since keep their order, after the saved ones' old neighbours."""
        for table, order, ours, flags in self._tables:
            current = {**table, **ours}
            known = set(order)
            table.clear()
            table.update((key, current[key]) for key in order if key in current)
            table.update((key, hook) for key, hook in current.items() if key not in known)
            for flag_table, key, value in flags:
                flag_table[key] = value


def save_hooks(model: nn.Module) -> SavedHooks:
    """The tomediff hooks ``model`` carries now, to restore later (see :class:`SavedHooks`)."""
    return SavedHooks(model)
