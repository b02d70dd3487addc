"""One FLUX.1-dev double-stream block (published width, random weights) as Flux Kontext calls it: a 1024²
output and one 1024² reference image (8,192 image tokens) plus 512 text tokens, batch 1. Unpatched vs
merging at ratio 0.5 (the reference alike) vs ratio 0.5 with reference_ratio 0.75 (docs/dits.md).

    python benchmarks/flux_kontext_block.py [--rounds 3] [--threads 2]

Only the block is timed (from before tomediff's hooks on it to after them), not the embedders around it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

import tomediff
from tomediff.bench.models import FLUX_DEV, ModelSpec, build_model, make_inputs


class BlockTimer:
    """Wall time of every call of ``block``, tomediff's hooks on it included."""

    def __init__(self, block: nn.Module) -> None:
        self.seconds: list[float] = []
        self._start = 0.0
        # Prepended: the clock starts before tomediff's pre-hook; the post-hook, added last, stops it after.
        block.register_forward_pre_hook(self._begin, prepend=True)
        block.register_forward_hook(self._end)

    def _begin(self, module: nn.Module, args: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def kontext_inputs(spec: ModelSpec, resolution: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """FluxKontextPipeline's layout: the output's packed tokens then the reference's, whose ids have a
    first column of 1."""
    inputs = make_inputs(spec, 1, resolution)
    (latent,), kwargs = inputs.args, dict(inputs.kwargs)
    reference_ids = kwargs["img_ids"].clone()
    reference_ids[:, 0] = 1
    reference = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    kwargs["img_ids"] = torch.cat([kwargs["img_ids"], reference_ids])
    return (torch.cat([latent, reference], dim=1),), kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 0}
    spec = ModelSpec("flux-kontext-double", "FLUX.1-dev double block", "flux", config, text_tokens=512)
    model = build_model(spec)
    call_args, call_kwargs = kontext_inputs(spec, args.resolution)
    settings: dict[str, dict[str, float] | None] = {
        "unpatched": None,
        "ratio=0.5": {"ratio": 0.5},
        "ratio=0.5,reference_ratio=0.75": {"ratio": 0.5, "reference_ratio": 0.75},
    }
    timer = BlockTimer(model.transformer_blocks[0])
    times: dict[str, list[float]] = {name: [] for name in settings}
    tokens = int(call_args[0].shape[1])
    print(f"{tokens} image tokens + {spec.text_tokens} text tokens, {args.threads} threads")
    with torch.no_grad():
        for round_index in range(args.rounds + 1):  # round 0 is the warm-up
            for name, options in settings.items():
                handle = tomediff.apply_tome(model, use_rand=False, **options) if options else None
                model(*call_args, **call_kwargs)
                if round_index:
                    times[name].append(timer.seconds[-1])
                if handle is not None:
                    report = handle.report()
                    handle.remove()
                    if round_index == 1:
                        print(f"{name}: {report.blocks[0].last_call}")
    base = sorted(times["unpatched"])[len(times["unpatched"]) // 2]
    for name, values in times.items():
        median = sorted(values)[len(values) // 2]
        calls = [round(v, 2) for v in values]
        print(f"{name}: median {median:.2f} s, calls {calls}, speed-up {base / median:.2f}x")


if __name__ == "__main__":
    main()
