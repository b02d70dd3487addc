"""Bipartite soft matching: pair each src token with its most similar dst token, merge the top r."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tomediff.ops.kernels import COUNT_RANKS_MAX_SRC, best_dst_triton, plan_slots_triton, triton_enabled
from tomediff.ops.merge import MergePlan
from tomediff.ops.partition import Partition

__all__ = [
    "CPU_MAX_SCORE_ELEMENTS",
    "Backend",
    "PlanConstants",
    "best_dst_for_src",
    "plan_constants",
    "plan_merge",
    "score_block_elements",
]

Backend = Literal["auto", "torch", "triton"]

# CPU: upper bound on the entries of one block of the src×dst similarity matrix (4M entries = 16 MB
# in fp32), sized for the caches: SD's 64×64 level (3072×1024 per sample) is one matmul, and a 2048²
# image (49152×16384 per sample, 3.2 GB) never materialises.
CPU_MAX_SCORE_ELEMENTS = 1 << 22
# Accelerators: a block as large as one copy of the block input (B·N·C entries), so the matmul runs in
# a handful of launches while the block never holds more than its own attention does (q, k and v are
# each that size), and at least 32M entries so small grids are a single matmul.
_ACCELERATOR_MIN_SCORE_ELEMENTS = 1 << 25


def score_block_elements(metric: torch.Tensor, num_dst: int) -> int:
    """Similarity-block size (entries) for the torch path on ``metric``'s device.

    Args:
        metric: ``[B, N, C]`` block input.
        num_dst: dst tokens per sample (the block's row length).
    """
    if metric.device.type == "cpu":
        return CPU_MAX_SCORE_ELEMENTS
    batch, num_tokens, channels = metric.shape
    return max(_ACCELERATOR_MIN_SCORE_ELEMENTS, batch * num_tokens * channels, batch * num_dst)


def _best_dst_torch(
    metric: torch.Tensor, partition: Partition, max_score_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = metric.shape[0]
    num_src, num_dst = partition.num_src, partition.num_dst
    tiny = torch.finfo(metric.dtype).tiny
    dst = metric.index_select(1, partition.dst_idx)
    dst_t = (dst / dst.norm(dim=-1, keepdim=True).clamp_min_(tiny)).transpose(1, 2)
    rows_per_block = max(1, max_score_elements // max(1, batch * num_dst))
    if rows_per_block >= num_src:  # one block: no output buffers to fill
        src = metric.index_select(1, partition.src_idx)
        best, choice = torch.bmm(src, dst_t).max(dim=-1)
        return best.div_(src.norm(dim=-1).clamp_min_(tiny)), choice
    score = metric.new_empty(batch, num_src)
    choice = torch.empty(batch, num_src, dtype=torch.int64, device=metric.device)
    for start in range(0, num_src, rows_per_block):
        stop = min(num_src, start + rows_per_block)
        src = metric.index_select(1, partition.src_idx[start:stop])
        best, best_idx = torch.bmm(src, dst_t).max(dim=-1)
        score[:, start:stop] = best / src.norm(dim=-1).clamp_min_(tiny)
        choice[:, start:stop] = best_idx
    return score, choice


def _use_triton(metric: torch.Tensor, backend: Backend) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}.")
    return backend == "triton" or (backend == "auto" and triton_enabled(metric))


def best_dst_for_src(
    metric: torch.Tensor,
    partition: Partition,
    max_score_elements: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every src token to its most similar dst token.

    Two implementations give the same result: a fused Triton kernel (CUDA; tiles of src × dst with a
    running max per row, so the similarity matrix never exists) and the torch reference, which
    computes the matrix in row blocks of ``max_score_elements`` entries and keeps each row's max.
    The torch path normalises only the dst vectors up front and divides a src row's norm out of its
    maximum afterwards (the argmax over dst does not depend on it). Ties go to the lowest dst index.

    Args:
        metric: ``[B, N, C]`` token features (the block input).
        partition: dst/src split of the N tokens.
        max_score_elements: torch path only: largest ``B * rows * Nd`` similarity block held at once;
            default :func:`score_block_elements` for the metric's device.
        backend: ``"auto"`` (Triton for CUDA tensors when available, else torch), ``"torch"`` or
            ``"triton"`` (CPU tensors then run in Triton's interpreter, for tests).

    Returns:
        ``score``: ``[B, Ns]`` cosine similarity of each src token (in ``partition.src_idx`` order)
        to its best dst (float32 from Triton, the metric's dtype from torch); ``choice``: ``[B, Ns]``
        int64 index into ``partition.dst_idx`` of that dst.
    """
    if _use_triton(metric, backend):
        return best_dst_triton(metric, partition.src_idx, partition.dst_idx)
    # The block input is often a channel-last view of a convolution output; index_select on it would
    # copy the whole tensor for every row block, so make it contiguous once.
    metric = metric.contiguous()
    if max_score_elements is None:
        max_score_elements = score_block_elements(metric, partition.num_dst)
    return _best_dst_torch(metric, partition, max_score_elements)


@dataclass(frozen=True, eq=False)
class PlanConstants:
    """Index tensors every plan of one shape shares; independent of the data and of the partition.

    Attributes:
        dst_slots: ``[B, Nd]`` int64, ``b * M + j``: flat slot of the j-th dst token of sample b.
        kept_slots: ``[B, Ns - r]`` int64, ``b * M + Nd + i``: flat slots of the unmerged src tokens.
        batch_offset: ``[B, 1]`` int64, ``b * M``.
        ones: ``[B * r]`` float32 ones, the count each merged src token adds to its dst slot.
    """

    dst_slots: torch.Tensor
    kept_slots: torch.Tensor
    batch_offset: torch.Tensor
    ones: torch.Tensor


def plan_constants(
    batch: int, num_dst: int, num_src: int, num_remove: int, device: torch.device | str
) -> PlanConstants:
    """Build the :class:`PlanConstants` for ``batch`` samples, ``Nd``/``Ns`` tokens, ``r`` removed."""
    num_merged = num_dst + num_src - num_remove
    batch_offset = torch.arange(batch, device=device).mul_(num_merged).unsqueeze(1)
    dst_slots = torch.arange(num_dst, device=device).unsqueeze(0) + batch_offset
    kept_slots = torch.arange(num_dst, num_dst + num_src - num_remove, device=device).unsqueeze(0)
    return PlanConstants(
        dst_slots=dst_slots,
        kept_slots=kept_slots + batch_offset,
        batch_offset=batch_offset,
        ones=torch.ones(batch * num_remove, dtype=torch.float32, device=device),
    )


def _rank(score: torch.Tensor) -> torch.Tensor:
    """``[B, Ns]`` src positions by decreasing score; equal scores in position order (a stable sort,
    as the Triton slot kernel counts ranks), NaN first."""
    return score.argsort(dim=1, descending=True, stable=True)


def plan_merge(
    metric: torch.Tensor,
    partition: Partition,
    num_remove: int,
    max_score_elements: int | None = None,
    constants: PlanConstants | None = None,
    backend: Backend = "auto",
) -> MergePlan | None:
    """Greedy top-r bipartite merge plan (ToMe for SD): the ``num_remove`` src tokens most similar
    to their best dst are merged into it; all other tokens keep a slot of their own.

    Slots ``[0, Nd)`` of a sample are its dst tokens, ``[Nd, M)`` its unmerged src tokens in order
    of decreasing similarity. Src tokens of equal similarity rank in token order (a NaN similarity
    ranks first, as in a descending sort), so exactly equal similarities (all-zero tokens, say) give
    the same plan on every backend and grid size. No step synchronises with the host.

    Args:
        metric: ``[B, N, C]`` features to compare (the block input), ``N = partition.num_tokens``.
        partition: dst/src split of the grid.
        num_remove: ``r``, tokens removed; ``M = N - r`` slots remain.
        max_score_elements, backend: see :func:`best_dst_for_src`.
        constants: from :func:`plan_constants` for this shape (a caller reusing them across calls
            saves their construction); built here when None. Only the torch path uses them: the
            Triton slot kernel computes the slots directly.

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
    num_merged = num_tokens - num_remove
    with torch.no_grad():
        score, choice = best_dst_for_src(metric, partition, max_score_elements, backend)
        if _use_triton(metric, backend):  # the ranking (small grids), slots and counts in one launch
            order = None if num_src <= COUNT_RANKS_MAX_SRC else _rank(score)
            flat_slot, counts = plan_slots_triton(
                score, choice, partition.src_idx, partition.dst_idx, num_remove, order=order
            )
            return MergePlan(flat_slot, counts, batch, num_tokens, num_merged)
        order = _rank(score)
        if constants is None:
            constants = plan_constants(batch, num_dst, num_src, num_remove, device)
        merged, kept = order[:, :num_remove], order[:, num_remove:]
        merged_slot = choice.gather(1, merged).add_(constants.batch_offset)

        src_slot = torch.empty(batch, num_src, dtype=torch.int64, device=device)
        src_slot.scatter_(1, merged, merged_slot)
        src_slot.scatter_(1, kept, constants.kept_slots)
        slot = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)
        slot.index_copy_(1, partition.dst_idx, constants.dst_slots)
        slot.scatter_(1, partition.src_idx.expand(batch, -1), src_slot)

        counts = torch.ones(batch * num_merged, dtype=torch.float32, device=device)
        if device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
            # Sums of ones are exact in any order, but torch refuses index_add_ on CUDA in this mode.
            counts.index_put_((merged_slot.view(-1),), constants.ones, accumulate=True)
        else:
            counts.index_add_(0, merged_slot.view(-1), constants.ones)
    return MergePlan(slot.view(-1), counts.unsqueeze(1), batch, num_tokens, num_merged)
