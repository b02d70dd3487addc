"""Train the bundled demo diffusion model on Fashion-MNIST (seeded, resumable).

    python -m tomediff.eval.train_demo --out runs/demo --threads 1          # the shipped model: 1400 steps
    python -m tomediff.eval.train_demo --out runs/demo --export src/tomediff/eval/assets   # ship EMA weights

Progress and loss go to stdout and ``OUT/log.jsonl``; ``OUT/checkpoint.pt`` (model, EMA, optimizer,
data-order RNG) is rewritten every ``--checkpoint-every`` steps, and a rerun with the same ``--out``
continues from it, reproducing the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch.nn import functional as F

from tomediff.eval.data import load_fashion_mnist, to_model_space
from tomediff.eval.model import (
    ClassPromptEncoder,
    build_demo_unet,
    build_scheduler_config,
    images_to_latents,
)

__all__ = [
    "export_ema",
    "export_weights",
    "load_ema",
    "main",
    "run_training",
    "save_module",
    "train",
    "training_main",
]


class _Denoiser(torch.nn.Module):
    """UNet + prompt encoder as one module, so one optimizer/EMA covers both."""

    def __init__(self, unet_overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        overrides = unet_overrides or {}
        self.unet = build_demo_unet(**overrides)
        self.text_encoder = ClassPromptEncoder(dim=overrides.get("cross_attention_dim", 64))


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``loss_fn(model, x0, context_tokens, rng) -> loss``: draws its noise and timesteps from ``rng``."""


def run_training(
    out_dir: Path,
    model: torch.nn.Module,
    loss_fn: LossFn,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    cfg_dropout: float,
    ema_decay: float,
    seed: int,
    checkpoint_every: int,
    log_every: int,
    data_dir: str | None,
    device: str,
    max_images: int | None,
    image_size: int = 32,
) -> Path:
    """The training loop both bundled models share: seeded Fashion-MNIST batches of "latents" and
    class-name prompts (dropped to ``""`` with probability ``cfg_dropout`` for classifier-free
    guidance), AdamW with warm-up and cosine decay, gradient clipping, an EMA copy, and an atomic
    checkpoint a rerun resumes from. ``model`` has a ``text_encoder`` (:class:`ClassPromptEncoder`);
    ``loss_fn`` does the rest. ``image_size`` above 32 upsamples the images first
    (:func:`~tomediff.eval.model.images_to_latents`). Returns the checkpoint path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    images, labels = load_fashion_mnist("train", data_dir)
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    latents_all = images_to_latents(to_model_space(images), image_size)  # (60000, 4, 16, 16) at 32
    labels_all = torch.from_numpy(labels)

    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Every random draw of training comes from this generator, so a resumed run is identical.
    rng = torch.Generator().manual_seed(seed)
    text_encoder = cast(ClassPromptEncoder, model.text_encoder)
    tokens_per_class = text_encoder.tokenize_classes(range(len(text_encoder.class_names)))
    uncond_tokens = text_encoder.tokenize([""])[0]
    step, order, cursor = 0, torch.randperm(len(labels_all), generator=rng), 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        rng.set_state(state["rng"])
        step, order, cursor = state["step"], state["order"], state["cursor"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    if step >= steps:
        return ckpt_path

    meta = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "cfg_dropout": cfg_dropout,
        "ema_decay": ema_decay,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "device": device,
        "image_size": image_size,
    }
    (out_dir / "train_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    log = (out_dir / "log.jsonl").open("a")
    started, running, count = time.time(), 0.0, 0
    model.train()
    while step < steps:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(labels_all), generator=rng), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        x0 = latents_all[index].to(device)
        tokens = tokens_per_class[labels_all[index]]
        drop = torch.rand(batch_size, generator=rng) < cfg_dropout
        tokens[drop] = uncond_tokens
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        loss = loss_fn(model, x0, tokens.to(device), rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        # EMA warm-up: early on average over fewer steps so the EMA is not dominated by the init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
                ema_p.lerp_(p, 1 - decay)
        step += 1
        running += loss.item()
        count += 1
        if step % log_every == 0 or step == steps:
            elapsed = time.time() - started
            record = {
                "step": step,
                "loss": running / count,
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 1),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(
                f"step {step}/{steps} loss {record['loss']:.4f} lr {record['lr']:.2e} {elapsed:.0f}s",
                flush=True,
            )
            running, count = 0.0, 0
        if step % checkpoint_every == 0 or step == steps:
            state = {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng.get_state(),
                "step": step,
                "order": order,
                "cursor": cursor,
            }
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt_path)  # atomic: a kill mid-save never corrupts the checkpoint
    log.close()
    return ckpt_path


def load_ema(checkpoint: Path, model: torch.nn.Module) -> int:
    """Load a checkpoint's EMA weights into ``model``; returns the step it was saved at."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["ema"])
    return int(state["step"])


