"""Token-wise caching (``method="cache"``): a reducer deciding which image tokens a block computes, and
a block-level site action that runs the block on those tokens and fills in the others from the cache.

At a refresh step every token goes through the block, and the block keeps each image token's residual
(output minus input). At the steps between, only the chosen tokens go through it (text tokens always
do); every other token's output is its current input plus its kept residual, and the computed tokens
renew their entries. The cache follows the rules of kept plans (:class:`ReusingReducer`): it lives in
the calling thread's memory of the current generation, under the block, batch size, grid, device,
dtype and which call of the timestep this is, so nothing crosses generations, batches or threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tomediff.config import ToMeConfig
from tomediff.core.actions import SiteAction
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

__all__ = ["BlockCacheAction", "CacheEntry", "CachePlan", "TokenCacheReducer"]


@dataclass
class CacheEntry:
    """One block's cache in one thread's generation.

    Attributes:
        residual: ``[B, N, C]`` each image token's output minus input when it was last computed.
        reference: ``[B, N, C]`` each image token's input when it was last computed (``"change"`` only).
        refreshed_at: the thread's step count at the last refresh.
        partial_steps: steps since that refresh.
    """

    residual: torch.Tensor | None = None
    reference: torch.Tensor | None = None
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

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_merged(self) -> int:
        """Image tokens the block computes in this call."""
        return self.num_tokens if self.index is None else int(self.index.shape[1])

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
        keeps_reference = cfg.cache_select == "change"
        num = max(1, round(cfg.cache_ratio * request.metric.shape[1]))
        if entry is None:
            entry = CacheEntry()
            memory.plans[key] = (entry, memory.steps, memory.generation)
        stale = memory.steps - entry.refreshed_at >= cfg.cache_interval
        # No residual yet: a new entry, or one whose refresh call raised before the block returned.
        if entry.residual is None or stale or num >= x.shape[1]:
            entry.refreshed_at, entry.partial_steps = memory.steps, 0
            self._count(request.block_name, 0)
            return CachePlan(entry, x, None, None, keeps_reference)
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
        return CachePlan(entry, x, index, positions, keeps_reference)

    def _count(self, block: str, which: int) -> None:
        with self._lock:
            self.counts.setdefault(block, [0, 0])[which] += 1

    def report_lines(self) -> list[str]:
        cfg = self.config
        if not self.counts:
            return []
        refresh = sorted({c[0] for c in self.counts.values()})
        partial = sorted({c[1] for c in self.counts.values()})
        return [
            f"token cache: refresh every {cfg.cache_interval} steps, {cfg.cache_ratio:g} of the image "
            f"tokens computed between (chosen by '{cfg.cache_select}'); block calls so far: "
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
            entry.residual = (image.detach() - x).to(x.dtype)
            # A copy: the block's caller may reuse its input tensor in place.
            entry.reference = x.clone() if plan.keeps_reference else None
            return None
        assert entry.residual is not None
        computed = image.detach()
        scatter_tokens(entry.residual, plan.index, computed - gather_tokens(x, plan.index))
        if plan.keeps_reference:
            assert entry.reference is not None
            scatter_tokens(entry.reference, plan.index, gather_tokens(x, plan.index))
        full = fill_from_cache(x, entry.residual, plan.index, image)
        if isinstance(output, tuple):
            return (*output[:position], full, *output[position + 1 :])
        return full
