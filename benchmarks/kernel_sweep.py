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
from tomediff.ops.kernels import best_dst_tiles, launch_best_dst
from tomediff.ops.matching import best_dst_for_src

SHAPES = ((4096, 320), (16384, 320), (65536, 320), (4096, 1152), (16384, 1152))
# (BLOCK_S, BLOCK_D, BLOCK_C, warps, stages). A first sweep on an H100 (2026-11-27) ranked 64x128 and
# 128x128 with 4 warps and 3 stages first of 12 candidates (64x64 and 128x64 tiles, 32-channel chunks
# and 8 warps trailed); these are the leaders and larger tiles that keep more of each load in use.
CANDIDATES = (
    (64, 128, 64, 4, 3),
    (128, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 3),
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
)


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
