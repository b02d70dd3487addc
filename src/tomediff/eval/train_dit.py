"""Train the bundled demo DiT (a small ``FluxTransformer2DModel``) on Fashion-MNIST (seeded, resumable).

    python -m tomediff.eval.train_dit --out runs/dit --threads 1            # the shipped model
    python -m tomediff.eval.train_dit --out runs/dit --export src/tomediff/eval/assets   # ship EMA weights

The objective is flow matching, as Flux is trained: ``x_t = (1 - sigma) x0 + sigma noise`` with
``sigma`` drawn logit-normal (SD3's schedule), and the transformer predicts the velocity
``noise - x0``. The loop, data order, EMA, logging (``OUT/log.jsonl``) and checkpoint/resume
(``OUT/checkpoint.pt``; a rerun with the same ``--out`` replays the batches an uninterrupted run would
have seen) are the demo UNet's: :func:`tomediff.eval.train_demo.run_training`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from tomediff.eval.model import (
    DEMO_DIT_CONFIG,
    LATENT_SIZE,
    ClassPromptEncoder,
    build_demo_dit,
    build_flow_scheduler_config,
    dit_position_ids,
    latents_to_tokens,
)
from tomediff.eval.pipeline import DIT_FILES
from tomediff.eval.train_demo import load_ema, run_training, save_module

__all__ = ["export_dit_weights", "main", "train_dit"]


class _DiTDenoiser(torch.nn.Module):
    """Transformer + prompt encoder as one module, so one optimizer/EMA covers both."""

    def __init__(self, dit_overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = {**DEMO_DIT_CONFIG, **(dit_overrides or {})}
        self.transformer = build_demo_dit(**(dit_overrides or {}))
        self.text_encoder = ClassPromptEncoder(dim=config["joint_attention_dim"])


def flow_matching_loss(
    model: torch.nn.Module, x0: torch.Tensor, tokens: torch.Tensor, rng: torch.Generator
) -> torch.Tensor:
    """Velocity loss of ``model.transformer`` on latents ``x0 (B, 4, 16, 16)``."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    # Logit-normal sigmas (mean 0, std 1) weight the middle of the trajectory, where the velocity is
    # hardest to predict.
    sigmas = torch.sigmoid(torch.randn(batch, generator=rng)).to(x0.device)
    sigma = sigmas.view(batch, 1, 1, 1)
    noisy = (1 - sigma) * x0 + sigma * noise
    img_ids, txt_ids = dit_position_ids(LATENT_SIZE, LATENT_SIZE, tokens.shape[1])
    context = model.text_encoder(tokens)
    prediction = model.transformer(
        latents_to_tokens(noisy),
        encoder_hidden_states=context,
        pooled_projections=model.text_encoder.pool(context, tokens),
        timestep=sigmas,  # diffusers' Flux scales by 1000 itself
        img_ids=img_ids.to(x0.device),
        txt_ids=txt_ids.to(x0.device),
    ).sample
    return F.mse_loss(prediction, latents_to_tokens(noise - x0))


def train_dit(
    out_dir: Path,
    steps: int = 700,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    cfg_dropout: float = 0.1,
    ema_decay: float = 0.998,
    seed: int = 0,
    checkpoint_every: int = 100,
    log_every: int = 25,
    data_dir: str | None = None,
    device: str = "cpu",
    dit_overrides: dict[str, Any] | None = None,
    max_images: int | None = None,
) -> Path:
    """Train (or resume) the demo DiT and return the checkpoint path.

    ``dit_overrides`` and ``max_images`` (a prefix of the training split) exist for fast tests.
    """
    torch.manual_seed(seed)
    return run_training(
        out_dir,
        _DiTDenoiser(dit_overrides),
        flow_matching_loss,
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


def export_dit_weights(
    checkpoint: Path, assets_dir: Path, dit_overrides: dict[str, Any] | None = None
) -> None:
    """Write the EMA weights of a checkpoint and the configs into ``assets_dir`` (:data:`DIT_FILES`)."""
    model = _DiTDenoiser(dit_overrides)
    trained_steps = load_ema(checkpoint, model)
    transformer_file, encoder_file, meta_file = DIT_FILES
    save_module(model.transformer, assets_dir / transformer_file)
    save_module(model.text_encoder, assets_dir / encoder_file)
    meta = {
        "transformer": {**DEMO_DIT_CONFIG, **(dit_overrides or {})},
        "text_encoder": model.text_encoder.config(),
        "scheduler": build_flow_scheduler_config(),
        "trained_steps": trained_steps,
    }
    (assets_dir / meta_file).write_text(json.dumps(meta, indent=2, default=list) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/dit"))
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (leave cores to others)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--export", type=Path, default=None, help="after training, write the EMA weights to this directory"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = train_dit(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        data_dir=args.data_dir,
        device=args.device,
    )
    if args.export is not None:
        export_dit_weights(ckpt, args.export)
        print(f"exported EMA weights to {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
