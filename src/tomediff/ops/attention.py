"""Reducing the image tokens of one attention call, after positions (rotary) are applied.

An attention call ``softmax(q kᵀ · scale) v`` with ``q, k, v: [B, heads, S, D]`` whose sequence holds
``N`` image tokens at ``[start, start + N)`` (the rest: text, registers) is reduced by

* giving it fewer image keys/values (``AttentionPlan.keys``): merged with a token plan (``merge``), or
  taken from a downsampled grid (``reduce``; a plain selection when the plan has a ``kept_index``);
* and optionally fewer image queries (``AttentionPlan.queries``): merged, and the output of each merged
  query copied back to all the positions it stands for.

Tokens outside the image span are never touched. Every query and key already carries its position, so
nothing else (no rotary table) has to follow the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tomediff.ops.matching import plan_merge
from tomediff.ops.partition import draw_dst_offsets, grid_partition

__all__ = ["AttentionPlan", "attention_merge_plan", "paired_plan", "reduced_attention"]


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """What an attention call does with the image tokens of one block call.

    Attributes:
        queries: a plan with ``merge``/``unmerge`` (``[B, N, C] <-> [B, Mq, C]``) for the queries, or
            None to keep every query.
        keys: a plan for the keys and values: ``merge`` (a merge plan) or ``reduce`` (a downsampled
            grid), or None to keep them all.
    """

    queries: Any
    keys: Any

    @property
    def _any(self) -> Any:
        return self.keys if self.keys is not None else self.queries

    @property
    def batch(self) -> int:
        return int(self._any.batch)

    @property
    def num_tokens(self) -> int:
        return int(self._any.num_tokens)

    @property
    def num_merged(self) -> int:
        """Image keys/values left (all of them when only queries are reduced)."""
        return int(self.keys.num_merged) if self.keys is not None else self.num_tokens

    @property
    def num_queries(self) -> int:
        return int(self.queries.num_merged) if self.queries is not None else self.num_tokens

    def sample(self, index: int) -> AttentionPlan:
        """The plan of batch element ``index`` alone, for a model that calls attention once per sample
        (Mochi). Its token plans need a ``sample(index)`` method."""
        keys = _sample(self.keys, index)
        queries = keys if self.queries is self.keys else _sample(self.queries, index)
        return AttentionPlan(queries, keys)


def _sample(plan: Any, index: int) -> Any:
    if plan is None or plan.batch == 1:
        return plan
    if not hasattr(plan, "sample"):
        raise TypeError(f"a {type(plan).__name__} cannot be split by batch element (it has no sample()).")
    return plan.sample(index)


def _heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D] -> [B, N, H*D]``."""
    batch, heads, num, dim = x.shape
    return x.transpose(1, 2).reshape(batch, num, heads * dim)


def _tokens_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, M, H*D] -> [B, H, M, D]``."""
    batch, num, channels = x.shape
    return x.view(batch, num, heads, channels // heads).transpose(1, 2)


def _splice(x: torch.Tensor, start: int, num: int, image: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its ``[start, start + num)`` slice along ``dim`` replaced by ``image``."""
    # Empty parts are concatenated as they are: a test of their size would be data-dependent under
    # torch.compile where the sequence length is (Mochi's per-sample caption keys).
    parts = [x.narrow(dim, 0, start), image, x.narrow(dim, start + num, x.shape[dim] - start - num)]
    return torch.cat(parts, dim=dim)


def _full_index(kept: torch.Tensor, start: int, num: int, total: int) -> torch.Tensor:
    """Indices along the whole sequence: the tokens before the span, the kept ones, those after."""
    device = kept.device
    before = torch.arange(start, device=device)
    after = torch.arange(start + num, total, device=device)
    return torch.cat([before, kept + start, after])


def _kept_index(plan: Any, device: torch.device) -> torch.Tensor | None:
    method = getattr(plan, "kept_index", None)
    return None if method is None else method(device)


def _reduce_tokens(plan: Any, tokens: torch.Tensor) -> torch.Tensor:
    return plan.reduce(tokens) if hasattr(plan, "reduce") else plan.merge(tokens)


def _reduce_key_axis(
    x: torch.Tensor, plan: Any, start: int, num: int, index: torch.Tensor | None
) -> torch.Tensor:
    """Keys or values ``[B, H, S, D] -> [B, H, S - N + M, D]``."""
    if index is not None:
        return x.index_select(2, index)
    image = _tokens_to_heads(_reduce_tokens(plan, _heads_to_tokens(x.narrow(2, start, num))), x.shape[1])
    return _splice(x, start, num, image, 2)


