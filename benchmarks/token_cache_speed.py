"""Whole-trajectory wall clock of method="cache" on the bundled trained DiT (a small
FluxTransformer2DModel), against the unpatched model: settings interleaved round by round, median
per setting, and each setting's relative L2 distance of the final latents to the unpatched ones.

    PYTHONPATH=src python benchmarks/token_cache_speed.py --steps 20 --batch 8 --rounds 5 \
        --setting cache_interval=3,cache_ratio=0.25 --setting cache_interval=2,cache_ratio=0.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import tomediff
from tomediff.eval import load_demo_dit
from tomediff.eval.settings import parse_value


def parse(text: str) -> dict[str, object]:
    options: dict[str, object] = {"method": "cache"}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = parse_value(key.strip(), value)
    return options


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="images per generation (CFG doubles it)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--setting", action="append", default=None, help="cache options, key=value,...")
    args = parser.parse_args()
    settings = {"unpatched": None}
    for text in args.setting or ["cache_interval=3,cache_ratio=0.25"]:
        settings[text] = parse(text)
    pipe = load_demo_dit()
    classes = [i % 10 for i in range(args.batch)]
    seeds = list(range(args.batch))
    times: dict[str, list[float]] = {name: [] for name in settings}
    finals: dict[str, torch.Tensor] = {}
    print(f"load before: {os.getloadavg()}")
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        for name, options in settings.items():
            handle = tomediff.apply_tome(pipe, **options) if options is not None else None
            start = time.perf_counter()
            finals[name] = pipe.generate_latents(classes, seeds, args.steps)
            times[name].append(time.perf_counter() - start)
            if handle is not None:
                handle.remove()
    print(f"load after: {os.getloadavg()}")
    reference = finals["unpatched"]
    base = statistics.median(times["unpatched"][1:])
    for name, measured in times.items():
        median = statistics.median(measured[1:])
        error = float((finals[name] - reference).norm() / reference.norm())
        print(f"{name:45s} median {median:7.3f} s  speed-up {base / median:5.2f}x  rel. L2 {error:.4f}")


if __name__ == "__main__":
    main()
