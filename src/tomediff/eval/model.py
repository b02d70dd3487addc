"""The bundled demo models: a small Stable-Diffusion-style UNet and a small Flux-style diffusion
transformer (DiT), both trained on Fashion-MNIST.

Layout, chosen so token merging meets the same structures it meets in SD 1.x:

* "latent": the 32×32 padded grey image, pixel-unshuffled 2×2 into a 4-channel 16×16 tensor. This is
  a lossless stand-in for SD's VAE (4 channels, 8× fewer positions) that costs nothing to train.
* denoiser: a diffusers ``UNet2DConditionModel`` with SD block types (CrossAttnDownBlock2D ×2,
  DownBlock2D / UpBlock2D, CrossAttnUpBlock2D ×2, ``BasicTransformerBlock`` with self-attention,
  cross-attention and feed-forward). Its highest-resolution transformer level sees 16×16 = 256 tokens.
* "text encoder": :class:`ClassPromptEncoder`, learned embeddings of the words of the class names
  (``"Ankle boot"`` → ``<bos> ankle boot <eos>``) plus positions, the way CLIP's hidden states
  condition SD through cross-attention. The empty prompt ``<bos> <eos>`` is the unconditional input
  for classifier-free guidance.
* DiT: a diffusers ``FluxTransformer2DModel`` (double-stream then single-stream blocks, joint attention
  of the prompt tokens and the image tokens, 2-D rotary positions from ``img_ids``, no guidance
  embedding) over the same "latent", one token per latent position (patch 1): 16×16 = 256 image
  tokens of 4 channels. Trained with flow matching, as Flux is; sampled with flow-matching Euler.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tomediff.eval.data import CLASS_NAMES

__all__ = [
    "DEMO_DIT_CONFIG",
    "DEMO_UNET_CONFIG",
    "PROMPT_LENGTH",
    "ClassPromptEncoder",
    "build_demo_dit",
    "build_demo_unet",
    "build_flow_scheduler_config",
    "build_scheduler_config",
    "dit_position_ids",
    "images_to_latents",
    "latents_to_images",
    "latents_to_tokens",
    "tokens_to_latents",
]

PROMPT_LENGTH = 4
IMAGE_SIZE = 32  # Fashion-MNIST's 28×28, padded
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2

DEMO_UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    # diffusers' legacy name: for UNet2DConditionModel this is the number of heads per level.
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}

# v-prediction with the cosine schedule: stable at the noisiest steps in pixel space, where an
# epsilon model must extrapolate x0 from almost pure noise.
_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


# The DiT's text side is the same prompt encoder, so its width is the encoder's (64). The rotary axes
# (unused frame axis, rows, columns) split the 32-d heads; sized so one CPU thread trains it in ~45 min.
DEMO_DIT_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}

# Flow matching (x_t = (1 - sigma) x0 + sigma noise), no resolution shift: the grid is fixed at 256 tokens.
_FLOW_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


def build_flow_scheduler_config() -> dict[str, Any]:
    """Config of the DiT's ``FlowMatchEulerDiscreteScheduler``."""
    return dict(_FLOW_SCHEDULER_CONFIG)


def build_demo_dit(**overrides: Any) -> nn.Module:
    """A freshly initialised demo DiT (``FluxTransformer2DModel``); ``overrides`` patch the config."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**{**DEMO_DIT_CONFIG, **overrides})


def dit_position_ids(height: int, width: int, prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's position ids: ``img_ids (height*width, 3)`` = (0, row, column) in row-major token order,
    and ``txt_ids (prompt_length, 3)`` all zero (text tokens carry no 2-D position), as Flux pipelines
    build them."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return img_ids, torch.zeros(prompt_length, 3)


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` → image tokens ``(B, H*W, C)`` in row-major order (patch 1)."""
    return latents.flatten(2).transpose(1, 2)


def tokens_to_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`latents_to_tokens`: ``(B, H*W, C)`` → ``(B, C, H, W)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def build_scheduler_config() -> dict[str, Any]:
    """Config shared by the DDPM training scheduler and the sampling schedulers."""
    return dict(_SCHEDULER_CONFIG)


def build_demo_unet(**overrides: Any) -> nn.Module:
    """A freshly initialised demo UNet (``UNet2DConditionModel``); ``overrides`` patch the config."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**DEMO_UNET_CONFIG, **overrides})


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s/]+", name.lower()) if w]


class ClassPromptEncoder(nn.Module):
    """Word-embedding "text encoder" over the class names.

    ``forward(token_ids (B, L)) -> hidden states (B, L, dim)``, the cross-attention context.
    """

    PAD, BOS, EOS = 0, 1, 2

    def __init__(
        self, class_names: Sequence[str] = CLASS_NAMES, dim: int = 64, length: int = PROMPT_LENGTH
    ) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        self.length = length
        vocabulary = sorted({w for name in self.class_names for w in _words(name)})
        self.word_to_id = {w: i + 3 for i, w in enumerate(vocabulary)}
        self.token_embedding = nn.Embedding(len(vocabulary) + 3, dim)
        self.position_embedding = nn.Parameter(torch.zeros(length, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts (class names, ``""`` = unconditional) → token ids ``(B, length)``."""
        rows = []
        for prompt in prompts:
            ids = [self.BOS] + [self.word_to_id[w] for w in _words(prompt)] + [self.EOS]
            if len(ids) > self.length:
                raise ValueError(f"prompt {prompt!r} has more than {self.length - 2} words.")
            rows.append(ids + [self.PAD] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def tokenize_classes(self, class_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Class indices ``(B,)`` → token ids ``(B, length)`` of their names."""
        return self.tokenize([self.class_names[int(c)] for c in class_ids])

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        return self.norm(hidden)

    def pool(self, hidden_states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Mean of ``hidden_states (B, L, dim)`` over the non-padding tokens → ``(B, dim)``: the pooled
        prompt vector Flux's ``pooled_projections`` takes (where CLIP's pooled output goes)."""
        keep = (token_ids != self.PAD).unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(1) / keep.sum(1)

    def config(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "dim": self.token_embedding.embedding_dim,
            "length": self.length,
        }


def images_to_latents(images: torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Padded images ``(B, 1, 32, 32)`` in [-1, 1] → "latents" ``(B, 4, image_size/2, image_size/2)``.

    Pixel unshuffle; with ``image_size`` above 32 the images are first upsampled bilinearly (the
    high-resolution DiT's data: the same garments on a finer grid, like a larger render of one scene).
    """
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return F.pixel_unshuffle(images, 2)


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`images_to_latents`: ``(B, 4, 16, 16)`` → ``(B, 1, 32, 32)``; larger latents are
    area-downsampled back to 32×32, the size the classifier and the real test images have."""
    images = F.pixel_shuffle(latents, 2)
    if images.shape[-1] != IMAGE_SIZE:
        images = F.adaptive_avg_pool2d(images, IMAGE_SIZE)
    return images


def save_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=list) + "\n")
