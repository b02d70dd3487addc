"""ComfyUI on the CPU: one KSampler step of the SD 1.5 UNet (published layout, random weights) at
1024², batch 2 (one latent, conditional + unconditional), unpatched vs ComfyUI's TomePatchModel vs
tomediff's node at the same ratio; interleaved rounds, median time of each (docs/comfyui.md).

    OMP_NUM_THREADS=2 python benchmarks/comfyui_bench.py [--size 1024] [--rounds 3] [--ratio 0.5]

Needs the test extra and the ComfyUI archive the tests use (shared/vendor/ or $COMFYUI_ARCHIVE).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from comfyui_env import build_model, conditioning, ksample, sd15_full_unet_config, start_comfy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every variant once)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", type=Path, help="also write the times here")
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="run the variants in reverse order (balances a load that drifts)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        comfy = start_comfy(Path(folder))
        base = build_model(comfy, "SD15", sd15_full_unet_config(), seed=0)
        (comfy_tome,) = comfy.tome_patch_model.execute(base, args.ratio).result
        (tomediff_node,) = comfy.nodes.NODE_CLASS_MAPPINGS["TomediffToMe"]().patch(
            base, method="merge", ratio=args.ratio, seed=0
        )
        variants = {"unpatched": base, "TomePatchModel": comfy_tome, "tomediff": tomediff_node}
        if args.reverse:
            variants = dict(reversed(variants.items()))
        positive, negative = conditioning(768, 77, 1), conditioning(768, 77, 2)
        latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
        unet_seconds: list[float] = []

        def time_unet(executor: Any, *call_args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = executor(*call_args, **kwargs)
            unet_seconds.append(time.perf_counter() - start)
            return out

        apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
        for model in variants.values():
            model.add_wrapper_with_key(apply_model, "benchmark-timer", time_unet)
        times: dict[str, dict[str, list[float]]] = {name: {"ksampler": [], "unet": []} for name in variants}
        for round_index in range(args.rounds):
            for name, model in variants.items():
                unet_seconds.clear()
                start = time.perf_counter()
                ksample(comfy, model, positive, negative, latent, steps=1)
                times[name]["ksampler"].append(time.perf_counter() - start)
                times[name]["unet"].append(sum(unet_seconds))
                print(
                    f"round {round_index + 1} {name}: KSampler {times[name]['ksampler'][-1]:.2f} s, "
                    f"UNet call {times[name]['unet'][-1]:.2f} s",
                    flush=True,
                )
    print(
        f"\nSD 1.5 UNet, {args.size}², 1 KSampler step, batch 2, ratio {args.ratio}, {args.threads} threads"
    )
    for part in ("unet", "ksampler"):
        median = {name: statistics.median(values[part]) for name, values in times.items()}
        for name, seconds in median.items():
            speedup = median["unpatched"] / seconds
            print(f"{part:>8} {name:>15}: {seconds:7.2f} s median ({speedup:.2f}x unpatched)")
        print(f"{part:>8} tomediff over TomePatchModel: {median['TomePatchModel'] / median['tomediff']:.2f}x")
    print(f"load average: {os.getloadavg()}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "times": times}, indent=1)
        )


if __name__ == "__main__":
    main()
