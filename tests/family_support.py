"""What the diffusion-transformer family tests share: the tiny-model helpers (random values for
zero-initialised parameters, the Wan-shaped tiny config), input builders that more than one family
module uses, and running a family while recording its attention calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import torch
from torch import nn

import tomediff
from test_attention_site import SdpaSpy
from test_dit_models import tome_hooks

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def randomize_zeros(model: nn.Module, seed: int, skip_scalars: bool = False) -> nn.Module:
    """Random values (from ``seed``) for the parameters a model initialises to zero (output layers, adaLN
    gates, modulation), so the tiny model's output depends on every attention call, as in a trained
    checkpoint; ``skip_scalars`` leaves single-element parameters as they are. Returns the model in eval
    mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if (parameter.numel() > 1 or not skip_scalars) and not parameter.any():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=gen))
    return model.eval()


# The tiny config of Wan 2.1 and the classes built on its blocks (SkyReels-V2, Wan VACE, ChronoEdit,
# AnyFlow): 2 heads of 12, 2 x 2 patches. cross_attn_norm and qk_norm are left at the classes' defaults
# (True and "rms_norm_across_heads", Wan 2.1's; AnyFlow has no qk_norm).
TINY_WAN_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)


def tiny_wan_shaped(class_name: str, **overrides: Any) -> nn.Module:
    """The diffusers class ``class_name`` with :data:`TINY_WAN_CONFIG` (``overrides`` replace or add
    entries), seeded weights, in eval mode."""
    torch.manual_seed(0)
    return getattr(diffusers, class_name)(**{**TINY_WAN_CONFIG, **overrides}).eval()


# CogVideoX's tiny config; ConsisID builds on it (with rotary positions).
TINY_COGVIDEOX_CONFIG: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    time_embed_dim=2,
    text_embed_dim=8,
    num_layers=2,
    sample_width=6,
    sample_height=10,
    sample_frames=9,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=8,
)


def cogvideox_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    """CogVideoX's call (ConsisID's without its rotary table): a ``[B, F, 4, 2H, 2W]`` latent (2 x 2
    patches), 8 text tokens 8 wide."""
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, frames, 4, 2 * height, 2 * width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 8, 8, generator=gen),
        "timestep": torch.full((batch,), 500),
        "return_dict": False,
    }


def cogview_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    """CogView3-Plus's and CogView4's call: a ``[B, 4, 2H, 2W]`` latent (2 x 2 patches), 6 text tokens
    8 wide, and the SDXL-style size conditions of a ``16H x 16W`` image."""
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    size = torch.tensor([[2 * height * 8, 2 * width * 8]] * batch, dtype=torch.float32)
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 8, generator=gen),
        "timestep": torch.full((batch,), 500),
        "original_size": size,
        "target_size": size,
        "crop_coords": torch.zeros(batch, 2),
        "return_dict": False,
    }


def flux2_layout_inputs(batch: int, grid: tuple[int, int, int], text_dim: int, **extra: Any) -> Inputs:
    """Flux.2's call, which Flux 3 keeps: packed ``[B, H * W, 4]`` latents, 4 text tokens ``text_dim``
    wide, and the 4-axis rotary ids ``(t, h, w, l)``: the image's rows and columns at ``t = l = 0``, the
    text along ``l``. ``extra`` adds keyword arguments (Flux.2's guidance)."""
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    zero = torch.arange(1)
    return (), {
        "hidden_states": torch.randn(batch, height * width, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 4, text_dim, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero),
        "txt_ids": torch.cartesian_prod(zero, zero, zero, torch.arange(4)),
        **extra,
        "return_dict": False,
    }


def family_run(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, SdpaSpy]:
    """The model's first output for ``inputs`` (a per-sample list, as Z-Image returns, stacked), and
    the attention calls it made."""
    spy = SdpaSpy()
    with spy, torch.no_grad():
        out = model(*inputs[0], **inputs[1])[0]
    if isinstance(out, list):
        out = torch.stack(out)
    return out, spy


def call_shapes(spy: SdpaSpy) -> list[tuple[int, int]]:
    """(queries, keys) of each attention call, in order."""
    return [(q.shape[2], k.shape[2]) for q, k, _ in spy.calls]


def check_pipeline_reduces_and_restores(
    pipe: Any, generate: Callable[[], torch.Tensor], settings: dict[str, Any], calls: int, tokens: int
) -> None:
    """Generates with ``pipe`` unpatched, then under ``tomediff.tome(pipe, **settings)``: the patch sees
    ``calls`` transformer calls of ``tokens`` image/video tokens in every block and changes the
    output; removal leaves no hook and gives the unpatched output bit-exactly."""
    reference = generate()
    with tomediff.tome(pipe, **settings) as handle:
        out = generate()
        report = handle.report()
    assert report.calls == calls
    assert all(b.last_call is not None and b.last_call.tokens == tokens for b in report.blocks)
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)
    assert tome_hooks(pipe.transformer) == 0 and torch.equal(generate(), reference)
