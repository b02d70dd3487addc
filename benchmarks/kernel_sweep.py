"""Launch-parameter sweep of the fused best-dst kernel on a GPU (issue 7), beside the torch path and
tomesd's matching, at the shapes Stable Diffusion, SDXL and PixArt merge at.

For every shape (B, N, C) and every candidate (BLOCK_S, BLOCK_D, BLOCK_C, warps, stages), the kernel
is timed with CUDA events (median of interleaved repeats) and its choices are checked against the
torch path (a config that computes something else is reported, never ranked). Also times a whole
plan (`plan_merge`: kernels + sort + slots) per call, host time and device time separately, to show
whether small shapes are bound by launches.

    python benchmarks/kernel_sweep.py --json sweep.json
    python benchmarks/kernel_sweep.py --previous old_kernels.py   # also time an earlier kernels.py
"""

from __future__ import annotations

import argparse
import json
import linecache
import statistics
import time
import types
from collections.abc import Callable

import torch

from tomediff.ops import draw_dst_offsets, grid_partition, plan_constants, plan_merge
from tomediff.ops.kernels import best_dst_tiles, dst_inv_norms, launch_best_dst, tl, triton
from tomediff.ops.matching import best_dst_for_src

SHAPES = ((4096, 320), (16384, 320), (65536, 320), (4096, 1152), (16384, 1152))
# (BLOCK_S, BLOCK_D, BLOCK_C, warps, stages). Two sweeps on an H100 (2026-11-27, results in
# benchmarks/results/gpu_h100_2026-11-27b/) ranked 64x128 and 128x128 tiles with 4 warps first among 20
# candidates, 4 stages slightly ahead of 3; 128x256 with 8 warps was no faster.
CANDIDATES = (
    (32, 128, 64, 4, 3),  # twice the programs of 64-row tiles: 4,096-token grids fill only 96 of 132 SMs
    (64, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 4, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 4),
)
# Experiment for the next GPU session, not in the library: the src tile loaded once and kept on chip
# while the dst tiles stream past (BLOCK_S, BLOCK_D, warps, stages). The streaming kernel re-reads a
# src chunk from L2 for every dst tile; at 128x128 tiles that is half of its load traffic, and at
# 2048² the kernel reaches about 280 TFLOP/s of the card's ~800. Only for C = 2^a + 2^b (320, 640).
RESIDENT_CANDIDATES = ((64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 1))


if triton is not None:

    @triton.jit
    def resident_best_dst_kernel(
        metric_ptr,
        src_idx_ptr,
        dst_idx_ptr,
        dst_inv_norm_ptr,
        score_ptr,
        choice_ptr,
        num_src,
        num_dst,
        stride_b,
        stride_n,
        tiny,
        C_A: tl.constexpr,
        C_B: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # As tomediff.ops.kernels.best_dst_kernel (dst norms from its norm kernel), but the BLOCK_S x C
        # src tile (C = C_A + C_B, both powers of two) is loaded once, before the loop over dst tiles.
        batch = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        row_ok = rows < num_src
        base = metric_ptr + batch.to(tl.int64) * stride_b
        src_tok = tl.load(src_idx_ptr + rows, mask=row_ok, other=0)
        chan_a = tl.arange(0, C_A)
        chan_b = C_A + tl.arange(0, C_B)
        s_a = tl.load(base + src_tok[:, None] * stride_n + chan_a[None, :], mask=row_ok[:, None], other=0.0)
        s_b = tl.load(base + src_tok[:, None] * stride_n + chan_b[None, :], mask=row_ok[:, None], other=0.0)
        src_sq = tl.sum(s_a.to(tl.float32) * s_a.to(tl.float32), axis=1)
        src_sq += tl.sum(s_b.to(tl.float32) * s_b.to(tl.float32), axis=1)
        best = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_S], dtype=tl.int32)
        for d0 in range(0, num_dst, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < num_dst
            dst_tok = tl.load(dst_idx_ptr + cols, mask=col_ok, other=0)
            d_ptr = base + dst_tok[:, None] * stride_n
            d_a = tl.load(d_ptr + chan_a[None, :], mask=col_ok[:, None], other=0.0)
            d_b = tl.load(d_ptr + chan_b[None, :], mask=col_ok[:, None], other=0.0)
            acc = tl.dot(s_a, tl.trans(d_a))
            acc = tl.dot(s_b, tl.trans(d_b), acc)
            inv_norm = tl.load(dst_inv_norm_ptr + batch * num_dst + cols, mask=col_ok, other=0.0)
            sim = tl.where(col_ok[None, :], acc * inv_norm[None, :], float("-inf"))
            tile_best, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, d0 + tile_arg, best_idx)
        out = batch * num_src + rows
        tl.store(score_ptr + out, best / tl.maximum(tl.sqrt(src_sq), tiny), mask=row_ok)
        tl.store(choice_ptr + out, best_idx.to(tl.int64), mask=row_ok)


