"""One Wan 2.1 1.3B transformer block (published width, random weights) at 480p × 81 frames
(21 × 30 × 52 = 32,760 video tokens), batch 1: unpatched vs tomediff at the attention call vs the ideal
of each setting (docs/dits.md).

The model is ``WanTransformer3DModel`` with Wan 2.1 1.3B's config and one block, called on the
``[1, 16, 21, 60, 104]`` latent (its patch embedding and output layer cost well under 1 % here). An
"ideal" runs the same attention with the same token counts at no reduction cost: a torch-function mode
hands SDPA the first M keys/values (and queries) as views, and copies nothing back.

    python benchmarks/wan_block.py [--rounds 3] [--warmup 1] [--threads 2]
        [--frames 21 --height 60 --width 104]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch.overrides import TorchFunctionMode

import tomediff
from tomediff.bench.models import WAN_T2V_13B

# Wan 2.1 1.3B's published config (the one ``tomediff bench`` builds), cut to its first block.
WAN21_1_3B = {**WAN_T2V_13B, "num_layers": 1}


class IdealAttention(TorchFunctionMode):
    """Self-attention calls get the first ``keep_kv`` keys/values and ``keep_q`` queries (views); the
    output is padded back by expanding its first row (no gather): the cost floor of each setting."""

    def __init__(self, keep_q: float, keep_kv: float) -> None:
        super().__init__()
        self.keep_q = keep_q
        self.keep_kv = keep_kv

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = (kwargs[n] for n in ("query", "key", "value"))
        rest = {n: x for n, x in kwargs.items() if n not in ("query", "key", "value")}
        if k.shape[2] != q.shape[2]:  # cross-attention: left alone
            return func(q, k, v, **rest)
        num = q.shape[2]
        mq, mk = int(num * self.keep_q), int(num * self.keep_kv)
        out = func(q[:, :, :mq], k[:, :, :mk], v[:, :, :mk], **rest)
        return out if mq == num else out[:, :, :1].expand(-1, -1, num, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames: 21)")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 px: 60)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 px: 104)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN21_1_3B).eval()
    latent = torch.randn(1, 16, args.frames, args.height, args.width)
    text = torch.randn(1, 512, 4096)
    timestep = torch.tensor([500.0])
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"{tokens} video tokens, {torch.get_num_threads()} threads")
    settings: dict[str, tuple[dict[str, Any] | None, tuple[float, float] | None]] = {
        "unpatched": (None, None),
        "downsample 2x2 (kv x4)": ({"method": "downsample", "downsample_factor": 2}, None),
        "ideal kv/4": (None, (1.0, 0.25)),
        "merge q+kv 0.5": ({"ratio": 0.5}, None),
        "ideal q/2 kv/2": (None, (0.5, 0.5)),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    with torch.no_grad():
        for round_index in range(args.warmup + args.rounds):
            for name, (options, ideal) in settings.items():
                handle = tomediff.apply_tome(model, **options) if options else None
                mode = IdealAttention(*ideal) if ideal else None
                start = time.perf_counter()
                if mode is not None:
                    with mode:
                        model(latent, timestep, text, return_dict=False)
                else:
                    model(latent, timestep, text, return_dict=False)
                elapsed = time.perf_counter() - start
                if round_index >= args.warmup:
                    times[name].append(elapsed)
                print(f"round {round_index} {name}: {elapsed:.2f} s", flush=True)
                if handle is not None:
                    handle.remove()
    base = sorted(times["unpatched"])[len(times["unpatched"]) // 2]
    for name, values in times.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name}: median {median:.2f} s ({base / median:.2f}x), calls {[round(v, 2) for v in values]}")


if __name__ == "__main__":
    main()
