"""LDM / CompVis ``UNetModel`` (``openaimodel.py``): ``SpatialTransformer``s inside the input, middle
and output blocks, found by class name so the LDM code base need not be importable."""

from __future__ import annotations

from typing import cast

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter, transformer_block_spec
from tomediff.core import BlockSpec, GridSource

__all__ = ["LDMUNetAdapter"]


def _spatial_specs(prefix: str, block: nn.Module, downsample: int) -> list[BlockSpec]:
    specs: list[BlockSpec] = []
    for name, module in block.named_modules(prefix=prefix):
        if not class_name_in(module, {"SpatialTransformer"}):
            continue
        grid = GridSource(module, input_names=("x",))
        for index, transformer_block in enumerate(getattr(module, "transformer_blocks", [])):
            spec_name = f"{name}.transformer_blocks.{index}"
            specs.append(transformer_block_spec(spec_name, transformer_block, downsample, grid))
    return specs


def _contains(block: nn.Module, class_name: str) -> bool:
    return any(class_name_in(module, {class_name}) for module in block.modules())


@register_adapter
class LDMUNetAdapter(Adapter):
    name = "ldm-unet"
    priority = 10

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, attr) for attr in ("input_blocks", "middle_block", "output_blocks"))

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        specs: list[BlockSpec] = []
        downsample = 1
        for index, block in enumerate(cast(nn.ModuleList, model.input_blocks)):
            if _contains(block, "Downsample"):
                # A downsampling input block holds only the downsampler; later blocks run below it.
                downsample *= 2
            specs += _spatial_specs(f"input_blocks.{index}", block, downsample)
        specs += _spatial_specs("middle_block", cast(nn.Module, model.middle_block), downsample)
        for index, block in enumerate(cast(nn.ModuleList, model.output_blocks)):
            specs += _spatial_specs(f"output_blocks.{index}", block, downsample)
            if _contains(block, "Upsample"):
                downsample //= 2
        return specs
