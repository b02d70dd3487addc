"""Tiny random-weight models (never downloaded) and comparison helpers shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which is chosen when triton is
# first imported; tomediff imports it, so this must come before any tomediff import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running tests (excluded by default; run with -m slow)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (excluded by default)")


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4
) -> None:
    """Like torch.testing.assert_close, but says where the largest difference is and how many differ."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    if bad.any():
        worst = int(diff.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{int(bad.sum())}/{diff.numel()} elements differ; largest |diff| {diff.max().item():.3g} at "
            f"{index}: {actual.flatten()[worst].item():.6g} vs {expected.flatten()[worst].item():.6g}"
        )


def seeded(fn: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fn().eval()


def tiny_sd_unet(**overrides: Any) -> nn.Module:
    """SD 1.x layout: cross-attention transformer blocks at the full-resolution level."""
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return seeded(lambda: diffusers.UNet2DConditionModel(**config))


def tiny_sd_unet_3level() -> nn.Module:
    """Transformer blocks at levels 1 and 2 (and the mid block), like SD 1.x's first levels."""
    return tiny_sd_unet(
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_sdxl_unet() -> nn.Module:
    """SDXL layout: no transformer block at full resolution, text_time added conditioning."""
    return seeded(
        lambda: diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
        )
    )


def sdxl_added_cond(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "text_embeds": torch.randn(batch, 32, generator=gen),
        "time_ids": torch.randn(batch, 6, generator=gen),
    }


def tiny_pixart() -> nn.Module:
    return seeded(
        lambda: diffusers.PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=16,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=24,
            norm_num_groups=4,
            use_additional_conditions=False,
        )
    )


def unet_inputs(
    batch: int = 2, height: int = 32, width: int = 32, channels: int = 4, context_dim: int = 32, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, channels, height, width, generator=gen)
    context = torch.randn(batch, 7, context_dim, generator=gen)
    return sample, torch.tensor(500), context


class BlockStack(nn.Module):
    """A [B, C, H, W] -> [B, C, H, W] model that runs BasicTransformerBlocks on the flattened grid,
    with no enclosing Transformer2DModel: the generic adapter must find the grid from the input."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, sample: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        batch, channels, height, width = sample.shape
        tokens = sample.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, **block_kwargs)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


DIM = 16


def norm_type_case(norm_type: str, batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """A BlockStack of one block with ``norm_type`` and the keyword inputs that norm needs."""
    extra: dict[str, Any] = {}
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=torch.Generator().manual_seed(3))
    }
    if norm_type in ("ada_norm", "ada_norm_zero"):
        extra["num_embeds_ada_norm"] = 10
        # AdaLayerNorm takes one timestep for the batch; AdaLayerNormZero one per sample.
        kwargs["timestep"] = torch.tensor(3) if norm_type == "ada_norm" else torch.arange(batch) % 10
    if norm_type == "ada_norm_zero":
        kwargs["class_labels"] = torch.arange(batch) % 3
    if norm_type == "ada_norm_single":
        kwargs["timestep"] = torch.randn(batch, 6 * DIM, generator=torch.Generator().manual_seed(4))
    if norm_type == "ada_norm_continuous":
        extra["ada_norm_continous_conditioning_embedding_dim"] = 8
        extra["ada_norm_bias"] = None
        kwargs["added_cond_kwargs"] = {
            "pooled_text_emb": torch.randn(batch, 8, generator=torch.Generator().manual_seed(5))
        }

    def build() -> nn.Module:
        block = BasicTransformerBlock(
            DIM,
            2,
            8,
            cross_attention_dim=12,
            norm_type=norm_type,
            num_embeds_ada_norm=extra.get("num_embeds_ada_norm"),
            **{k: v for k, v in extra.items() if k != "num_embeds_ada_norm"},
        )
        return BlockStack([block])

    return seeded(build), kwargs


class RecordTokens:
    """Forward pre-hook recording the token count each call of a module receives."""

    def __init__(self, module: nn.Module) -> None:
        self.counts: list[int] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.counts.append(int(args[0].shape[1]))
