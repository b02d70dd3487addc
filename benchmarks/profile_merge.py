"""Where tomediff's time goes inside a model call: matching, merge, unmerge, the rest of the model.

Profiles calls of a benchmark model (default: SD 1.5's first transformer block, where all of SD 1.5's
merging happens) patched with tomediff and with the ideal (zero-cost) merge, using torch.profiler with
Python stacks; every operator's self CPU time is charged to the innermost tomediff function on its
stack. On CUDA it also counts kernel launches and kernel time per call, and how much of the call the
GPU was busy (a call whose GPU is mostly idle is bound by the host's launches, not by the kernels).
Complements `tomediff bench`, which only sees whole-call latencies.

    python benchmarks/profile_merge.py --model sd15-block --resolution 1024 --threads 1
    python benchmarks/profile_merge.py --model sd15 --resolution 512 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import tomediff
from tomediff.bench.measure import forward
from tomediff.bench.models import build_model, get_model_spec, make_inputs
from tomediff.bench.runner import DTYPES
from tomediff.bench.variants import KeepReducer

# (file, function) on the Python stack -> category. First match from the innermost frame wins.
CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("ops/matching.py", "", "matching"),
    ("ops/partition.py", "", "partition"),
    ("ops/merge.py", "unmerge", "unmerge"),
    ("ops/merge.py", "merge", "merge"),
    ("ops/merge.py", "", "merge (other)"),
    ("tomediff/core/", "", "hooks / plan"),
)
FRAME = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<func>.*)$")


def categorize(stack: list[str]) -> str:
    for frame in stack:  # innermost first
        match = FRAME.match(frame)
        if match is None:
            continue
        for file_part, func_part, category in CATEGORIES:
            if file_part in match["file"] and func_part in match["func"]:
                return category
    return "model"


def profile_call(
    model: torch.nn.Module, inputs: object, cuda: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Self CPU seconds by category (from Python stacks, where the profiler records them) and by op;
    on CUDA also the call's kernels: count, total kernel seconds, wall seconds, and kernel seconds by name."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=True) as prof:
        start = time.perf_counter()
        forward(model, inputs)  # type: ignore[arg-type]
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels["kernel count"] += 1
            kernels["kernel s"] += event.self_device_time_total / 1e6
            kernels[f"kernel: {event.name[:60]}"] += event.self_device_time_total / 1e6
            continue
        totals[categorize(list(event.stack or []))] += event.self_cpu_time_total / 1e6
    by_op = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    if cuda:
        kernels["wall s"] = wall
        by_op.update(kernels)
    return dict(totals), by_op


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="sd15-block")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = get_model_spec(args.model)
    device, dtype, cuda = torch.device(args.device), DTYPES[args.dtype], args.device.startswith("cuda")
    model = build_model(spec, device, dtype)
    inputs = make_inputs(spec, args.batch, args.resolution, device, dtype, seed=1)
    cfg = tomediff.ToMeConfig(ratio=args.ratio, max_downsample=spec.max_downsample, use_rand=False)

    def patch(variant: str) -> tomediff.ToMeHandle | None:
        if variant == "baseline":
            return None
        if variant == "ideal":
            return tomediff.apply_reducer(model, KeepReducer(), cfg)
        return tomediff.apply_tome(model, cfg)

    def run(variant: str) -> float:
        handle = patch(variant)
        start = time.perf_counter()
        forward(model, inputs)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if handle is not None:
            handle.remove()
        return seconds

    variants = ("baseline", "tomediff", "ideal")
    for name in variants:
        run(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved
        for name in variants:
            times[name].append(run(name))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.model} {args.resolution}² batch {args.batch} ratio {args.ratio} threads {args.threads}: "
        + ", ".join(f"{name} {t:.3f} s" for name, t in medians.items())
    )
    base, ours, ideal = medians["baseline"], medians["tomediff"], medians["ideal"]
    if base > ideal:
        saving = 100 * (base - ours) / (base - ideal)
        print(f"saving realised {saving:.0f}%  (overhead vs ideal {ours - ideal:.3f} s)")
    ops: dict[str, dict[str, float]] = {}
    for variant in variants:
        handle = patch(variant)
        profile_call(model, inputs, cuda)  # the profiler's own first-call costs
        totals, ops[variant] = profile_call(model, inputs, cuda)
        if handle is not None:
            handle.remove()
        if cuda:
            found = ops[variant]
            wall, busy = found["wall s"], found["kernel s"]
            print(
                f"cuda {variant:<10} wall {1e3 * wall:.2f} ms, {found['kernel count']:.0f} kernels, "
                f"kernel time {1e3 * busy:.2f} ms (GPU busy {100 * busy / wall:.0f}%)"
            )
        total = sum(totals.values())
        parts = ", ".join(f"{k} {v:.3f} s ({100 * v / total:.1f}%)" for k, v in sorted(totals.items()))
        if len(totals) > 1:  # some torch builds record no Python stacks on operator events
            print(f"profile {variant:<10} (profiled total {total:.3f} s): {parts}")
    # Ops whose time differs between ToMe and the ideal merge: where the overhead goes.
    names = set(ops["tomediff"]) | set(ops["ideal"])
    diff = {n: ops["tomediff"].get(n, 0.0) - ops["ideal"].get(n, 0.0) for n in names}
    print("self CPU s (kernel s for 'kernel:' rows), tomediff - ideal, by op (largest first):")
    for name, delta in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:20]:
        print(f"  {name:<66} {delta:+.5f}  (tomediff {ops['tomediff'].get(name, 0.0):.5f})")


if __name__ == "__main__":
    main()
