"""Fallback: any module containing ``BasicTransformerBlock``s (diffusers or LDM). Levels are told at
call time from the token grid, which comes from an enclosing ``Transformer2DModel`` /
``SpatialTransformer`` or from the patched module's input size."""

from __future__ import annotations

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter, transformer_block_spec
from tomediff.core import BlockSpec, GridSource

__all__ = ["GenericBlocksAdapter"]

_BLOCK_CLASSES = {"BasicTransformerBlock"}
_CONTAINER_CLASSES = {"Transformer2DModel", "SpatialTransformer"}


@register_adapter
class GenericBlocksAdapter(Adapter):
    name = "generic-blocks"
    priority = -100

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(class_name_in(module, _BLOCK_CLASSES) for module in model.modules())

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        containers: dict[int, GridSource] = {}
        for module in model.modules():
            if class_name_in(module, _CONTAINER_CLASSES):
                patch_size = getattr(getattr(module, "config", None), "patch_size", None) or 1
                source = GridSource(module, patch_size=patch_size)
                for block in module.modules():
                    containers.setdefault(id(block), source)
        return [
            transformer_block_spec(name, module, None, containers.get(id(module)))
            for name, module in model.named_modules()
            if class_name_in(module, _BLOCK_CLASSES)
        ]
