"""Bipartite soft matching: pair each src token with its most similar dst token, merge the top r."""

from __future__ import annotations

import torch

from tomediff.ops.merge import MergePlan
from tomediff.ops.partition import Partition

__all__ = ["DEFAULT_MAX_SCORE_ELEMENTS", "best_dst_for_src", "plan_merge"]

# Upper bound on the entries of one block of the src×dst similarity matrix (4M entries = 16 MB in
# fp32). Large enough that SD's 64×64 level (3072×1024 per sample) runs as a single matmul, small
# enough that a 2048² image (49152×16384 per sample, 3.2 GB) never materialises.
DEFAULT_MAX_SCORE_ELEMENTS = 1 << 22


def best_dst_for_src(
    metric: torch.Tensor, partition: Partition, max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every src token to its most similar dst token.

    The similarity matrix is computed in row blocks of src tokens, keeping only each row's max,
    so memory is ``O(max_score_elements + N)`` instead of ``O(Ns * Nd)``. Only dst vectors are
    normalised up front; a src row's norm is divided out of its maximum afterwards (the argmax
    over dst does not depend on it), which saves normalising and copying the whole metric.

    Args:
        metric: ``[B, N, C]`` token features (the block input).
        partition: dst/src split of the N tokens.
        max_score_elements: largest ``B * rows * Nd`` similarity block held at once.

    Returns:
        ``score``: ``[B, Ns]`` cosine similarity of each src token (in ``partition.src_idx`` order)
        to its best dst; ``choice``: ``[B, Ns]`` int64 index into ``partition.dst_idx`` of that dst.
    """
    batch, _, _ = metric.shape
    # The block input is often a channel-last view of a convolution output; index_select on it would
    # copy the whole tensor for every row block, so make it contiguous once.
    metric = metric.contiguous()
    num_src, num_dst = partition.num_src, partition.num_dst
    tiny = torch.finfo(metric.dtype).tiny
    dst = metric.index_select(1, partition.dst_idx)
    dst_t = (dst / dst.norm(dim=-1, keepdim=True).clamp_min_(tiny)).transpose(1, 2)

    score = metric.new_empty(batch, num_src)
    choice = torch.empty(batch, num_src, dtype=torch.int64, device=metric.device)
    rows_per_block = max(1, max_score_elements // max(1, batch * num_dst))
    for start in range(0, num_src, rows_per_block):
        stop = min(num_src, start + rows_per_block)
        src = metric.index_select(1, partition.src_idx[start:stop])
        best, best_idx = torch.bmm(src, dst_t).max(dim=-1)
        score[:, start:stop] = best / src.norm(dim=-1).clamp_min_(tiny)
        choice[:, start:stop] = best_idx
    return score, choice


def plan_merge(
    metric: torch.Tensor,
    partition: Partition,
    num_remove: int,
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
) -> MergePlan | None:
    """Greedy top-r bipartite merge plan (ToMe for SD): the ``num_remove`` src tokens most similar
    to their best dst are merged into it; all other tokens keep a slot of their own.

    Args:
        metric: ``[B, N, C]`` features to compare (the block input), ``N = partition.num_tokens``.
        partition: dst/src split of the grid.
        num_remove: ``r``, tokens removed; ``M = N - r`` slots remain.

    Returns:
        A :class:`MergePlan`, or None when nothing can be merged (``r == 0`` or no dst tokens,
        e.g. a grid smaller than one window).
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens != partition.num_tokens:
        raise ValueError(
            f"metric has {num_tokens} tokens but the partition is for a {partition.height}x"
            f"{partition.width} grid ({partition.num_tokens} tokens)."
        )
    num_dst, num_src = partition.num_dst, partition.num_src
    # ratio <= 1 - 1/(sx*sy) already guarantees r <= Ns; min() only absorbs float rounding.
    num_remove = min(num_remove, num_src)
    if num_remove <= 0 or num_dst == 0:
        return None
    device = metric.device
    with torch.no_grad():
        score, choice = best_dst_for_src(metric, partition, max_score_elements)
        order = score.argsort(dim=1, descending=True)
        merged, kept = order[:, :num_remove], order[:, num_remove:]

        src_slot = torch.empty(batch, num_src, dtype=torch.int64, device=device)
        src_slot.scatter_(1, merged, choice.gather(1, merged))
        own_slots = torch.arange(num_dst, num_dst + num_src - num_remove, device=device)
        src_slot.scatter_(1, kept, own_slots.expand(batch, -1))

        slot = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)
        slot[:, partition.dst_idx] = torch.arange(num_dst, device=device)
        slot[:, partition.src_idx] = src_slot

        num_merged = num_tokens - num_remove
        flat_slot = slot.add_(torch.arange(batch, device=device).unsqueeze(1) * num_merged).view(-1)
        counts = torch.zeros(batch * num_merged, dtype=torch.float32, device=device)
        counts.index_add_(0, flat_slot, torch.ones(flat_slot.shape[0], dtype=torch.float32, device=device))
        inv_count = counts.reciprocal_().to(metric.dtype).unsqueeze(1)
    return MergePlan(flat_slot, inv_count, batch, num_tokens, num_merged)
