"""diffusers UNets (SD 1.x/2.x, SDXL) and ControlNets: transformer blocks inside ``Transformer2DModel``s
of the down, mid and up blocks; a block's level follows from the down/upsamplers before it."""

from __future__ import annotations

from typing import cast

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter, transformer_block_spec
from tomediff.core import BlockSpec, GridSource

__all__ = ["DiffusersUNetAdapter", "DreamLiteTransformerAdapter"]

_UNET_CLASSES = {"UNet2DConditionModel", "ControlNetModel", "ControlNetXSAdapter", "UNetControlNetXSModel"}


def _has_sampler(block: nn.Module, attr: str) -> bool:
    samplers = getattr(block, attr, None)
    return samplers is not None and len(samplers) > 0


def _container_specs(prefix: str, block: nn.Module, downsample: int) -> list[BlockSpec]:
    specs: list[BlockSpec] = []
    for index, container in enumerate(getattr(block, "attentions", None) or []):
        grid = GridSource(container)
        for block_index, transformer_block in enumerate(getattr(container, "transformer_blocks", [])):
            name = f"{prefix}.attentions.{index}.transformer_blocks.{block_index}"
            specs.append(transformer_block_spec(name, transformer_block, downsample, grid))
    return specs


@register_adapter
class DiffusersUNetAdapter(Adapter):
    name = "diffusers-unet"
    priority = 20

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, _UNET_CLASSES) and hasattr(model, "down_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        specs: list[BlockSpec] = []
        downsample = 1
        for index, block in enumerate(cast(nn.ModuleList, model.down_blocks)):
            specs += _container_specs(f"down_blocks.{index}", block, downsample)
            if _has_sampler(block, "downsamplers"):
                downsample *= 2
        mid_block = getattr(model, "mid_block", None)
        if mid_block is not None:
            specs += _container_specs("mid_block", mid_block, downsample)
        for index, block in enumerate(getattr(model, "up_blocks", None) or []):
            specs += _container_specs(f"up_blocks.{index}", block, downsample)
            if _has_sampler(block, "upsamplers"):
                downsample //= 2
        return specs


@register_adapter
class DreamLiteTransformerAdapter(Adapter):
    """DreamLite's ``DreamLiteTransformer2DModel`` patched on its own (inside a ``DreamLiteUNetModel``, a
    ``UNet2DConditionModel`` subclass, :class:`DiffusersUNetAdapter` reaches its blocks): its
    ``BasicTransformerBlockDreamLite``s, as ``BasicTransformerBlock``s (``attn1``, ``attn2``, ``ff``), on the
    grid of its ``[B, C, H, W]`` input. Blocks built without self-attention (DreamLite's high-resolution
    levels) have no ``attn1`` site."""

    name = "diffusers-dreamlite-transformer"
    priority = 20

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, {"DreamLiteTransformer2DModel"}) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        grid = GridSource(model)
        return [
            transformer_block_spec(f"transformer_blocks.{index}", block, 1, grid)
            for index, block in enumerate(cast(nn.ModuleList, model.transformer_blocks))
        ]