def channel_split(channels: int) -> tuple[int, int] | None:
    """``(2^a, 2^b)`` with ``2^a + 2^b = channels`` and ``2^a > 2^b >= 16``, or None."""
    high = 1 << (channels.bit_length() - 1)
    low = channels - high
    return (high, low) if low >= 16 and low & (low - 1) == 0 else None


def resident_best_dst(
    metric: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    block_s: int,
    block_d: int,
    warps: int,
    stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experimental kernel, with the library's dst-norm kernel before it."""
    batch, _, channels = metric.shape
    split = channel_split(channels)
    assert split is not None and metric.stride(-1) == 1
    num_src, num_dst = src_idx.shape[0], dst_idx.shape[0]
    score = torch.empty(batch, num_src, dtype=torch.float32, device=metric.device)
    choice = torch.empty(batch, num_src, dtype=torch.int64, device=metric.device)
    dst_inv_norm = dst_inv_norms(metric, dst_idx, bf16_bits=False, block_c=64)
    strides = (metric.stride(0), metric.stride(1), torch.finfo(torch.float32).tiny)
    resident_best_dst_kernel[(triton.cdiv(num_src, block_s), batch)](
        metric, src_idx, dst_idx, dst_inv_norm, score, choice, num_src, num_dst, *strides,
        C_A=split[0], C_B=split[1], BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return score, choice


def device_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def load_previous(path: str):
    """An earlier kernels.py as its own module (its custom ops renamed so they do not clash)."""
    with open(path) as handle:
        source = handle.read().replace('"tomediff::', '"tomediff_previous::')
    module = types.ModuleType("previous_kernels")
    module.__file__ = path  # triton.jit reads the kernels' source through inspect
    linecache.cache[path] = (len(source), None, source.splitlines(True), path)
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def tomesd_matching(x: torch.Tensor, side: int, num_remove: int) -> None:
    from tomesd.merge import bipartite_soft_matching_random2d

    bipartite_soft_matching_random2d(x, side, side, 2, 2, num_remove, no_rand=True)


def sweep_shape(
    batch: int, tokens: int, channels: int, dtype: torch.dtype, repeats: int, previous
) -> dict[str, object]:
    side = int(tokens**0.5)
    gen = torch.Generator().manual_seed(tokens + channels)
    part = grid_partition(side, side, 2, 2, draw_dst_offsets(side, side, 2, 2, gen), "cuda")
    x = torch.randn(batch, tokens, channels, generator=gen).to("cuda", dtype)
    flops = 2.0 * batch * part.num_src * part.num_dst * channels
    _, reference = best_dst_for_src(x, part, backend="torch")

    fns: dict[str, Callable[[], object]] = {
        "torch": lambda: best_dst_for_src(x, part, backend="torch"),
        "default": lambda: launch_best_dst(x, part.src_idx, part.dst_idx),
        "default, norms kernel": lambda: launch_best_dst(x, part.src_idx, part.dst_idx, inline_norms=False),
        "default, inline norms": lambda: launch_best_dst(x, part.src_idx, part.dst_idx, inline_norms=True),
    }
    if previous is not None:
        fns["previous"] = lambda: previous.best_dst_triton(x, part.src_idx, part.dst_idx)
    try:
        import tomesd  # noqa: F401

        fns["tomesd (whole matching)"] = lambda: tomesd_matching(x, side, tokens // 2)
    except ImportError:
        pass
    agreement: dict[str, float] = {}
    for bs, bd, bc, warps, stages in CANDIDATES:
        tiles = {"BLOCK_S": bs, "BLOCK_D": bd, "BLOCK_C": bc, "num_warps": warps, "num_stages": stages}
        name = f"S{bs} D{bd} C{bc} w{warps} s{stages}"
        try:
            _, choice = launch_best_dst(x, part.src_idx, part.dst_idx, tiles)
        except Exception as error:  # out of shared memory or registers: report, go on
            print(f"  {name}: failed ({type(error).__name__}: {str(error)[:80]})")
            continue
        agreement[name] = (choice == reference).float().mean().item()
        fns[name] = lambda tiles=tiles: launch_best_dst(x, part.src_idx, part.dst_idx, tiles)
    for bs, bd, warps, stages in RESIDENT_CANDIDATES if channel_split(channels) else ():
        name = f"resident S{bs} D{bd} w{warps} s{stages}"
        args = (x, part.src_idx, part.dst_idx, bs, bd, warps, stages)
        try:
            _, choice = resident_best_dst(*args)
        except Exception as error:  # out of shared memory or registers: report, go on
            print(f"  {name}: failed ({type(error).__name__}: {str(error)[:80]})")
            continue
        agreement[name] = (choice == reference).float().mean().item()
        fns[name] = lambda args=args: resident_best_dst(*args)
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved
        for name, fn in fns.items():
            samples[name] += device_ms(fn, 1)
    medians = {name: statistics.median(t) for name, t in samples.items()}
    print(f"B={batch} N={tokens} C={channels} {dtype}: default tiles {best_dst_tiles(part.num_src, dtype)}")
    for name, ms in sorted(medians.items(), key=lambda kv: kv[1]):
        agree = f"  choices equal to torch {100 * agreement[name]:.2f}%" if name in agreement else ""
        print(f"  {name:<26} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s{agree}")
    return {"batch": batch, "tokens": tokens, "channels": channels, "ms": medians, "agreement": agreement}


def plan_costs(batch: int, tokens: int, channels: int, dtype: torch.dtype, calls: int) -> dict[str, float]:
    """Host time per plan_merge call (launches only, no sync) and device time per call (synced)."""
    side = int(tokens**0.5)
    part = grid_partition(side, side, 2, 2, draw_dst_offsets(side, side, 2, 2, None), "cuda")
    x = torch.randn(batch, tokens, channels, device="cuda", dtype=dtype)
    num_remove = tokens // 2
    constants = plan_constants(batch, part.num_dst, part.num_src, num_remove, "cuda")
    out: dict[str, float] = {}
    for backend in ("triton", "torch"):
        for _ in range(5):
            plan_merge(x, part, num_remove, constants=constants, backend=backend)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            plan_merge(x, part, num_remove, constants=constants, backend=backend)
        host = (time.perf_counter() - start) / calls
        torch.cuda.synchronize()
        synced = statistics.median(
            device_ms(lambda b=backend: plan_merge(x, part, num_remove, constants=constants, backend=b), 21)
        )
        out[f"{backend} host us"] = 1e6 * host
        out[f"{backend} device ms"] = synced
    print(
        f"plan_merge B={batch} N={tokens} C={channels}: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items())
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--previous", default=None, help="path of an earlier kernels.py to time beside")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the sweep needs a CUDA device")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    previous = load_previous(args.previous) if args.previous else None
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": [], "plans": []}
    for tokens, channels in SHAPES:
        results["shapes"].append(sweep_shape(args.batch, tokens, channels, dtype, args.repeats, previous))
    for tokens, channels in ((4096, 320), (4096, 1152), (16384, 320), (65536, 320)):
        results["plans"].append(plan_costs(args.batch, tokens, channels, dtype, 200))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
