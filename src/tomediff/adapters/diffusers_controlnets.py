"""diffusers' DiT ControlNets, reduced as their main transformers are: each is built from its main model's
blocks, so its adapter is the main model's with the ControlNet's own call layout (where its forward takes
the ids or shapes the token grid is read from).

A ControlNet's residuals are its blocks' outputs, which tomediff unmerges back to every image token like any
block's: a patched ControlNet still returns full-length residuals, approximated as the main model's own
blocks are (the UNet ``ControlNetModel`` is reduced the same way, by :mod:`diffusers_unet`). Patch it on its
own, beside the pipeline: ``tomediff.apply_tome(pipe)`` patches ``pipe.transformer`` only, and
``tomediff.apply_tome(pipe.controlnet)`` the ControlNet, each with its own handle.
"""

from __future__ import annotations

from torch import nn

from tomediff.adapters.base import register_adapter
from tomediff.adapters.diffusers_image import HunyuanDiTAdapter, SanaAdapter
from tomediff.adapters.diffusers_mmdit import FluxAdapter, QwenImageAdapter, SD3Adapter
from tomediff.core import BlockSpec
from tomediff.errors import UnsupportedModelError

__all__ = [
    "FluxControlNetAdapter",
    "HunyuanDiTControlNetAdapter",
    "QwenImageControlNetAdapter",
    "SD3ControlNetAdapter",
    "SanaControlNetAdapter",
]


@register_adapter
class FluxControlNetAdapter(FluxAdapter):
    """Flux.1 ControlNets (``FluxControlNetModel``, also the Union ControlNet): its
    ``FluxTransformerBlock``s and ``FluxSingleTransformerBlock``s reduced as :class:`FluxAdapter` reduces
    the transformer's; its forward takes ``img_ids`` eighth (after ``controlnet_cond``, ``controlnet_mode``
    and ``conditioning_scale``). The Union ControlNet's mode token joins the text, which is never
    reduced."""

    name = "diffusers-flux-controlnet"
    models = frozenset({"FluxControlNetModel"})
    ids_position = 7


@register_adapter
class SD3ControlNetAdapter(SD3Adapter):
    """SD3 / SD3.5 ControlNets (``SD3ControlNetModel``): its ``JointTransformerBlock``s reduced as
    :class:`SD3Adapter` reduces the transformer's, on the grid of its ``[B, C, H, W]`` latent input."""

    name = "diffusers-sd3-controlnet"
    models = frozenset({"SD3ControlNetModel"})

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        if getattr(model, "pos_embed", None) is None:
            # SD3.5's 8B ControlNets are built without pos_embed (the pipeline patchifies the latent with
            # the transformer's): their input is already [B, N, C] tokens, with no grid to read.
            raise UnsupportedModelError(
                "tomediff does not reduce tokens in this SD3ControlNetModel yet: it was built without "
                "pos_embed (SD3.5's 8B ControlNets, with SD3SingleTransformerBlocks), so it is called "
                "with patchified [B, N, C] tokens whose grid its call does not tell. Patch the main "
                "transformer (tomediff.apply_tome(pipe)) and leave this ControlNet whole."
            )
        return super().block_specs(model)


@register_adapter
class QwenImageControlNetAdapter(QwenImageAdapter):
    """Qwen-Image ControlNets (``QwenImageControlNetModel``): its ``QwenImageTransformerBlock``s reduced as
    :class:`QwenImageAdapter` reduces the transformer's; its forward takes ``img_shapes`` seventh (after
    ``controlnet_cond`` and ``conditioning_scale``)."""

    name = "diffusers-qwenimage-controlnet"
    models = frozenset({"QwenImageControlNetModel"})
    shapes_position = 6


@register_adapter
class SanaControlNetAdapter(SanaAdapter):
    """Sana ControlNets (``SanaControlNetModel``): its ``SanaTransformerBlock``s reduced as
    :class:`SanaAdapter` reduces the transformer's, on the grid of its ``[B, C, H, W]`` latent input."""

    name = "diffusers-sana-controlnet"
    models = frozenset({"SanaControlNetModel"})


@register_adapter
class HunyuanDiTControlNetAdapter(HunyuanDiTAdapter):
    """HunyuanDiT ControlNets (``HunyuanDiT2DControlNetModel``): its ``HunyuanDiTBlock``s reduced as
    :class:`HunyuanDiTAdapter` reduces the transformer's, on the grid of its ``[B, C, H, W]`` latent
    input."""

    name = "diffusers-hunyuandit-controlnet"
    models = frozenset({"HunyuanDiT2DControlNetModel"})