def save_module(module: torch.nn.Module, path: Path) -> None:
    """``module``'s weights as safetensors (contiguous copies, as safetensors requires)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)


def train(
    out_dir: Path,
    steps: int = 1400,
    batch_size: int = 64,
    lr: float = 5e-4,
    warmup: int = 100,
    cfg_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint_every: int = 250,
    log_every: int = 25,
    data_dir: str | None = None,
    device: str = "cpu",
    unet_overrides: dict[str, Any] | None = None,
    max_images: int | None = None,
) -> Path:
    """Train (or resume) the demo UNet (v-prediction, DDPM noise) and return the checkpoint path.

    ``unet_overrides`` and ``max_images`` (a prefix of the training split) exist for fast tests.
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    model = _Denoiser(unet_overrides)
    scheduler = DDPMScheduler(**build_scheduler_config())

    def loss_fn(
        model: torch.nn.Module, x0: torch.Tensor, tokens: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=rng).to(x0.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=rng)
        timesteps = timesteps.to(x0.device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = scheduler.get_velocity(x0, noise, timesteps)
        denoiser = cast(_Denoiser, model)
        context = denoiser.text_encoder(tokens)
        prediction = denoiser.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(prediction, target)

    return run_training(
        out_dir,
        model,
        loss_fn,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        cfg_dropout=cfg_dropout,
        ema_decay=ema_decay,
        seed=seed,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        data_dir=data_dir,
        device=device,
        max_images=max_images,
    )


def export_ema(
    checkpoint: Path,
    model: torch.nn.Module,
    assets_dir: Path,
    *,
    denoiser: tuple[str, dict[str, Any], str],
    encoder_file: str,
    meta_file: str,
    scheduler_config: dict[str, Any],
    extra_meta: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint's EMA weights and the configs into ``assets_dir``.

    ``model`` holds the trained network as attribute ``denoiser[0]`` (config ``denoiser[1]``, weights
    file ``denoiser[2]``) and the prompt encoder as ``text_encoder``; the meta file records both
    configs, the sampling scheduler's and the step the checkpoint was saved at.
    """
    name, config, weights_file = denoiser
    trained_steps = load_ema(checkpoint, model)
    text_encoder = cast(ClassPromptEncoder, model.text_encoder)
    save_module(getattr(model, name), assets_dir / weights_file)
    save_module(text_encoder, assets_dir / encoder_file)
    meta = {
        name: config,
        "text_encoder": text_encoder.config(),
        "scheduler": scheduler_config,
        "trained_steps": trained_steps,
        **(extra_meta or {}),
    }
    (assets_dir / meta_file).write_text(json.dumps(meta, indent=2, default=list) + "\n")


def export_weights(checkpoint: Path, assets_dir: Path, unet_overrides: dict[str, Any] | None = None) -> None:
    """Write the EMA weights of a checkpoint as ``demo_unet.safetensors``, ``demo_text_encoder.safetensors``
    and ``demo_model.json`` (the configs) into ``assets_dir``."""
    from tomediff.eval.model import DEMO_UNET_CONFIG

    export_ema(
        checkpoint,
        _Denoiser(unet_overrides),
        assets_dir,
        denoiser=("unet", {**DEMO_UNET_CONFIG, **(unet_overrides or {})}, "demo_unet.safetensors"),
        encoder_file="demo_text_encoder.safetensors",
        meta_file="demo_model.json",
        scheduler_config=build_scheduler_config(),
    )


def training_main(
    argv: list[str] | None,
    description: str | None,
    train_fn: Callable[..., Path],
    export_fn: Callable[..., None],
    default_out: Path,
    extra_arguments: dict[str, dict[str, Any]] | None = None,
) -> int:
    """The command line both demo trainers share; the defaults of ``--steps``, ``--batch-size``,
    ``--lr`` and ``--checkpoint-every`` are ``train_fn``'s own. ``extra_arguments`` maps more
    ``train_fn`` keywords to ``argparse`` options (``--image-size`` for ``image_size``); their values go
    to ``train_fn`` and to ``export_fn``."""
    defaults = {name: p.default for name, p in inspect.signature(train_fn).parameters.items()}
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (leave cores to others)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=defaults["checkpoint_every"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--export", type=Path, default=None, help="after training, write the EMA weights to this directory"
    )
    for keyword, options in (extra_arguments or {}).items():
        parser.add_argument("--" + keyword.replace("_", "-"), dest=keyword, **options)
    args = parser.parse_args(argv)
    extra = {keyword: getattr(args, keyword) for keyword in extra_arguments or {}}
    torch.set_num_threads(args.threads)
    ckpt = train_fn(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        data_dir=args.data_dir,
        device=args.device,
        **extra,
    )
    if args.export is not None:
        export_fn(ckpt, args.export, **extra)
        print(f"exported EMA weights to {args.export}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return training_main(argv, __doc__, train, export_weights, Path("runs/demo"))


if __name__ == "__main__":
    raise SystemExit(main())
