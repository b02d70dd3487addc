"""Token-wise caching (``method="cache"``): a reducer deciding which image tokens a block computes, and
a block-level site action that runs the block on those tokens and fills in the others from the cache.

At a refresh step every token goes through the block, and the block keeps each image token's residual
(output minus input). At the steps between, only the chosen tokens go through it (text tokens always
do); every other token's output is its current input plus its kept residual, and the computed tokens
renew their entries (with ``cache_ratio=0`` none is computed: the block runs on its text and one image
token, whose output is dropped). With ``cache_context="all"`` the computed tokens still attend to every
image token: each self- or joint-attention module of the block (:class:`CachedKeysAction`, at its
``F.scaled_dot_product_attention`` call) keeps every image token's key and value at a refresh, and at the
steps between gives the computed queries the kept keys and values of the tokens not computed beside
the computed tokens' own. With ``cache_forecast="linear"`` the kept residuals, keys and values are those
of the last refresh, moved along their change between the last two refreshes to the call's time.
The cache follows the rules of kept plans (:class:`ReusingReducer`): it lives in the calling thread's
memory of the current generation, under the block, batch size, grid, device, dtype and which call of the
timestep this is, so nothing crosses generations, batches or threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tomediff.config import ToMeConfig
from tomediff.core.actions import SiteAction
from tomediff.core.attention import SDPA_PARAMETERS, pop_own_mode
from tomediff.core.calls import Args, Kwargs, find_input, replace_input
from tomediff.core.reducers import PlanRequest, Reducer
from tomediff.core.spec import Site
from tomediff.errors import ConfigError, MergeCallError
from tomediff.ops import (
    changed_tokens,
    fill_from_cache,
    gather_tokens,
    reduce_rotary,
    scatter_tokens,
    strided_tokens,
)

if TYPE_CHECKING:
    from tomediff.core.state import ToMeState

__all__ = ["BlockCacheAction", "CacheEntry", "CachePlan", "CachedKeysAction", "TokenCacheReducer"]


@dataclass
class CacheEntry:
    """One block's cache in one thread's generation.

    Attributes:
        residual: ``[B, N, C]`` each image token's output minus input when it was last computed.
        reference: ``[B, N, C]`` each image token's input when it was last computed (``"change"`` only).
        refreshed_at: the thread's step count at the last refresh.
        partial_steps: steps since that refresh.
        keys_values: per attention module of the block (by ``id``), ``[B, heads, N, D]`` keys and values
            of every image token when it was last computed (``cache_context="all"`` only).
        refresh_time: the time (timestep) of the last refresh (``cache_forecast="linear"`` only).
        previous_time: the time of the refresh before it.
        previous_residual: ``[B, N, C]`` the residuals of that refresh (``cache_forecast="linear"``;
            None after a first refresh).
        previous_keys_values: per attention module, its keys and values, as ``keys_values``.
    """

    residual: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    refresh_time: float | None = None
    previous_time: float | None = None
    previous_residual: torch.Tensor | None = None
    previous_keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    refreshed_at: int = 0
    partial_steps: int = 0


@dataclass(eq=False)
class CachePlan:
    """The plan of one block call: compute every image token (``index`` None, a refresh) or those of
    ``index`` (``[B, M]``, ascending) and fill the rest from ``entry``.

    Attributes:
        x: ``[B, N, C]`` the block's image-token input.
        positions: ``[M]`` the computed tokens when one set serves the batch (rotary rows), else None.
    """

    entry: CacheEntry
    x: torch.Tensor
    index: torch.Tensor | None
    positions: torch.Tensor | None
    keeps_reference: bool
    time: float | None = None  # the call's time, when kept residuals are extrapolated to it
    forecast_only: bool = False  # cache_ratio=0: every image token's output comes from the cache

    @property
    def forecast_weight(self) -> float | None:
        """``w`` with ``torch.lerp(previous, last, w)`` the last refresh's value moved along its change
        since the refresh before to this call's time; None when there is no refresh before to compare
        with (or no time)."""
        entry = self.entry
        if self.time is None or entry.refresh_time is None or entry.previous_time is None:
            return None
        between = entry.refresh_time - entry.previous_time
        return None if between == 0 else 1.0 + (self.time - entry.refresh_time) / between

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_merged(self) -> int:
        """Image tokens the block computes in this call (the one token a forecast-only call runs for
        the block's layout does not count: its output is dropped)."""
        if self.index is None:
            return self.num_tokens
        return 0 if self.forecast_only else int(self.index.shape[1])

    @property
    def refresh(self) -> bool:
        return self.index is None


class TokenCacheReducer(Reducer):
    """Plans of ``method="cache"``: a refresh every ``cache_interval``-th step of the calling thread's
    generation (and whenever the block has no cache for this batch, grid, device and dtype), else the
    ``cache_ratio`` of image tokens ``cache_select`` picks. Counts refresh and partial steps per block
    for the report."""

    def __init__(self, config: ToMeConfig) -> None:
        self.config = config
        self.counts: dict[str, list[int]] = {}  # block name -> [refresh steps, partial steps]
        self._lock = threading.Lock()

    def keeps_between_calls(self) -> bool:
        return True

    def plan(self, state: ToMeState, request: PlanRequest) -> CachePlan:
        if torch.compiler.is_compiling():
            raise MergeCallError(
                "method='cache' keeps residuals between model calls, which a compiled graph cannot; run "
                "the model eagerly with it, or use method='merge'."
            )
        cfg = self.config
        x = request.metric.detach()
        memory = state.thread_memory()
        key = (
            "token_cache",
            request.block_index,
            request.height,
            request.width,
            *x.shape,
            str(x.device),
            x.dtype,
            memory.repeat,
        )
        kept = memory.plans.get(key)
        entry = kept[0] if kept is not None and kept[2] == memory.generation else None
        forecast_only = cfg.cache_ratio == 0
        keeps_reference = cfg.cache_select == "change" and not forecast_only
        # At least one token: the block keeps its token layout (its dropped output, with cache_ratio=0).
        num = max(1, round(cfg.cache_ratio * request.metric.shape[1]))
        if entry is None:
            entry = CacheEntry()
            memory.plans[key] = (entry, memory.steps, memory.generation)
        # Counted in the thread's steps, not the block's calls: after steps a cache passed the block
        # through, kept residuals that old would cost more fidelity than the partial step saves time.
        timestep = memory.last_timestep
        if timestep is None and cfg.cache_intervals is not None:
            raise MergeCallError(
                "cache_intervals changes the refresh interval with the denoising progress, which needs the "
                "timestep of each model call, but this call passed none; call the model with its timestep "
                "(as timestep=, or positionally where its forward takes it), or use cache_interval alone."
            )
        progress = None if timestep is None else state.progress(timestep)
        stale = memory.steps - entry.refreshed_at >= cfg.interval_at(progress)
        time = None
        if cfg.cache_forecast == "linear":
            time = timestep if timestep is not None else -float(memory.steps)
        # No residual yet: a new entry, or one whose refresh call raised before the block returned.
        if entry.residual is None or stale or num >= x.shape[1]:
            entry.refreshed_at, entry.partial_steps = memory.steps, 0
            self._count(request.block_name, 0)
            return CachePlan(entry, x, None, None, keeps_reference, time, forecast_only)
        entry.partial_steps += 1
        self._count(request.block_name, 1)
        batch, num_tokens = int(x.shape[0]), int(x.shape[1])
        shared = request.batch_shared
        if keeps_reference:
            assert entry.reference is not None
            index = changed_tokens(x, entry.reference, num, shared)
        else:
            index = strided_tokens(batch, num_tokens, num, entry.partial_steps, x.device)
        positions = index[0] if shared else None
        return CachePlan(entry, x, index, positions, keeps_reference, time, forecast_only)

    def _count(self, block: str, which: int) -> None:
        with self._lock:
            self.counts.setdefault(block, [0, 0])[which] += 1

    def report_lines(self) -> list[str]:
        cfg = self.config
        if not self.counts:
            return []
        context = "every image token" if cfg.cache_context == "all" else "the computed ones"
        between = (
            "no image token computed between, each one"
            if cfg.cache_ratio == 0
            else f"{cfg.cache_ratio:g} of the image tokens computed between (chosen by '{cfg.cache_select}', "
            f"attending to {context}), the others"
        )
        filled = (
            "extrapolated from the last two refreshes"
            if cfg.cache_forecast == "linear"
            else "kept as last computed"
        )
        intervals = cfg.cache_intervals or ()
        assert isinstance(intervals, tuple)  # ToMeConfig stores them as sorted pairs
        later = "".join(f", from progress {at:g} every {k}" for at, k in intervals)
        refresh = sorted({c[0] for c in self.counts.values()})
        partial = sorted({c[1] for c in self.counts.values()})
        return [
            f"token cache: refresh every {cfg.cache_interval} steps{later}, {between} {filled}; "
            "block calls so far: "
            f"refresh {_spread(refresh)}, partial {_spread(partial)} per block ('reduced' counts the "
            "image tokens filled from the cache in the last call)"
        ]


def _spread(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


class BlockCacheAction(SiteAction):
    """Around a whole block (a ``"block"`` site): at a refresh, keep the residual of every image token;
    between refreshes, give the block only the plan's tokens (and their rotary rows), then rebuild its
    full image output from them and the cache."""

    def __init__(self, output_index: int = 0) -> None:
        self.output_index = output_index

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        if site.role != "block":
            raise ConfigError(
                f"method='cache' runs whole blocks, but block '{block_name}' was given a {site.role} site."
            )
        return BlockCacheAction(site.output_index)

    def before(
        self, plan: CachePlan, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs] | None:
        if plan.index is None:
            return None
        where, x = find_input(args, kwargs, site.input_names)
        if where is None or not isinstance(x, torch.Tensor) or x.shape[:2] != plan.x.shape[:2]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MergeCallError(
                f"method='cache' expected block '{block_name}' to receive its {plan.num_tokens} image "
                f"tokens as [batch, tokens, channels], got {shape}."
            )
        for name in site.mask_names:
            if isinstance(kwargs.get(name), torch.Tensor):
                raise MergeCallError(
                    f"method='cache' cannot run block '{block_name}' on part of its image tokens under "
                    f"the attention mask '{name}'; call the model without it, or use method='merge'."
                )
        if site.rotary_names and len(args) > 1:
            raise MergeCallError(
                f"block '{block_name}' was called with positional arguments after its tokens; "
                f"method='cache' finds its rotary table only by keyword ({', '.join(site.rotary_names)})."
            )
        args, kwargs = replace_input(args, kwargs, where, gather_tokens(x, plan.index))
        for name in site.rotary_names:
            table = kwargs.get(name)
            if table is not None:
                assert plan.positions is not None, "a block with a rotary table is planned batch-shared"
                kwargs = {**kwargs, name: reduce_rotary(table, plan.positions, plan.num_tokens)}
        return args, kwargs

    def after(self, plan: CachePlan, output: Any) -> Any:
        position = self.output_index
        image = output[position] if isinstance(output, tuple) else output
        entry, x = plan.entry, plan.x
        if plan.index is None:
            residual = (image.detach() - x).to(x.dtype)
            if plan.time is not None:
                # The refresh before is kept whole rather than as a slope: a refresh then costs no work
                # beyond its residual, and a forecast one lerp, as a slope's would.
                entry.previous_residual = entry.residual
                entry.previous_time = entry.refresh_time
                entry.refresh_time = plan.time
            entry.residual = residual
            # A copy: the block's caller may reuse its input tensor in place.
            entry.reference = x.clone() if plan.keeps_reference else None
            return None
        assert entry.residual is not None
        if plan.time is not None:
            # The refresh's residuals moved on to this call's time; the computed tokens serve this call
            # only (fill_from_cache puts them in), so every forecast starts from a whole refresh.
            residual = _forecast(entry.previous_residual, entry.residual, plan.forecast_weight)
            # A forecast is this call's own tensor (of x's dtype, as the kept residuals): the output
            # is built in it.
            in_place = residual is not entry.residual
        elif plan.forecast_only:  # nothing computed, nothing to renew
            residual, in_place = entry.residual, False
        else:
            fresh = image.detach() - gather_tokens(x, plan.index)
            scatter_tokens(entry.residual, plan.index, fresh)
            if plan.keeps_reference:
                assert entry.reference is not None
                scatter_tokens(entry.reference, plan.index, gather_tokens(x, plan.index))
            residual, in_place = entry.residual, False
        if plan.forecast_only:  # the one token the block ran on for its layout is dropped
            full = fill_from_cache(x, residual, None, None, in_place)
        else:
            full = fill_from_cache(x, residual, plan.index, image, in_place)
        return _replace_output(output, position, full)


def _replace_output(output: Any, position: int, full: torch.Tensor) -> Any:
    """The block's output with its image tokens (at ``position`` of a tuple) replaced by ``full``."""
    if isinstance(output, tuple):
        return (*output[:position], full, *output[position + 1 :])
    return full


def _forecast(
    previous: torch.Tensor | None,
    last: torch.Tensor,
    weight: float | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``last`` moved along its change since ``previous``: ``previous + weight * (last - previous)``
    (written into ``out`` when given); ``last`` itself when there is nothing to compare with (a first
    refresh, no time)."""
    if previous is None or weight is None or previous.shape != last.shape:
        return last if out is None else out.copy_(last)
    return torch.lerp(previous, last, weight) if out is None else torch.lerp(previous, last, weight, out=out)


class _CachedKeysMode(TorchFunctionMode):
    """On the stack while one attention module of a block runs: keeps the image tokens' keys and values
    of its attention call at a refresh; at a partial step renews those of the computed tokens and gives
    the call the kept ones of the others in their place among the image keys and values."""

    def __init__(self, plan: CachePlan, site: Site, block_name: str) -> None:
        super().__init__()
        self.plan = plan
        self.site = site
        self.block_name = block_name
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Args = (), kwargs: Kwargs | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        options = {**kwargs, **dict(zip(SDPA_PARAMETERS, args, strict=False))}
        query, key, value = options.pop("query"), options.pop("key"), options.pop("value")
        plan, num = self.plan, self.plan.num_merged
        text = self.site.text_first or self.site.image_first
        seq = int(key.shape[-2])
        if (
            self.calls > 1
            or key.dim() != 4
            or key.shape[0] != plan.batch
            or int(query.shape[-2]) != seq
            or seq < num
            or (not text and seq != num)
        ):
            raise MergeCallError(
                f"method='cache' (cache_context='all') expected one self-attention call over the "
                f"{num} image tokens{' and the text' if text else ''} "
                f"in the attention of block '{self.block_name}', got keys {tuple(key.shape)} for queries "
                f"{tuple(query.shape)} (call {self.calls}); use cache_context='computed'."
            )
        start = 0 if self.site.image_first else seq - num
        image = slice(start, start + num)
        entry, module = plan.entry, id(self.site.module)
        linear = plan.time is not None
        if plan.index is None:
            if linear:  # BlockCacheAction renews the times after the block
                old = entry.keys_values.get(module)
                if old is None:
                    entry.previous_keys_values.pop(module, None)
                else:
                    entry.previous_keys_values[module] = old
            entry.keys_values[module] = (
                key[:, :, image].detach().clone(),
                value[:, :, image].detach().clone(),
            )
            return func(query, key, value, **options)
        if options.get("attn_mask") is not None:
            raise MergeCallError(
                f"method='cache' (cache_context='all') cannot add kept keys to the masked attention call of "
                f"block '{self.block_name}'; use cache_context='computed'."
            )
        kept = entry.keys_values.get(module)
        if kept is None or kept[0].shape[2] != plan.num_tokens:
            raise MergeCallError(
                f"method='cache' found no keys kept at the last refresh for the attention of block "
                f"'{self.block_name}'; its attention call must be the same at every step."
            )
        previous = entry.previous_keys_values.get(module) if linear else None
        weight = plan.forecast_weight
        computed = plan.index[:, None, :, None]
        # The image part of the keys and values becomes every image token's, in grid order, written
        # straight into the sequence the call gets (no concatenation afterwards); the queries stay the
        # computed tokens' (attention does not depend on the keys' order).
        others = slice(num, seq) if self.site.image_first else slice(0, seq - num)
        others_after = slice(plan.num_tokens, None) if self.site.image_first else others
        every_image = slice(image.start, image.start + plan.num_tokens)
        whole = []
        for which, (cached, fresh) in enumerate(zip(kept, (key, value), strict=True)):
            rows = computed.expand(-1, cached.shape[1], -1, cached.shape[3])
            new = fresh[:, :, image]
            sequence = fresh.new_empty(*fresh.shape[:2], seq - num + plan.num_tokens, fresh.shape[3])
            image_part = sequence[:, :, every_image]
            if linear:
                # As the residuals: the refresh's keys and values moved on to this call's time, the
                # computed tokens' own put in for this call only.
                _forecast(None if previous is None else previous[which], cached, weight, out=image_part)
                image_part.scatter_(2, rows, new)
            else:
                image_part.copy_(cached.scatter_(2, rows, new))
            sequence[:, :, others_after] = fresh[:, :, others]
            whole.append(sequence)
        return func(query, whole[0], whole[1], **options)


class CachedKeysAction(SiteAction):
    """Around a block's self- or joint-attention module (``cache_context="all"``): the computed tokens of
    a partial step attend to every image token, the others through their kept keys and values
    (:class:`_CachedKeysMode`). Acts on the attention sites whose :attr:`Site.inside` call site says
    where the image tokens sit in the attention sequence."""

    uses_output: ClassVar[bool] = True
    after_on_error: ClassVar[bool] = True

    def __init__(self, call_site: Site | None = None) -> None:
        self.call_site = call_site

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        inside = site.inside
        if site.role == "call" or inside is None or inside.role != "call":
            return None
        return CachedKeysAction(inside)

    def before(self, plan: CachePlan, site: Site, block_name: str, args: Args, kwargs: Kwargs) -> None:
        assert self.call_site is not None
        torch._C._push_on_torch_function_stack(_CachedKeysMode(plan, self.call_site, block_name))
        return None

    def after(self, plan: CachePlan, output: Any) -> Any:
        mode = pop_own_mode(_CachedKeysMode, "keeps keys for")
        if mode.calls == 0:
            raise MergeCallError(
                f"method='cache' (cache_context='all') saw no attention call "
                f"(torch.nn.functional.scaled_dot_product_attention) in the attention of block "
                f"'{mode.block_name}': its attention backend computes attention another way. Use diffusers' "
                "native backend (model.reset_attention_backend()), or cache_context='computed'."
            )
        return None
