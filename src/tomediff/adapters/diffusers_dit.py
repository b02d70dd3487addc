"""diffusers DiTs with ``BasicTransformerBlock``s on one patch grid: PixArt-α/Σ
(``PixArtTransformer2DModel``), DiT, and ``Transformer2DModel`` used on its own."""

from __future__ import annotations

from typing import cast

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter, transformer_block_spec
from tomediff.core import BlockSpec, GridSource

__all__ = ["DiffusersDiTAdapter"]

_DIT_CLASSES = {"PixArtTransformer2DModel", "DiTTransformer2DModel", "Transformer2DModel"}


@register_adapter
class DiffusersDiTAdapter(Adapter):
    name = "diffusers-dit"
    priority = 20

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, _DIT_CLASSES) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        config = getattr(model, "config", None)
        patch_size = getattr(config, "patch_size", None) or 1
        grid = GridSource(model, patch_size=patch_size)
        # All blocks see the same (patchified) grid: that grid is the full resolution, level 1.
        return [
            transformer_block_spec(f"transformer_blocks.{index}", block, 1, grid)
            for index, block in enumerate(cast(nn.ModuleList, model.transformer_blocks))
            if class_name_in(block, {"BasicTransformerBlock"})
        ]
