"""Triton fast paths of the matching and merging ops (CUDA; on the CPU only through Triton's interpreter).

The plain torch functions in :mod:`tomediff.ops.matching` and :mod:`tomediff.ops.merge` are the
reference; these kernels compute the same results with fewer launches and without materialising the
src × dst similarity matrix. They are chosen automatically for CUDA tensors when Triton imports, and
can be turned off with the environment variable ``TOMEDIFF_DISABLE_TRITON=1``.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; the kernels' globals must see ``tl`` for the interpreter.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = [
    "BEST_DST_LABEL",
    "COUNT_RANKS_MAX_SRC",
    "DST_NORM_LABEL",
    "INLINE_NORMS_MAX_DST",
    "PLAN_SLOTS_LABEL",
    "SCATTER_ADD_LABEL",
    "best_dst_tiles",
    "best_dst_triton",
    "dst_inv_norms",
    "launch_best_dst",
    "plan_slots_triton",
    "scatter_add_triton",
    "triton_enabled",
]

# Profiler labels around each launch (one kernel each), also used by the tests that count launches.
BEST_DST_LABEL = "tomediff::best_dst_triton"
SCATTER_ADD_LABEL = "tomediff::scatter_add_triton"
PLAN_SLOTS_LABEL = "tomediff::plan_slots_triton"
DST_NORM_LABEL = "tomediff::dst_inv_norm_triton"

# Tile sizes used on the CPU interpreter (tests): small, so odd sizes exercise the masks.
_INTERPRETER_TILES = {"BLOCK_S": 16, "BLOCK_D": 16, "BLOCK_C": 16}


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether the automatic backend picks the Triton kernels for ``tensor``: a CUDA tensor, Triton
    importable, and not disabled by ``TOMEDIFF_DISABLE_TRITON``."""
    if not tensor.is_cuda or os.environ.get("TOMEDIFF_DISABLE_TRITON", "0") not in ("", "0"):
        return False
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The kernels are defined at import. Whether they run compiled or in Triton's CPU interpreter is fixed
# by TRITON_INTERPRET when triton is imported (its own library functions depend on it).
if triton is not None:

    @triton.jit
    def load_rows(ptr, mask, BF16_BITS: tl.constexpr):
        if BF16_BITS:
            # bfloat16 given as its int16 bits (Triton's interpreter cannot read bfloat16): the bits are
            # the top half of the equal float32.
            bits = tl.load(ptr, mask=mask, other=0)
            return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def squared_norms(
        row_ptr, row_ok, channels, BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        # [BLOCK_R] fp32 squared norms of the rows at row_ptr ([BLOCK_R, 1] pointers), in BLOCK_C chunks.
        chan = tl.arange(0, BLOCK_C)
        sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            ok = row_ok[:, None] & ((c0 + chan) < channels)[None, :]
            x = load_rows(row_ptr + (c0 + chan)[None, :], ok, BF16_BITS).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        return sq

    @triton.jit
    def dst_inv_norm_kernel(
        metric_ptr,
        dst_idx_ptr,
        out_ptr,
        num_dst,
        channels,
        stride_b,
        stride_n,
        tiny,
        BF16_BITS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # out[b, j] = 1 / max(|x[b, dst_idx[j]]|, tiny) in fp32, once per dst token (the main kernel
        # would otherwise recompute every dst norm once per src tile).
        batch = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_dst
        tok = tl.load(dst_idx_ptr + rows, mask=row_ok, other=0)
        row_ptr = metric_ptr + batch.to(tl.int64) * stride_b + tok[:, None] * stride_n
        sq = squared_norms(row_ptr, row_ok, channels, BF16_BITS, BLOCK_R, BLOCK_C)
        tl.store(out_ptr + batch * num_dst + rows, 1.0 / tl.maximum(tl.sqrt(sq), tiny), mask=row_ok)

    @triton.jit
    def best_dst_kernel(
        metric_ptr,
        src_idx_ptr,
        dst_idx_ptr,
        dst_inv_norm_ptr,
        score_ptr,
        choice_ptr,
        num_src,
        num_dst,
        channels,
        stride_b,
        stride_n,
        tiny,
        PRECISION: tl.constexpr,
        BF16_BITS: tl.constexpr,
        INLINE_NORMS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program: BLOCK_S src rows of one batch element against every dst token, keeping a
        # running (max, first argmax) per row; the Ns x Nd similarity matrix never exists. The loops
        # over dst tiles and channel chunks are one flat loop, so loads stay pipelined across tiles.
        # INLINE_NORMS: the dst norms are summed here from the loaded chunks (one launch less, for
        # small grids where launches cost more than the redundant sums); else read from dst_inv_norm.
        batch = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        row_ok = rows < num_src
        src_tok = tl.load(src_idx_ptr + rows, mask=row_ok, other=0)
        base = metric_ptr + batch.to(tl.int64) * stride_b  # B*N*C can pass 2**31
        src_ptr = base + src_tok[:, None] * stride_n
        chan = tl.arange(0, BLOCK_C)
        src_sq = squared_norms(src_ptr, row_ok, channels, BF16_BITS, BLOCK_S, BLOCK_C)

        best = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_S], dtype=tl.int32)
        cols_in_tile = tl.arange(0, BLOCK_D)
        num_chunks = tl.cdiv(channels, BLOCK_C)
        acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        dst_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for step in range(0, tl.cdiv(num_dst, BLOCK_D) * num_chunks):
            tile = step // num_chunks
            c0 = (step - tile * num_chunks) * BLOCK_C
            cols = tile * BLOCK_D + cols_in_tile
            col_ok = cols < num_dst
            dst_tok = tl.load(dst_idx_ptr + cols, mask=col_ok, other=0)
            ch_ok = (c0 + chan) < channels
            s = load_rows(src_ptr + (c0 + chan)[None, :], row_ok[:, None] & ch_ok[None, :], BF16_BITS)
            d_ptr = base + dst_tok[:, None] * stride_n + (c0 + chan)[None, :]
            d = load_rows(d_ptr, col_ok[:, None] & ch_ok[None, :], BF16_BITS)
            acc = tl.dot(s, tl.trans(d), acc, input_precision=PRECISION)
            if INLINE_NORMS:
                d32 = d.to(tl.float32)
                dst_sq += tl.sum(d32 * d32, axis=1)
            if c0 + BLOCK_C >= channels:  # the tile's last chunk: fold it into the running max
                if INLINE_NORMS:
                    inv_norm = 1.0 / tl.maximum(tl.sqrt(dst_sq), tiny)
                    dst_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
                else:
                    inv_norm = tl.load(dst_inv_norm_ptr + batch * num_dst + cols, mask=col_ok, other=0.0)
                sim = tl.where(col_ok[None, :], acc * inv_norm[None, :], float("-inf"))
                # First column reaching the tile's max: ties resolve to the lowest dst index, as torch.max.
                tile_best, tile_arg = tl.max(
                    sim, axis=1, return_indices=True, return_indices_tie_break_left=True
                )
                better = tile_best > best
                best = tl.where(better, tile_best, best)
                best_idx = tl.where(better, tile * BLOCK_D + tile_arg, best_idx)
                acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)

        score = best / tl.maximum(tl.sqrt(src_sq), tiny)
        out = batch * num_src + rows
        tl.store(score_ptr + out, score, mask=row_ok)
        tl.store(choice_ptr + out, best_idx.to(tl.int64), mask=row_ok)

    @triton.jit
    def plan_slots_kernel(
        score_ptr,
        order_ptr,
        choice_ptr,
        src_idx_ptr,
        dst_idx_ptr,
        slot_ptr,
        counts_ptr,
        num_src,
        num_dst,
        num_remove,
        COUNT_RANKS: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        # Rows i < Ns of batch b are src tokens, rows Ns..N-1 dst tokens (dst j gets slot j). A src
        # token's rank r_p in decreasing score decides its slot: the top r go to their best dst's slot
        # (adding one to its count), the others get slots Nd, Nd+1, ... in rank order. Slots are
        # flat: b * M + local slot.
        # COUNT_RANKS: row i is src position p = i and its rank is counted, O(Ns) per row, as the
        # number of scores above it (equal scores: lower positions first; NaN above every number), which
        # replaces a sort's several launches on small grids. Else row i is rank i and order[b, i] its
        # position (from a sort).
        batch = tl.program_id(1)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        num_tokens = num_src + num_dst
        num_merged = num_tokens - num_remove
        offset = batch * num_merged
        is_src = i < num_src
        is_dst = (i >= num_src) & (i < num_tokens)
        if COUNT_RANKS:
            pos = i
            rank = tl.zeros([BLOCK], dtype=tl.int32)
            if tl.program_id(0) * BLOCK < num_src:
                mine = tl.load(score_ptr + batch * num_src + i, mask=is_src, other=float("-inf"))
                mine = tl.where(mine != mine, float("inf"), mine)  # a cosine is never inf
                for q0 in range(0, num_src, BLOCK_Q):
                    q = q0 + tl.arange(0, BLOCK_Q)
                    theirs = tl.load(score_ptr + batch * num_src + q, mask=q < num_src, other=float("-inf"))
                    theirs = tl.where(theirs != theirs, float("inf"), theirs)
                    above = (theirs[None, :] > mine[:, None]) | (
                        (theirs[None, :] == mine[:, None]) & (q[None, :] < i[:, None])
                    )
                    above = above & (q < num_src)[None, :]
                    rank += tl.sum(above.to(tl.int32), axis=1)
        else:
            rank = i
            pos = tl.load(order_ptr + batch * num_src + i, mask=is_src, other=0)
        merged = is_src & (rank < num_remove)
        dst_pos = tl.load(choice_ptr + batch * num_src + pos, mask=merged, other=0)
        src_slot = tl.where(merged, dst_pos, num_dst + rank - num_remove) + offset
        tl.atomic_add(counts_ptr + src_slot, tl.full([BLOCK], 1.0, tl.float32), mask=merged)
        src_tok = tl.load(src_idx_ptr + pos, mask=is_src, other=0)
        tl.store(slot_ptr + batch * num_tokens + src_tok, src_slot.to(tl.int64), mask=is_src)
        j = i - num_src
        dst_tok = tl.load(dst_idx_ptr + j, mask=is_dst, other=0)
        tl.store(slot_ptr + batch * num_tokens + dst_tok, (j + offset).to(tl.int64), mask=is_dst)

    @triton.jit
    def scatter_add_kernel(
        x_ptr,
        slot_ptr,
        out_ptr,
        num_rows,
        channels,
        BF16_BITS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # out[slot[i], :] += float32(x[i, :]): the group sums accumulate in fp32 whatever x's dtype.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=0)
        chan = tl.arange(0, BLOCK_C)
        for c0 in range(0, channels, BLOCK_C):
            ch = c0 + chan
            ok = row_ok[:, None] & (ch < channels)[None, :]
            x = load_rows(x_ptr + rows.to(tl.int64)[:, None] * channels + ch[None, :], ok, BF16_BITS)
            tl.atomic_add(out_ptr + slot[:, None] * channels + ch[None, :], x.to(tl.float32), mask=ok)


def _check_launchable(tensor: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package; install it or use backend='torch'.")
    if not tensor.is_cuda and not _interpreting():
        raise RuntimeError(
            f"the Triton kernels run on CUDA tensors, or on CPU tensors only under Triton's interpreter "
            f"(TRITON_INTERPRET=1 set before triton is imported); got a tensor on {tensor.device}. "
            "Use backend='torch' on this device."
        )


def _kernel_view(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor as the kernels read it, and whether it is bfloat16 passed as int16 bits (the
    interpreter cannot load bfloat16; ``load_rows`` widens the bits in the kernel)."""
    if _interpreting() and tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16), True
    return tensor, False


# Up to this many dst tokens the best-dst kernel sums the dst norms itself (one launch instead of
# two): such grids are bound by launches, not by the kernel's arithmetic.
INLINE_NORMS_MAX_DST = 1024
# Inline norms only with tiles up to this many entries: on an H100 (Triton 3.6), 128x256 tiles with
# 8 warps and inline norms picked another dst than torch for 14% of the rows (85.9% agreement against
# 99.9% for every other candidate; the same tiles with the norms kernel agreed). Larger tiles are
# never chosen by default.
_INLINE_NORMS_MAX_TILE = 128 * 128
# Up to this many src tokens the slot kernel counts ranks itself instead of taking a sort's order
# (O(Ns²) comparisons, a few microseconds there, against a sort's several launches).
COUNT_RANKS_MAX_SRC = 16384


def best_dst_tiles(num_src: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch parameters of the best-dst kernel on a GPU (tile sizes, warps, pipeline stages).

    Half precision: measured on an H100 (``benchmarks/kernel_sweep.py``, B=2, C=320/640/1152): 64×128
    tiles with 4 warps were fastest up to N = 16,384 and 128×128 at N = 65,536. These are the tiles the
    model benchmarks in docs/benchmarks.md ran with. (A second sweep had 4 pipeline stages 1-6% ahead
    of 3 at its five shapes; not yet measured on whole models.)
    """
    if dtype == torch.float32:
        return {"BLOCK_S": 64, "BLOCK_D": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 2}
    rows = 128 if num_src >= 32768 else 64
    return {"BLOCK_S": rows, "BLOCK_D": 128, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3}


def dst_inv_norms(metric: torch.Tensor, dst_idx: torch.Tensor, bf16_bits: bool, block_c: int) -> torch.Tensor:
    """``[B, Nd]`` float32 ``1 / max(|metric[b, dst_idx[j]]|, tiny)``, one launch.

    Args:
        metric: ``[B, N, C]`` as the kernels read it (channels contiguous; bfloat16 as int16 bits
            under the interpreter, then ``bf16_bits``); block_c: channels loaded a step.
    """
    batch, _, channels = metric.shape
    num_dst = int(dst_idx.shape[0])
    out = torch.empty(batch, num_dst, dtype=torch.float32, device=metric.device)
    rows = 16 if _interpreting() else 32
    with torch.profiler.record_function(DST_NORM_LABEL):
        dst_inv_norm_kernel[(triton.cdiv(num_dst, rows), batch)](
            metric, dst_idx, out, num_dst, channels, metric.stride(0), metric.stride(1),
            torch.finfo(torch.float32).tiny, BF16_BITS=bf16_bits, BLOCK_R=rows, BLOCK_C=block_c,
        )  # fmt: skip
    return out


def launch_best_dst(
    metric: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    tiles: dict[str, int] | None = None,
    inline_norms: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the best-dst kernel (and, for larger grids, the dst-norm kernel before it) with the given
    launch parameters (default :func:`best_dst_tiles`; ``inline_norms`` default: up to
    ``INLINE_NORMS_MAX_DST`` dst tokens); see :func:`best_dst_triton`."""
    _check_launchable(metric)
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    batch, channels = metric.shape[0], metric.shape[2]
    num_src, num_dst = int(src_idx.shape[0]), int(dst_idx.shape[0])
    score = torch.empty(batch, num_src, dtype=torch.float32, device=metric.device)
    choice = torch.empty(batch, num_src, dtype=torch.int64, device=metric.device)
    if num_src == 0 or batch == 0:
        return score, choice
    if channels == 0:  # every cosine similarity is 0; the first dst wins, as in torch
        return score.zero_(), choice.zero_()
    dtype = metric.dtype
    metric, bf16_bits = _kernel_view(metric)
    # fp32 products stay exact (no TF32); half inputs ignore the setting.
    precision = "ieee" if metric.dtype == torch.float32 or bf16_bits else "tf32"
    strides = (metric.stride(0), metric.stride(1), torch.finfo(torch.float32).tiny)
    if tiles is None:
        tiles = _INTERPRETER_TILES if _interpreting() else best_dst_tiles(num_src, dtype)
    tile = tiles["BLOCK_S"] * tiles["BLOCK_D"]
    if inline_norms is None:
        inline_norms = num_dst <= INLINE_NORMS_MAX_DST and tile <= _INLINE_NORMS_MAX_TILE
    elif inline_norms and tile > _INLINE_NORMS_MAX_TILE:
        raise ValueError(
            f"inline_norms=True with {tiles['BLOCK_S']}x{tiles['BLOCK_D']} tiles: inline dst norms are "
            f"only used with tiles of at most {_INLINE_NORMS_MAX_TILE} entries (larger ones gave wrong "
            "choices on an H100); use smaller tiles or inline_norms=False."
        )
    # Not read when the norms are inline.
    dst_inv_norm = score if inline_norms else dst_inv_norms(metric, dst_idx, bf16_bits, tiles["BLOCK_C"])
    with torch.profiler.record_function(BEST_DST_LABEL):
        best_dst_kernel[(triton.cdiv(num_src, tiles["BLOCK_S"]), batch)](
            metric, src_idx, dst_idx, dst_inv_norm, score, choice, num_src, num_dst, channels, *strides,
            PRECISION=precision, BF16_BITS=bf16_bits, INLINE_NORMS=inline_norms, **tiles,
        )  # fmt: skip
    return score, choice


def _plan_slots_impl(
    score: torch.Tensor,
    order: torch.Tensor | None,
    choice: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    num_remove: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_launchable(score)
    batch, num_src = score.shape
    num_dst = int(dst_idx.shape[0])
    if not 0 <= num_remove <= num_src:
        raise ValueError(f"num_remove={num_remove} must be in [0, {num_src}] (the number of src tokens).")
    num_tokens = num_src + num_dst
    slot = torch.empty(batch * num_tokens, dtype=torch.int64, device=score.device)
    counts = torch.ones(batch * (num_tokens - num_remove), 1, dtype=torch.float32, device=score.device)
    if batch == 0 or num_tokens == 0:
        return slot, counts
    count_ranks = order is None
    if _interpreting():
        block, block_q = 16, 16
    else:
        block, block_q = (128, 256) if count_ranks else (1024, 1)
    with torch.profiler.record_function(PLAN_SLOTS_LABEL):
        plan_slots_kernel[(triton.cdiv(num_tokens, block), batch)](
            score.contiguous(), choice if order is None else order.contiguous(), choice.contiguous(),
            src_idx, dst_idx, slot, counts, num_src, num_dst, num_remove,
            COUNT_RANKS=count_ranks, BLOCK=block, BLOCK_Q=block_q,
        )  # fmt: skip
    return slot, counts


def _scatter_add_impl(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    _check_launchable(x)
    x = x.contiguous()
    rows, channels = x.shape
    out = torch.zeros(num_slots, channels, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    block_r, block_c = (16, 16) if _interpreting() else (32, 128)
    x, bf16_bits = _kernel_view(x)
    with torch.profiler.record_function(SCATTER_ADD_LABEL):
        scatter_add_kernel[(triton.cdiv(rows, block_r),)](
            x, slot, out, rows, channels, BF16_BITS=bf16_bits, BLOCK_R=block_r, BLOCK_C=block_c
        )
    return out


# Registered as torch custom ops so that torch.compile treats each launch as one opaque operation
# (no tracing into Triton's launcher; with it, mode="reduce-overhead" failed on an H100) and CUDA graphs
# capture it like any other kernel. Eager calls skip the op's dispatch (it cost 0.1-0.2 ms per call).
@torch.library.custom_op("tomediff::best_dst", mutates_args=())
def _best_dst_op(
    metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_best_dst(metric, src_idx, dst_idx)


@_best_dst_op.register_fake
def _(
    metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (metric.shape[0], src_idx.shape[0])
    return metric.new_empty(shape, dtype=torch.float32), metric.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("tomediff::scatter_add_fp32", mutates_args=())
def _scatter_add_op(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    return _scatter_add_impl(x, slot, num_slots)


@_scatter_add_op.register_fake
def _(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    return x.new_empty((num_slots, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("tomediff::plan_slots", mutates_args=())
def _plan_slots_op(
    score: torch.Tensor,
    order: torch.Tensor | None,
    choice: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    num_remove: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _plan_slots_impl(score, order, choice, src_idx, dst_idx, num_remove)


@_plan_slots_op.register_fake
def _(
    score: torch.Tensor,
    order: torch.Tensor | None,
    choice: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    num_remove: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_src = score.shape
    num_tokens = num_src + dst_idx.shape[0]
    slot = score.new_empty((batch * num_tokens,), dtype=torch.int64)
    return slot, score.new_empty((batch * (num_tokens - num_remove), 1), dtype=torch.float32)


def best_dst_triton(
    metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused cosine similarity + row max/argmax, see :func:`tomediff.ops.matching.best_dst_for_src`.

    Args:
        metric: ``[B, N, C]`` float16/bfloat16/float32, CUDA (or CPU under Triton's interpreter).
        src_idx: ``[Ns]`` int64 token indices; dst_idx: ``[Nd]`` int64 token indices.

    Returns:
        ``score: [B, Ns]`` float32 and ``choice: [B, Ns]`` int64 (position in ``dst_idx``).
    """
    if torch.compiler.is_compiling():
        return _best_dst_op(metric, src_idx, dst_idx)
    return launch_best_dst(metric, src_idx, dst_idx)  # eager: without the custom op's dispatch cost


def scatter_add_triton(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``out[slot[i]] += x[i]`` into a new float32 ``[num_slots, C]`` tensor (fp32 sums of any dtype).

    Args:
        x: ``[R, C]`` rows; slot: ``[R]`` int64 in ``[0, num_slots)``.
    """
    if torch.compiler.is_compiling():
        return _scatter_add_op(x, slot, num_slots)
    return _scatter_add_impl(x, slot, num_slots)


def plan_slots_triton(
    score: torch.Tensor,
    choice: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    num_remove: int,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A merge plan's slots and counts from the src scores and best dsts, in one launch.

    Args:
        score: ``[B, Ns]`` float32 similarity of each src position to its best dst; choice: ``[B, Ns]``
            int64 that dst (position in ``dst_idx``); src_idx ``[Ns]``, dst_idx ``[Nd]`` int64 token
            indices; num_remove: ``r``, the top-ranked src tokens merged into their dst.
        order: ``[B, Ns]`` int64 src positions by decreasing score (a sort's output), or None to rank
            by counting in the kernel, as a stable descending sort does (equal scores: lower positions
            first; NaN before every number), meant for ``Ns`` up to ``COUNT_RANKS_MAX_SRC``.

    Returns:
        ``flat_slot: [B*N]`` int64 (``b * M + slot``; dst j gets slot j, the kept src tokens slots
        ``Nd, Nd+1, ...`` in rank order) and ``counts: [B*M, 1]`` float32 tokens per slot, as
        :class:`tomediff.ops.merge.MergePlan` stores them.
    """
    if torch.compiler.is_compiling():
        return _plan_slots_op(score, order, choice, src_idx, dst_idx, num_remove)
    return _plan_slots_impl(score, order, choice, src_idx, dst_idx, num_remove)
