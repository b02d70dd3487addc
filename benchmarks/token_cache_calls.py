"""Where token caching's time goes: each model call of a trajectory on the bundled trained DiT, timed
with and without a token-caching setting (interleaved rounds, median per call), and each call's kind
(partial step, or full: a refresh or a warm-up step; read from the patch's report after the call).

A partial step's share of an unaccelerated step bounds what token caching can give: with a refresh
every ``cache_interval`` steps after a warm-up, the trajectory cannot be faster than the refreshes
and the warm-up allow.

    python benchmarks/token_cache_calls.py --image-size 64 --batch 20 --rounds 2 \
        --setting method=cache,cache_interval=2,cache_ratio=0.0625,start=0.2,cache_forecast=linear
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

import tomediff
from tomediff.eval import load_demo_dit
from tomediff.eval.settings import parse_setting

_PARTIAL = re.compile(r"partial (\d+)")


def _timed_calls(pipe: object, handle: tomediff.ToMeHandle | None, batch: int, steps: int) -> tuple:
    """Each model call's seconds, and whether it was a partial step (None without a patch)."""
    transformer = pipe.transformer  # type: ignore[attr-defined]
    times: list[float] = []
    kinds: list[bool | None] = []

    def before(module: object, args: object, kwargs: object) -> None:
        times.append(-time.perf_counter())

    def after(module: object, args: object, kwargs: object, output: object) -> None:
        times[-1] += time.perf_counter()
        if handle is None:
            kinds.append(None)
            return
        found = _PARTIAL.search(str(handle.report()))
        partial = int(found.group(1)) if found else 0
        kinds.append(partial > sum(1 for k in kinds if k))

    hooks = [
        transformer.register_forward_pre_hook(before, with_kwargs=True),
        transformer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        pipe([i % 10 for i in range(batch)], list(range(batch)), num_inference_steps=steps)  # type: ignore[operator]
    finally:
        for hook in hooks:
            hook.remove()
    return times, kinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True, help="tomediff eval --setting options (method=cache,...)")
    parser.add_argument("--image-size", type=int, default=64, choices=(32, 64))
    parser.add_argument("--batch", type=int, default=20, help="images per call (guidance doubles it)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = parse_setting(f"setting:{args.setting}").config()
    pipe = load_demo_dit(image_size=args.image_size)
    base: list[list[float]] = []
    patched: list[list[float]] = []
    kinds: list[bool | None] = []
    for _ in range(args.rounds):
        base.append(_timed_calls(pipe, None, args.batch, args.steps)[0])
        with tomediff.apply_tome(pipe.transformer, config) as handle:
            seconds, kinds = _timed_calls(pipe, handle, args.batch, args.steps)
        patched.append(seconds)
    print(f"{config}\ncall  kind     unaccelerated (s)  patched (s)  share")
    shares: dict[str, list[float]] = {"full": [], "partial": []}
    for call, kind in enumerate(kinds):
        b = statistics.median(r[call] for r in base)
        p = statistics.median(r[call] for r in patched)
        name = "partial" if kind else "full"
        shares[name].append(p / b)
        print(f"{call:4d}  {name:7s}  {b:17.3f}  {p:11.3f}  {p / b:5.3f}")
    for name, values in shares.items():
        if values:
            print(f"{name}: median share {statistics.median(values):.3f} over {len(values)} calls")
    total = sum(statistics.median(r[c] for r in base) for c in range(len(kinds)))
    total_patched = sum(statistics.median(r[c] for r in patched) for c in range(len(kinds)))
    speedup = total / total_patched
    print(f"trajectory: {total:.2f} s unaccelerated, {total_patched:.2f} s patched, {speedup:.2f}x")


if __name__ == "__main__":
    main()
