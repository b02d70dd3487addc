"""diffusers' image diffusion transformers: CogView4 and AuraFlow (attention-call sites), Sana
(block-level sites only), and the families tomediff refuses, each with the reason (a clear
``UnsupportedModelError`` instead of the generic one)."""

from __future__ import annotations

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter
from tomediff.adapters.call_sites import BlockStack, CallSiteAdapter
from tomediff.core import BlockSpec, GridSource, Site
from tomediff.errors import UnsupportedModelError

__all__ = ["AuraFlowAdapter", "CogView4Adapter", "RefusedFamilyAdapter", "SanaAdapter"]


@register_adapter
class SanaAdapter(Adapter):
    """Sana (``SanaTransformer2DModel``): the linear self-attention ``attn1`` of every
    ``SanaTransformerBlock`` at block level (merging: its tokens merged and the output copied back;
    ``method="downsample"``: keys/values from the downsampled grid, passed as its context), and the
    cross-attention's queries (``merge_crossattn``). Sana's attention is linear (no softmax, no SDPA
    call), so the attention-call site and ``kv_ratio`` do not apply; its feed-forward (``GLUMBConv``)
    convolves the token grid and is never merged."""

    name = "diffusers-sana"
    priority = 30

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, {"SanaTransformer2DModel"}) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        patch_size = int(getattr(model.config, "patch_size", 1) or 1)  # type: ignore[attr-defined]
        grid = GridSource(model, patch_size=patch_size)
        specs = []
        for index, block in enumerate(model.transformer_blocks):
            if not class_name_in(block, {"SanaTransformerBlock"}):
                continue
            sites = [Site(block.attn1, "attn")]
            if isinstance(getattr(block, "attn2", None), nn.Module):
                sites.append(Site(block.attn2, "crossattn"))
            specs.append(BlockSpec(f"transformer_blocks.{index}", block, 1, grid, tuple(sites)))
        return specs


def _patch_grid(model: nn.Module) -> GridSource:
    return GridSource(model, patch_size=int(model.config.patch_size))  # type: ignore[attr-defined]


@register_adapter
class CogView4Adapter(CallSiteAdapter):
    """CogView4 (``CogView4Transformer2DModel``): the joint attention ``attn1`` of every
    ``CogView4TransformerBlock`` at its call, after the rotary embedding, over ``[text, image]``. Its
    ``ff`` runs on the image and on the text in two calls and is not reduced."""

    name = "diffusers-cogview4"
    models = frozenset({"CogView4Transformer2DModel"})
    stacks = (BlockStack("transformer_blocks", frozenset({"CogView4TransformerBlock"}), attn="attn1"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class AuraFlowAdapter(CallSiteAdapter):
    """AuraFlow (``AuraFlowTransformer2DModel``): the joint attention of the MMDiT blocks (``[registers
    and text, image]``) and of the single DiT blocks (whose input is already ``[registers and text,
    image]``) at its call; the MMDiT blocks' image ``ff`` at block level (``merge_mlp``)."""

    name = "diffusers-auraflow"
    models = frozenset({"AuraFlowTransformer2DModel"})
    stacks = (
        BlockStack(
            "joint_transformer_blocks", frozenset({"AuraFlowJointTransformerBlock"}), attn="attn", mlp="ff"
        ),
        BlockStack(
            "single_transformer_blocks",
            frozenset({"AuraFlowSingleTransformerBlock"}),
            attn="attn",
            image_last=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


# Families with an image or video grid that tomediff does not reduce yet, and why.
_REFUSED = {
    "ZImageTransformer2DModel": (
        "Z-Image packs a list of images of different sizes and their captions into one padded sequence, "
        "so the image tokens' place in the attention differs per sample"
    ),
    "Lumina2Transformer2DModel": (
        "Lumina2's joint layers place each sample's image tokens after its own caption length (padded "
        "per sample), so their place in the attention differs per sample"
    ),
    "HiDreamImageTransformer2DModel": (
        "HiDream's blocks append a different Llama layer's tokens in every block and route the image "
        "feed-forward through a mixture of experts; its attention-call layout is not described yet"
    ),
    "SanaVideoTransformer3DModel": (
        "Sana-Video's linear self-attention has no softmax attention call to reduce at, and merging its "
        "tokens at block level would have to reduce its 3-D rotary table ([1, N, 1, D]: tokens on axis 1) "
        "with them, which is not implemented yet"
    ),
    "HeliosTransformer3DModel": (
        "Helios prepends history tokens (earlier frames, at several resolutions) to the video tokens of "
        "every block, so the video tokens are not one grid"
    ),
    "HunyuanVideoFramepackTransformer3DModel": (
        "HunyuanVideo-Framepack prepends history tokens (clean, 2x and 4x downsampled latents) to the video "
        "tokens, so the attention sequence is [history, video, text] and its video tokens are not one grid"
    ),
    "AnyFlowFARTransformer3DModel": (
        "AnyFlow-FAR generates frame by frame with causal attention (a block mask and a cache of earlier "
        "frames' keys/values), so a call's keys are not its own video grid"
    ),
    "WanAnimate2Transformer3DModel": (
        "Wan-Animate-2 attends through a flex-attention block mask over packed [generation | cached "
        "reference] buffers (flex backend only), with no scaled-dot-product attention call to reduce at"
    ),
    "MiniMaxH3Transformer3DModel": (
        "MiniMax-H3 packs video, text and audio rows into one sequence in an order its caller chooses "
        "(scattered by index), so the video rows are not one grid at a known place"
    ),
    # Audio and other 1-D models: their tokens are a sequence in time, with no image or video grid.
    "StableAudioDiTModel": "Stable Audio is an audio model: its tokens have no image or video grid",
    "StableAudio3DiTModel": "Stable Audio 3 is an audio model: its tokens have no image or video grid",
    "AceStepTransformer1DModel": "ACE-Step is an audio (music) model: its tokens have no image or video grid",
    "MiniMaxMusic3Transformer1DModel": (
        "MiniMax Music 3 is an audio (music) model: its tokens have no image or video grid"
    ),
    "LongCatAudioDiTTransformer": "LongCat-Audio is an audio model: its tokens have no image or video grid",
}


@register_adapter
class RefusedFamilyAdapter(Adapter):
    """Matches the families of ``_REFUSED`` and refuses them with their reason."""

    name = "diffusers-refused"
    priority = 25

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, set(_REFUSED))

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        name = next(k.__name__ for k in type(model).__mro__ if k.__name__ in _REFUSED)
        raise UnsupportedModelError(
            f"tomediff does not reduce tokens in {name} yet: {_REFUSED[name]}. Supported diffusion "
            "transformers: SD3, Flux.1, Flux.2, Chroma, Bria, LongCat-Image, Ovis-Image, Qwen-Image, "
            "CogView4, AuraFlow, Sana, PixArt, DiT, Wan 2.x, HunyuanVideo 1.0/1.5, CogVideoX, LTX-Video, "
            "Allegro, Cosmos, LTX-2, Kandinsky 5, Mochi, EasyAnimate, ConsisID, ChronoEdit, Wan-Animate, "
            "MotifVideo, AnyFlow, Kandinsky 6 "
            "(see docs/dits.md)."
        )
