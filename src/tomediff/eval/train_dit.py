"""Train the bundled demo DiT (a small ``FluxTransformer2DModel``) on Fashion-MNIST (seeded, resumable).

    python -m tomediff.eval.train_dit --out runs/dit --threads 1            # the shipped model
    python -m tomediff.eval.train_dit --out runs/dit --export src/tomediff/eval/assets   # ship EMA weights
    python -m tomediff.eval.train_dit --out runs/dit-hires --image-size 64 \
        --init-from src/tomediff/eval/assets --steps 300 --lr 3e-4 --threads 2 \
        --export src/tomediff/eval/assets                                    # the high-resolution DiT

``--image-size 64`` trains on the images upsampled to 64×64: 32×32 "latents", 1,024 image tokens, the
same architecture (patch 1, rotary positions, so any grid fits). ``--init-from DIR`` starts from the DiT
bundled in ``DIR`` (the 32×32 one) and fine-tunes it, rather than training from scratch.

The objective is flow matching, as Flux is trained: ``x_t = (1 - sigma) x0 + sigma noise`` with
``sigma`` drawn logit-normal (SD3's schedule), and the transformer predicts the velocity
``noise - x0``. The loop, data order, EMA, logging (``OUT/log.jsonl``) and checkpoint/resume
(``OUT/checkpoint.pt``; a rerun with the same ``--out`` replays the batches an uninterrupted run would
have seen) are the demo UNet's: :func:`tomediff.eval.train_demo.run_training`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch.nn import functional as F

from tomediff.eval.model import (
    DEMO_DIT_CONFIG,
    IMAGE_SIZE,
    ClassPromptEncoder,
    build_demo_dit,
    build_flow_scheduler_config,
    dit_position_ids,
    latents_to_tokens,
)
from tomediff.eval.pipeline import DIT_FILES, dit_files, load_demo_dit
from tomediff.eval.train_demo import export_ema, run_training, training_main

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
    """Velocity loss of ``model.transformer`` on latents ``x0 (B, 4, H, W)`` (16×16 at image size 32)."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    # Logit-normal sigmas (mean 0, std 1) weight the middle of the trajectory, where the velocity is
    # hardest to predict.
    sigmas = torch.sigmoid(torch.randn(batch, generator=rng)).to(x0.device)
    sigma = sigmas.view(batch, 1, 1, 1)
    noisy = (1 - sigma) * x0 + sigma * noise
    img_ids, txt_ids = dit_position_ids(x0.shape[-2], x0.shape[-1], tokens.shape[1])
    denoiser = cast(_DiTDenoiser, model)
    context = denoiser.text_encoder(tokens)
    prediction = denoiser.transformer(
        latents_to_tokens(noisy),
        encoder_hidden_states=context,
        pooled_projections=denoiser.text_encoder.pool(context, tokens),
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
    image_size: int = IMAGE_SIZE,
    init_from: str | Path | None = None,
) -> Path:
    """Train (or resume) the demo DiT and return the checkpoint path.

    ``image_size`` 64 trains on upsampled images (1,024 image tokens); ``init_from`` is an assets
    directory whose 32×32 DiT the run starts from. ``dit_overrides`` and ``max_images`` (a prefix of
    the training split) exist for fast tests.
    """
    torch.manual_seed(seed)
    model = _DiTDenoiser(dit_overrides)
    if init_from is not None:  # the 32×32 DiT: the same architecture runs on any grid
        start = load_demo_dit(init_from)
        model.transformer.load_state_dict(start.transformer.state_dict())
        model.text_encoder.load_state_dict(start.text_encoder.state_dict())
    return run_training(
        out_dir,
        model,
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
        image_size=image_size,
    )


def export_dit_weights(
    checkpoint: Path,
    assets_dir: Path,
    dit_overrides: dict[str, Any] | None = None,
    image_size: int = IMAGE_SIZE,
    init_from: str | Path | None = None,
) -> None:
    """Write the EMA weights of a checkpoint and the configs into ``assets_dir`` (:data:`DIT_FILES`, or
    the high-resolution DiT's files for ``image_size`` 64)."""
    transformer_file, encoder_file, meta_file = dit_files(image_size)
    extra_meta: dict[str, Any] = {"image_size": image_size}
    if init_from is not None:
        extra_meta["fine_tuned_from"] = DIT_FILES[0]
    export_ema(
        checkpoint,
        _DiTDenoiser(dit_overrides),
        assets_dir,
        denoiser=("transformer", {**DEMO_DIT_CONFIG, **(dit_overrides or {})}, transformer_file),
        encoder_file=encoder_file,
        meta_file=meta_file,
        scheduler_config=build_flow_scheduler_config(),
        extra_meta=extra_meta,
    )


def main(argv: list[str] | None = None) -> int:
    extra: dict[str, dict[str, Any]] = {
        "image_size": {"type": int, "default": IMAGE_SIZE, "choices": (IMAGE_SIZE, 64)},
        "init_from": {"default": None, "help": "assets directory whose 32×32 DiT to fine-tune"},
    }
    return training_main(argv, __doc__, train_dit, export_dit_weights, Path("runs/dit"), extra)


if __name__ == "__main__":
    raise SystemExit(main())
