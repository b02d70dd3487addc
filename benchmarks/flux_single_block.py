"""One FLUX.1-dev single-stream block (published width, random weights) at 1024², batch 1: unpatched vs
tomediff merging the attention vs the attention and the parallel MLP (docs/dits.md).

    python benchmarks/flux_single_block.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import tomediff
from tomediff.bench.models import FLUX_DEV, ModelSpec, build_model, make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = {**FLUX_DEV, "num_layers": 0, "num_single_layers": 1}
    spec = ModelSpec("flux-single", "FLUX.1-dev single block", "flux", config, text_tokens=512)
    model = build_model(spec)
    inputs = make_inputs(spec, 1, args.resolution)
    settings: dict[str, dict[str, bool] | None] = {
        "unpatched": None,
        "merge_attn": {"merge_attn": True},
        "merge_attn+merge_mlp": {"merge_attn": True, "merge_mlp": True},
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    with torch.no_grad():
        for round_index in range(args.rounds + 1):  # round 0 is the warm-up
            for name, options in settings.items():
                handle = tomediff.apply_tome(model, ratio=0.5, use_rand=False, **options) if options else None
                start = time.perf_counter()
                model(*inputs.args, **inputs.kwargs)
                elapsed = time.perf_counter() - start
                if round_index:
                    times[name].append(elapsed)
                if handle is not None:
                    handle.remove()
    for name, values in times.items():
        ordered = sorted(values)
        print(f"{name}: median {ordered[len(ordered) // 2]:.2f} s, calls {[round(v, 2) for v in values]}")


if __name__ == "__main__":
    main()
