"""Micro-benchmark of the token-merging ops against tomesd 0.1.3 (same process, interleaved, medians).

Measures, for x of shape (B, N, C):
  * merge+unmerge time (the per-site cost paid at every merged submodule),
  * matching time (partition + similarity + greedy selection: the per-block cost),
  * peak memory of matching (CUDA: max_memory_allocated; CPU: peak RSS above the loaded input, in a
    fresh process).

    python benchmarks/ops_bench.py                       # CPU, N = 4096 and 16384, memory at 65536
    python benchmarks/ops_bench.py --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from tomediff.ops import Backend, draw_dst_offsets, grid_partition, plan_constants, plan_merge

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tomesd_matching(x: torch.Tensor, side: int, ratio: float) -> tuple[Callable, Callable]:
    from tomesd.merge import bipartite_soft_matching_random2d

    return bipartite_soft_matching_random2d(x, side, side, 2, 2, int(x.shape[1] * ratio), no_rand=True)


_PLAN_INPUTS: dict[tuple, tuple] = {}


def tomediff_matching(x: torch.Tensor, side: int, ratio: float, backend: Backend = "auto"):
    """What a patched block pays per call: the partition and the plan's index constants are built once
    per shape and reused (as ToMeState does with use_rand off); the plan itself is made every call."""
    num_remove = int(x.shape[1] * ratio)
    key = (side, x.shape[0], num_remove, str(x.device))
    if key not in _PLAN_INPUTS:
        partition = grid_partition(side, side, 2, 2, draw_dst_offsets(side, side, 2, 2, None), x.device)
        constants = plan_constants(x.shape[0], partition.num_dst, partition.num_src, num_remove, x.device)
        _PLAN_INPUTS[key] = (partition, constants)
    partition, constants = _PLAN_INPUTS[key]
    return plan_merge(x, partition, num_remove, constants=constants, backend=backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def speed(
    tokens: int,
    channels: int,
    batch: int,
    ratio: float,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    side = int(tokens**0.5)
    x = torch.randn(batch, side * side, channels, generator=torch.Generator().manual_seed(0)).to(
        device, dtype
    )
    merge_ref, unmerge_ref = tomesd_matching(x, side, ratio)
    plan = tomediff_matching(x, side, ratio)
    merge_unmerge = interleaved_medians(
        {"tomesd": lambda: unmerge_ref(merge_ref(x)), "tomediff": lambda: plan.unmerge(plan.merge(x))},
        repeats,
        device,
    )
    matching_fns = {
        "tomesd": lambda: tomesd_matching(x, side, ratio),
        "tomediff": lambda: tomediff_matching(x, side, ratio),
    }
    if device.type == "cuda":  # the torch reference path too, to show what the Triton kernel buys
        matching_fns["tomediff_torch"] = lambda: tomediff_matching(x, side, ratio, backend="torch")
    matching = interleaved_medians(
        matching_fns,
        max(3, repeats // 3),
        device,
    )
    return {
        "shape": [batch, side * side, channels],
        "merge_unmerge_s": merge_unmerge,
        "merge_unmerge_ratio": merge_unmerge["tomediff"] / merge_unmerge["tomesd"],
        "matching_s": matching,
        "matching_ratio": matching["tomediff"] / matching["tomesd"],
        "attention_s": attention_times(x, ratio, repeats, device),
    }


def attention_times(x: torch.Tensor, ratio: float, repeats: int, device: torch.device) -> dict[str, float]:
    """SDPA over N and over N - r tokens (8 heads), to set the matching cost against what it saves."""
    batch, tokens, channels = x.shape
    kept = tokens - int(tokens * ratio)
    heads = 8

    def attend(n: int) -> None:
        q = x[:, :n].reshape(batch, n, heads, channels // heads).transpose(1, 2)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)

    return interleaved_medians(
        {"full": lambda: attend(tokens), "merged": lambda: attend(kept)}, repeats, device
    )


def peak_memory_child(
    impl: str, tokens: int, channels: int, batch: int, ratio: float, device: str, dtype: str
) -> int:
    """Peak bytes the matching step adds (run in a fresh process on the CPU)."""
    dev = torch.device(device)
    side = int(tokens**0.5)
    x = torch.randn(batch, side * side, channels).to(dev, DTYPES[dtype])
    fn = tomesd_matching if impl == "tomesd" else tomediff_matching
    if dev.type == "cuda":
        fn(x, side, ratio)  # compiles and tunes the kernels first (the tuner's buffers are not matching's)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn(x, side, ratio)
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    fn(x[:, :1024].contiguous(), 32, ratio)  # page in the kernels' code before measuring
    # Reset the peak RSS to the current RSS, run once, read the new peak (Linux /proc). The parent sets
    # MALLOC_MMAP_THRESHOLD_ so every tensor is its own mapping, returned to the system when freed.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn(x, side, ratio)
    del result
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(tokens: int, channels: int, batch: int, ratio: float, device: str, dtype: str) -> dict:
    out = {}
    for impl in ("tomesd", "tomediff"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            impl,
            str(tokens),
            str(channels),
            str(batch),
            str(ratio),
            device,
            dtype,
        ]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out[impl] = int(
            subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()
        )
    return {"shape": [batch, tokens, channels], "peak_bytes": out, "ratio": out["tomediff"] / out["tomesd"]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, tokens, channels, batch, ratio, device, dtype = sys.argv[2:]
        print(peak_memory_child(impl, int(tokens), int(channels), int(batch), float(ratio), device, dtype))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="N (square grids)")
    parser.add_argument("--memory-tokens", type=int, default=65536, help="N for the peak-memory comparison")
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
        },
        "speed": [
            speed(n, args.channels, args.batch, args.ratio, args.repeats, device, DTYPES[args.dtype])
            for n in args.tokens
        ],
        "memory": peak_memory(
            args.memory_tokens, args.channels, args.batch, args.ratio, args.device, args.dtype
        ),
    }
    header = (
        "shape",
        "merge+unmerge ms tomesd",
        "ours",
        "ours/tomesd",
        "matching ms tomesd",
        "ours",
        "ours/tomesd",
    )
    print("{:<16} {:>24} {:>8} {:>12} {:>19} {:>8} {:>12}".format(*header))
    for row in results["speed"]:
        mu, m = row["merge_unmerge_s"], row["matching_s"]
        cells = (
            "x".join(map(str, row["shape"])),
            mu["tomesd"] * 1e3,
            mu["tomediff"] * 1e3,
            row["merge_unmerge_ratio"],
            m["tomesd"] * 1e3,
            m["tomediff"] * 1e3,
            row["matching_ratio"],
        )
        print("{:<16} {:>24.2f} {:>8.2f} {:>12.3f} {:>19.2f} {:>8.2f} {:>12.3f}".format(*cells))
        extra = {
            name: f"{seconds * 1e3:.2f}" for name, seconds in m.items() if name not in ("tomesd", "tomediff")
        }
        attention = {name: f"{seconds * 1e3:.2f}" for name, seconds in row["attention_s"].items()}
        print(f"{'':<16} other matching ms: {extra or '-'}; SDPA ms (N, N-r): {attention}")
    mem = results["memory"]
    mib = {impl: value / 2**20 for impl, value in mem["peak_bytes"].items()}
    shape = "x".join(map(str, mem["shape"]))
    print(
        f"matching peak memory at {shape}: tomesd {mib['tomesd']:.0f} MiB, "
        f"tomediff {mib['tomediff']:.0f} MiB, "
        f"ratio {mem['ratio']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