def _reduce_mask_axis(
    mask: torch.Tensor, dim: int, plan: Any, start: int, num: int, index: torch.Tensor | None
) -> torch.Tensor:
    """A mask's query (``dim=-2``) or key (``dim=-1``) axis reduced like the tokens (broadcast axes stay)."""
    if mask.shape[dim] == 1:
        return mask
    if index is not None:
        return mask.index_select(dim, index)
    if not hasattr(plan, "merge_mask"):
        raise ValueError(
            f"an attention mask with a token axis of {mask.shape[dim]} cannot be reduced by a "
            f"{type(plan).__name__} (only selections and merges can)"
        )
    image = plan.merge_mask(mask.narrow(dim, start, num), dim)
    return _splice(mask, start, num, image, dim % mask.dim())


def reduced_attention(
    attention: Callable[..., torch.Tensor],
    plan: AttentionPlan,
    start: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    query_start: int | None = None,
    **options: Any,
) -> torch.Tensor:
    """``attention(query, key, value, attn_mask=..., **options)`` (``F.scaled_dot_product_attention``'s
    signature and ``[B, heads, S, D]`` layout) with the image tokens at ``[start, start + N)`` reduced
    by ``plan``; returns the ``[B, heads, S, Dv]`` output at full length. ``query_start``: the image
    queries start there instead (queries and keys of different sequences, e.g. image queries attending
    to ``[text, image]`` keys).
    """
    num = plan.num_tokens
    if plan.keys is not None:
        index = _kept_index(plan.keys, key.device)
        full = None if index is None else _full_index(index, start, num, key.shape[2])
        key = _reduce_key_axis(key, plan.keys, start, num, full)
        value = _reduce_key_axis(value, plan.keys, start, num, full)
        if attn_mask is not None and attn_mask.dim() >= 1:
            attn_mask = _reduce_mask_axis(attn_mask, -1, plan.keys, start, num, full)
    queries = plan.queries
    if queries is None:
        return attention(query, key, value, attn_mask=attn_mask, **options)
    start = start if query_start is None else query_start
    merged = _tokens_to_heads(queries.merge(_heads_to_tokens(query.narrow(2, start, num))), query.shape[1])
    query = _splice(query, start, num, merged, 2)
    if attn_mask is not None and attn_mask.dim() >= 2:
        attn_mask = _reduce_mask_axis(attn_mask, -2, queries, start, num, None)
    out = attention(query, key, value, attn_mask=attn_mask, **options)
    image = out.narrow(2, start, queries.num_merged)
    restored = _tokens_to_heads(queries.unmerge(_heads_to_tokens(image)), out.shape[1])
    return _splice(out, start, queries.num_merged, restored, 2)


def paired_plan(
    plan_at: Callable[[float], Any], ratio: float, kv_ratio: float | None
) -> AttentionPlan | None:
    """The :class:`AttentionPlan` of a q+kv reduction: the queries' plan at ``ratio`` (0 keeps every
    query) and the keys/values' at ``kv_ratio`` (None: the queries' plan; 0 keeps them all), with
    ``plan_at(r)`` the plan removing the fraction ``r`` of the image tokens (or None). One plan serves
    both when the ratios are equal. None when neither side is reduced."""
    queries = plan_at(ratio) if ratio > 0 else None
    if kv_ratio is None or kv_ratio == ratio:
        keys = queries
    elif kv_ratio > 0:
        keys = plan_at(kv_ratio)
    else:
        keys = None
    if queries is None and keys is None:
        return None
    return AttentionPlan(queries, keys)


def attention_merge_plan(
    metric: torch.Tensor,
    height: int,
    width: int,
    ratio: float,
    kv_ratio: float | None = None,
    *,
    sx: int = 2,
    sy: int = 2,
    generator: torch.Generator | None = None,
) -> AttentionPlan | None:
    """ToMe's q+kv merge plan for one attention call, from features of its image tokens alone.

    Args:
        metric: ``[B, N, C]`` features the tokens are matched on (e.g. the image keys, heads
            concatenated), ``N = height * width`` in row-major order (video: frames stacked in ``height``).
        ratio, kv_ratio: fractions of the ``N`` image queries and keys/values merged away (see
            :func:`paired_plan`); each at most ``1 - 1/(sx*sy)``.
        sx, sy: the window holding one destination token.
        generator: a CPU generator the dst token of each window is drawn from; None: the top-left one.

    Returns:
        The plan for :func:`reduced_attention` (the same partition for queries and keys/values, one
        matching per sample), or None when nothing is merged (ratios 0, or a grid under one window).
    """
    num_tokens = metric.shape[1]
    if num_tokens != height * width:
        raise ValueError(f"metric has {num_tokens} tokens, not the {height}x{width} grid's {height * width}.")
    offsets = draw_dst_offsets(height, width, sx, sy, generator).to(metric.device)
    partition = grid_partition(height, width, sx, sy, offsets)
    return paired_plan(lambda r: plan_merge(metric, partition, int(num_tokens * r)), ratio, kv_ratio)
