"""Pure tensor functions of token-wise caching: which tokens a block recomputes, and putting the
computed tokens back among the cached ones. No model imports."""

from __future__ import annotations

import torch

__all__ = [
    "changed_tokens",
    "fill_from_cache",
    "gather_tokens",
    "scatter_tokens",
    "strided_tokens",
]


def changed_tokens(x: torch.Tensor, reference: torch.Tensor, num: int, shared: bool) -> torch.Tensor:
    """The ``num`` tokens whose value moved most from ``reference``, relative to its norm.

    ``x``, ``reference``: ``[B, N, C]``. Returns ``[B, num]`` token indices, ascending per row; with
    ``shared`` one set for the whole batch (scores summed over it), repeated in every row.
    """
    change = (x - reference).float().norm(dim=-1) / reference.float().norm(dim=-1).clamp_min(1e-6)
    if shared:
        change = change.sum(dim=0, keepdim=True)
    index = change.topk(num, dim=-1, sorted=False).indices.sort(dim=-1).values
    return index.expand(x.shape[0], -1) if shared else index


def strided_tokens(batch: int, num_tokens: int, num: int, step: int, device: torch.device) -> torch.Tensor:
    """``num`` tokens spread evenly over ``num_tokens``, shifted by one at each ``step`` so that every
    token is computed within ``ceil(num_tokens / num)`` steps. Returns ``[batch, num]``, ascending."""
    spacing = max(1, num_tokens // num)
    index = (torch.arange(num, device=device) * num_tokens) // num + step % spacing
    index = index.clamp_max(num_tokens - 1).unique()  # a no-op unless num does not divide num_tokens
    if index.numel() < num:  # fill up with the first tokens not yet chosen
        chosen = torch.zeros(num_tokens, dtype=torch.bool, device=device)
        chosen[index] = True
        index = torch.cat([index, (~chosen).nonzero().flatten()[: num - index.numel()]]).sort().values
    return index.expand(batch, -1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]``: ``[B, N, C]``, ``[B, M]`` -> ``[B, M, C]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` ``[B, M, C]`` into ``target`` ``[B, N, C]`` at rows ``index`` ``[B, M]``, in
    place; returns ``target``."""
    return target.scatter_(1, index.unsqueeze(-1).expand(-1, -1, target.shape[-1]), values)


def fill_from_cache(
    x: torch.Tensor,
    residual: torch.Tensor,
    index: torch.Tensor | None,
    computed: torch.Tensor | None,
    in_place: bool = False,
) -> torch.Tensor:
    """A block's full output from its ``computed`` tokens ``[B, M, C]`` (rows ``index`` ``[B, M]``):
    those as computed, every other token its input ``x`` plus its cached ``residual`` (``[B, N, C]``);
    with ``index`` None, every token from the cache. ``in_place``: ``residual`` is the caller's own
    temporary of ``x``'s dtype, and the output is built in it (no new tensor of that size)."""
    full = residual.add_(x) if in_place else x + residual.to(x.dtype)
    if index is None:
        return full
    assert computed is not None, "computed tokens come with their rows"
    return scatter_tokens(full, index, computed)
