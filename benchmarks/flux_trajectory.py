"""Wall-clock of a whole sampling trajectory on FLUX.1-dev's published config (random weights; on the
CPU the bench's fewer blocks), unaccelerated against tomediff settings, diffusers caches and stacks
(issue 16, item 5).

Each setting runs the same trajectory: ``--steps`` flow-matching Euler steps (diffusers'
``FlowMatchEulerDiscreteScheduler``, shift 3, no dynamic shifting), batch 1 (FLUX.1-dev is
guidance-distilled: one call per step), guidance embedding 3.5, from the same noise. Settings are
interleaved: round r runs every setting once (order rotating) before round r + 1. Settings use
``python -m tomediff.eval.pareto``'s syntax (``NAME:ToMeConfig options,cache=KIND:...``).

Random weights make a cache's skip decisions say nothing about quality: the block calls each setting
made (``block_calls``: how often the last block's attention ran) are recorded beside its time, so
the speed-up can be read against how much each one skipped.

    python benchmarks/flux_trajectory.py --resolution 1024 --steps 4 --rounds 1 --out runs/flux-traj
    python benchmarks/flux_trajectory.py --dry-run      # tiny Flux, 2 steps: checks the plumbing in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from tomediff.bench.models import get_model_spec, make_inputs
from tomediff.eval.pareto import ParetoSetting, parse_pareto_setting

# fbc-all: a threshold no change reaches, so every step after the first runs only the first block: the
# most FirstBlockCache can skip (random weights give no meaningful threshold).
DEFAULT_SETTINGS = (
    "kv0.5:ratio=0,kv_ratio=0.5",
    "fbc-all:cache=fbc:threshold=10",
    "fbc-all+kv0.5:ratio=0,kv_ratio=0.5,cache=fbc:threshold=10",
)

# The dry run: Flux's block layout at a tiny width (the shapes of tests/test_dit_models.py's tiny Flux).
TINY_FLUX = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}


class _Timestep:
    """What PAB/FasterCache callbacks read: the current timestep of the loop."""

    current_timestep: Any = None


def build(
    dry_run: bool, device: str, dtype: torch.dtype, blocks: tuple[int, int] | None = None
) -> tuple[torch.nn.Module, Any]:
    import dataclasses

    from tomediff.bench.models import build_model

    spec = get_model_spec("flux")
    if dry_run:
        spec = dataclasses.replace(spec, config=TINY_FLUX, cpu_overrides={}, text_tokens=8)
    if blocks is not None:  # e.g. (1, 1): the fewest FirstBlockCache can split (first block + the rest)
        overrides = {"num_layers": blocks[0], "num_single_layers": blocks[1]}
        spec = dataclasses.replace(spec, config={**spec.config, **overrides}, cpu_overrides={})
    return build_model(spec, device, dtype), spec


def trajectory(model: torch.nn.Module, inputs: Any, steps: int, clock: _Timestep) -> torch.Tensor:
    """``steps`` Euler steps of the flow from the inputs' noise; returns the final latent tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents = inputs.args[0].clone()
    cached = bool(getattr(model, "is_cache_enabled", False))
    if cached:
        model._reset_stateful_cache()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps.tolist()):
            t = torch.tensor(t, device=latents.device)
            clock.current_timestep = t
            kwargs = {**inputs.kwargs, "timestep": (t / 1000).to(latents.dtype).expand(latents.shape[0])}
            if cached:
                with model.cache_context(
                    "cond", step_index=i, num_inference_steps=steps, timestep=t, sigma=float(t) / 1000
                ):
                    velocity = model(latents, **kwargs)[0]
            else:
                velocity = model(latents, **kwargs)[0]
            latents = scheduler.step(velocity, t, latents).prev_sample
    return latents


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def apply(setting: ParetoSetting, model: torch.nn.Module, clock: _Timestep, steps: int) -> Any:
    """Put ``setting`` on ``model``; returns a function that takes it off."""
    import tomediff

    handle = tomediff.apply_tome(model, setting.tome.config()) if setting.tome is not None else None
    if setting.cache is not None:
        # MagCache decides from its calibrated ratios alone, never from the outputs: with the ratios
        # MagCache's authors calibrated on FLUX.1-dev (diffusers ships them; interpolated to ``steps``),
        # it skips here exactly the steps it skips on the real model, random weights or not.
        mag_ratios = FLUX_MAG_RATIOS.tolist() if setting.cache.kind == "mag" else None
        model.enable_cache(setting.cache.config(clock, mag_ratios=mag_ratios, steps=steps))

    def remove() -> None:
        if getattr(model, "is_cache_enabled", False):
            model.disable_cache()
        if handle is not None:
            handle.remove()

    return remove


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", action="append", default=None, metavar="NAME:OPTIONS")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default 4; 2 in a dry run)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (the bench's fewer blocks) or cuda (all blocks)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", type=Path, default=Path("runs/flux-trajectory"))
    parser.add_argument(
        "--blocks",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=None,
        metavar="DOUBLE,SINGLE",
        help="double- and single-stream blocks. Default: published 19,38 on CUDA, the bench's 1,2 on CPU",
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny Flux at 256², one round")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.resolution, args.rounds = 256, 1
    args.steps = args.steps or (2 if args.dry_run else 4)
    torch.set_num_threads(args.threads)
    settings = [ParetoSetting("unaccelerated")]
    settings += [parse_pareto_setting(text) for text in args.setting or DEFAULT_SETTINGS]
    dtype = getattr(torch, args.dtype)
    model, spec = build(args.dry_run, args.device, dtype, args.blocks)
    inputs = make_inputs(spec, 1, args.resolution, args.device, dtype)
    if args.device != "cpu":  # one untimed trajectory: kernels, allocator, autotuning
        trajectory(model, inputs, 2, _Timestep())
    # The last block's query projection runs only when that block's attention is computed, not when a
    # cache skips the block (FirstBlockCache) or returns a kept/forecast attention output (TaylorSeer).
    last_attention = model.single_transformer_blocks[-1].attn.to_q
    calls = [0]
    counter = last_attention.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    clock = _Timestep()
    seconds: dict[str, list[float]] = {s.name: [] for s in settings}
    block_calls: dict[str, int] = {}
    finals: dict[str, torch.Tensor] = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for setting in settings[r % len(settings) :] + settings[: r % len(settings)]:
            remove = apply(setting, model, clock, args.steps)
            try:
                calls[0] = 0
                synchronize(args.device)
                start = time.perf_counter()
                finals[setting.name] = trajectory(model, inputs, args.steps, clock)
                synchronize(args.device)
                seconds[setting.name].append(time.perf_counter() - start)
                block_calls[setting.name] = calls[0]
            finally:
                remove()
            loads.append(os.getloadavg()[0])
            print(
                f"round {r + 1} {setting.name}: {seconds[setting.name][-1]:.2f} s, "
                f"{calls[0]} last-attention calls, load {loads[-1]:.1f}",
                flush=True,
            )
    counter.remove()
    base = statistics.median(seconds["unaccelerated"])
    reference = finals["unaccelerated"]
    rows = []
    for setting in settings:
        median = statistics.median(seconds[setting.name])
        difference = (finals[setting.name] - reference).float().norm() / reference.float().norm()
        rows.append(
            {
                "name": setting.name,
                "setting": setting.text,
                "seconds": seconds[setting.name],
                "median_s": median,
                "speedup": base / median,
                "block_calls": block_calls[setting.name],
                "relative_difference": float(difference),
            }
        )
    from tomediff.bench.runner import environment

    meta = {
        "command": " ".join(sys.argv),
        "model": "FLUX.1-dev published config" + (" (tiny dry run)" if args.dry_run else ""),
        "config": dict(model.config),
        "resolution": args.resolution,
        "device": args.device,
        "dtype": args.dtype,
        "steps": args.steps,
        "rounds": args.rounds,
        "load_average_1min": loads,
        "environment": environment(torch.device(args.device)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(
        "| setting | options | median s | speed-up | last-attention calls | rel. difference of final latent |"
    )
    print("|---|---|--:|--:|--:|--:|")
    for row in rows:
        print(
            f"| {row['name']} | {row['setting']} | {row['median_s']:.2f} | {row['speedup']:.2f} | "
            f"{row['block_calls']} | {row['relative_difference']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
