"""diffusers' video diffusion transformers: Wan 2.1/2.2 (and ChronoEdit, Wan-Animate), HunyuanVideo,
CogVideoX (and ConsisID), LTX-Video, LTX-2, Kandinsky 5/6, EasyAnimate, Mochi, MotifVideo, AnyFlow,
Allegro and Cosmos.

Their blocks see a video latent ``[B, C, F, H, W]`` patchified by ``patch_size = (pt, ph, pw)`` into
``F/pt × H/ph × W/pw`` tokens, frame after frame, and apply a 3-D rotary embedding inside the attention
processor. Token reduction therefore acts at the self-attention's call (``"call"`` sites, after the
rotary embedding): with merging, queries and keys/values merged (or, with ``kv_ratio``, apart); with
``method="downsample"``, keys/values from the grid downsampled in space (and in time by
``downsample_factor_time``). The cross-attention's queries (``merge_crossattn``) and the feed-forward
(``merge_mlp``) can be merged at block level, as in UNets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter
from tomediff.adapters.call_sites import BlockStack, CallSiteAdapter, call_site_specs
from tomediff.adapters.diffusers_caches import ReplayedOutputCheck
from tomediff.core import BlockSpec, GridSource, Site
from tomediff.core.spec import KeywordGrid, VideoGrid

__all__ = [
    "AllegroAdapter",
    "AnyFlowAdapter",
    "CogVideoXAdapter",
    "ConsisIDAdapter",
    "CosmosAdapter",
    "EasyAnimateAdapter",
    "HunyuanVideo15Adapter",
    "HunyuanVideoAdapter",
    "Kandinsky5Adapter",
    "Kandinsky6Adapter",
    "LTX2VideoAdapter",
    "LTXVideoAdapter",
    "MochiAdapter",
    "MotifVideoAdapter",
    "WanAdapter",
    "call_site_specs",
]


def _patch_size(model: nn.Module) -> tuple[int, int, int]:
    patch = getattr(getattr(model, "config", None), "patch_size", None) or (1, 1, 1)
    pt, ph, pw = (int(p) for p in patch)
    return pt, ph, pw


# Wan and the models built from its blocks.
_WAN_MODELS = {
    "WanTransformer3DModel",
    "WanVACETransformer3DModel",
    "SkyReelsV2Transformer3DModel",
    "ChronoEditTransformer3DModel",
    "WanAnimateTransformer3DModel",
}
_WAN_BLOCKS = {"WanTransformerBlock", "SkyReelsV2TransformerBlock"}


def _wan_sites(block: nn.Module, name: str) -> tuple[Site, ...]:
    """A Wan block's sites: the self-attention (video tokens only) at its call, the cross-attention's
    queries and the feed-forward at block level (refused where a diffusers cache keeps their output)."""
    attn1, attn2, ffn = (cast(nn.Module, getattr(block, attr)) for attr in ("attn1", "attn2", "ffn"))
    return (
        Site(attn1, "attn", role="call"),
        Site(attn2, "crossattn", conflict=ReplayedOutputCheck(attn2, f"{name}.attn2")),
        Site(ffn, "mlp", conflict=ReplayedOutputCheck(ffn, f"{name}.ffn")),
    )


@register_adapter
class WanAdapter(Adapter):
    """Wan 2.1/2.2 (text- and image-to-video; ``WanTransformerBlock``), Wan VACE (also its control
    ``vace_blocks``), SkyReels-V2 (``SkyReelsV2TransformerBlock``; its block-causal mask follows the
    keys), ChronoEdit and Wan-Animate (Wan blocks on the Wan grid; Wan-Animate's pose latents are added
    to the video tokens, its face adapter between blocks is left alone): the self-attention ``attn1`` at
    its attention call (``merge_attn``), the cross-attention ``attn2``'s queries (``merge_crossattn``) and
    the feed-forward ``ffn`` (``merge_mlp``). The text (and I2V image-encoder) tokens are keys/values of
    the cross-attention only and are never reduced."""

    name = "diffusers-wan"
    priority = 30

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, _WAN_MODELS) and hasattr(model, "blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        grid = VideoGrid(model, video_patch=_patch_size(model))
        specs = []
        for index, block in enumerate(cast(nn.ModuleList, model.blocks)):
            if not class_name_in(block, _WAN_BLOCKS):
                continue
            specs.append(BlockSpec(f"blocks.{index}", block, 1, grid, _wan_sites(block, f"blocks.{index}")))
        # VACE's control blocks attend over the control tokens, on the same grid; their plan is made
        # from the main stream they receive first.
        for index, block in enumerate(getattr(model, "vace_blocks", ())):
            if class_name_in(block, {"WanVACETransformerBlock"}):
                name = f"vace_blocks.{index}"
                specs.append(BlockSpec(name, block, 1, grid, _wan_sites(block, name)))
        return specs


def _config_video_grid(model: nn.Module) -> VideoGrid:
    """The grid of a model whose config gives ``patch_size`` (space) and ``patch_size_t`` (time)."""
    config: Any = model.config
    p, pt = int(config.patch_size), int(config.patch_size_t)
    return VideoGrid(model, video_patch=(pt, p, p))


def _blocks(attr: str, *block_classes: str, **fields: Any) -> BlockStack:
    """The block list ``attr`` of blocks of one of ``block_classes``, reduced at the attention call."""
    return BlockStack(attr, frozenset(block_classes), **fields)


@register_adapter
class HunyuanVideoAdapter(CallSiteAdapter):
    """HunyuanVideo (``HunyuanVideoTransformer3DModel``, T2V and its token-replace I2V blocks): the joint
    attention of the double- and single-stream blocks at its call, after the rotary embedding, over
    ``[video, text]`` (the text padding mask keeps its text columns); the double-stream video feed-forward
    ``ff`` at block level (``merge_mlp``). Grid from the ``[B, C, F, H, W]`` latent and the patch sizes."""

    name = "diffusers-hunyuanvideo"
    models = frozenset({"HunyuanVideoTransformer3DModel"})
    stacks = (
        _blocks(
            "transformer_blocks",
            "HunyuanVideoTransformerBlock",
            "HunyuanVideoTokenReplaceTransformerBlock",
            attn="attn",
            mlp="ff",
            image_first=True,
        ),
        _blocks(
            "single_transformer_blocks",
            "HunyuanVideoSingleTransformerBlock",
            "HunyuanVideoTokenReplaceSingleTransformerBlock",
            attn="attn",
            image_first=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _config_video_grid(model)


@register_adapter
class HunyuanVideo15Adapter(CallSiteAdapter):
    """HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): the joint attention of every
    ``HunyuanVideo15TransformerBlock`` at its call, after the rotary embedding, over ``[video, text]``
    (its reordered text padding mask keeps its text columns); the video ``ff`` at block level
    (``merge_mlp``). Grid from the ``[B, C, F, H, W]`` latent and the patch sizes."""

    name = "diffusers-hunyuanvideo15"
    models = frozenset({"HunyuanVideo15Transformer3DModel"})
    stacks = (
        _blocks(
            "transformer_blocks", "HunyuanVideo15TransformerBlock", attn="attn", mlp="ff", image_first=True
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _config_video_grid(model)


@register_adapter
class CogVideoXAdapter(CallSiteAdapter):
    """CogVideoX 1.0/1.5 (``CogVideoXTransformer3DModel``): the joint attention ``attn1`` of every
    ``CogVideoXBlock`` at its call, after the rotary embedding, over ``[text, video]``; the feed-forward
    ``ff`` is shared by text and video tokens and is not reduced. Grid from the ``[B, F, C, H, W]``
    latent and the patch sizes (``patch_size_t`` for 1.5)."""

    name = "diffusers-cogvideox"
    models = frozenset({"CogVideoXTransformer3DModel"})
    stacks = (_blocks("transformer_blocks", "CogVideoXBlock", attn="attn1"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        config: Any = model.config
        p, pt = int(config.patch_size), int(config.patch_size_t or 1)
        return VideoGrid(model, video_patch=(pt, p, p), frames_axis=1)


@register_adapter
class LTXVideoAdapter(CallSiteAdapter):
    """LTX-Video (``LTXVideoTransformer3DModel``): the self-attention ``attn1`` of every
    ``LTXVideoTransformerBlock`` at its call, after the rotary embedding (video tokens only); the
    cross-attention's queries (``merge_crossattn``) and the feed-forward ``ff`` (``merge_mlp``) at block
    level. Grid from the call's ``num_frames``, ``height``, ``width`` (latent tokens)."""

    name = "diffusers-ltxvideo"
    models = frozenset({"LTXVideoTransformer3DModel"})
    stacks = (
        _blocks("transformer_blocks", "LTXVideoTransformerBlock", attn="attn1", crossattn="attn2", mlp="ff"),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return KeywordGrid(model)


@register_adapter
class AllegroAdapter(CallSiteAdapter):
    """Allegro (``AllegroTransformer3DModel``): the self-attention ``attn1`` of every
    ``AllegroTransformerBlock`` at its call, after the rotary embedding (video tokens only; its mask
    follows the keys); the cross-attention's queries (``merge_crossattn``) and ``ff`` (``merge_mlp``) at
    block level. Grid from the ``[B, C, F, H, W]`` latent and the patch sizes."""

    name = "diffusers-allegro"
    models = frozenset({"AllegroTransformer3DModel"})
    stacks = (
        _blocks("transformer_blocks", "AllegroTransformerBlock", attn="attn1", crossattn="attn2", mlp="ff"),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _config_video_grid(model)


@register_adapter
class CosmosAdapter(CallSiteAdapter):
    """Cosmos (``CosmosTransformer3DModel``, Cosmos-Predict2): the self-attention ``attn1`` of every
    ``CosmosTransformerBlock`` at its call, after the rotary embedding (video tokens only); the
    cross-attention's queries (``merge_crossattn``) and ``ff`` (``merge_mlp``) at block level. Grid from
    the ``[B, C, F, H, W]`` latent and ``patch_size``."""

    name = "diffusers-cosmos"
    models = frozenset({"CosmosTransformer3DModel"})
    stacks = (
        _blocks("transformer_blocks", "CosmosTransformerBlock", attn="attn1", crossattn="attn2", mlp="ff"),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return VideoGrid(model, video_patch=_patch_size(model))


@register_adapter
class ConsisIDAdapter(CallSiteAdapter):
    """ConsisID (``ConsisIDTransformer3DModel``, CogVideoX with identity conditioning): the joint attention
    ``attn1`` of every ``ConsisIDBlock`` at its call, after the rotary embedding, over ``[text, video]``;
    its face cross-attention between blocks is left alone. Grid from the ``[B, F, C, H, W]`` latent and
    ``patch_size``."""

    name = "diffusers-consisid"
    models = frozenset({"ConsisIDTransformer3DModel"})
    stacks = (_blocks("transformer_blocks", "ConsisIDBlock", attn="attn1"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        p = int(cast(Any, model.config).patch_size)
        return VideoGrid(model, video_patch=(1, p, p), frames_axis=1)


@register_adapter
class EasyAnimateAdapter(CallSiteAdapter):
    """EasyAnimate (``EasyAnimateTransformer3DModel``): the joint attention ``attn1`` of every
    ``EasyAnimateTransformerBlock`` at its call, after the rotary embedding, over ``[text, video]``. Its
    ``ff`` also runs on the text in blocks without a text feed-forward and is not reduced. Grid from the
    ``[B, C, F, H, W]`` latent and ``patch_size`` (inpaint/control latents are stacked on channels)."""

    name = "diffusers-easyanimate"
    models = frozenset({"EasyAnimateTransformer3DModel"})
    stacks = (_blocks("transformer_blocks", "EasyAnimateTransformerBlock", attn="attn1"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        p = int(cast(Any, model.config).patch_size)
        return VideoGrid(model, video_patch=(1, p, p))


@register_adapter
class LTX2VideoAdapter(CallSiteAdapter):
    """LTX-2 (``LTX2VideoTransformer3DModel``, audio and video): the video self-attention ``attn1`` of
    every ``LTX2VideoTransformerBlock`` at its call, after the rotary embedding; the video
    cross-attention's queries (``merge_crossattn``) and the video feed-forward ``ff`` (``merge_mlp``) at
    block level. The audio stream (its self-attention, cross-attentions and feed-forward) and the
    audio-video cross-attentions are left alone. Grid from the call's ``num_frames``, ``height``,
    ``width`` (latent tokens)."""

    name = "diffusers-ltx2"
    models = frozenset({"LTX2VideoTransformer3DModel"})
    stacks = (
        _blocks("transformer_blocks", "LTX2VideoTransformerBlock", attn="attn1", crossattn="attn2", mlp="ff"),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return KeywordGrid(model, positions=(10, 11, 12))


@dataclass(frozen=True, eq=False)
class _Kandinsky5Grid(VideoGrid):
    """Kandinsky 5's ``[B, F, H, W, C]`` latent; no grid (the blocks then refuse the call) when
    ``sparse_params`` reorder the tokens in 8 × 8 tiles for its sparse attention."""

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:  # type: ignore[override]
        sparse = args[7] if len(args) > 7 else kwargs.get("sparse_params")
        return None if sparse is not None else super().read(args, kwargs)


@register_adapter
class Kandinsky5Adapter(CallSiteAdapter):
    """Kandinsky 5 (``Kandinsky5Transformer3DModel``, video and image): the self-attention of every
    ``Kandinsky5TransformerDecoderBlock`` (video tokens only) at its call, after the rotary embedding;
    its cross-attention's queries (``merge_crossattn``) and feed-forward (``merge_mlp``) at block level.
    The text encoder blocks are left alone. Grid from the ``[B, F, H, W, C]`` latent and
    ``patch_size``; calls with ``sparse_params`` (tokens in sparse-attention tile order) are refused."""

    name = "diffusers-kandinsky5"
    models = frozenset({"Kandinsky5Transformer3DModel"})
    stacks = (
        _blocks(
            "visual_transformer_blocks",
            "Kandinsky5TransformerDecoderBlock",
            attn="self_attention",
            crossattn="cross_attention",
            mlp="feed_forward",
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _Kandinsky5Grid(model, video_patch=_patch_size(model), frames_axis=1, spatial_axes=(2, 3))


@register_adapter
class MochiAdapter(CallSiteAdapter):
    """Mochi (``MochiTransformer3DModel``): the asymmetric joint attention ``attn1`` of every
    ``MochiTransformerBlock`` at its call, after the rotary embedding, over ``[video, the sample's
    unpadded text]``: Mochi calls attention once per sample, and each call gets its sample's plan; the
    video feed-forward ``ff`` at block level (``merge_mlp``). Grid from the ``[B, C, F, H, W]`` latent
    and ``patch_size``."""

    name = "diffusers-mochi"
    models = frozenset({"MochiTransformer3DModel"})
    stacks = (
        _blocks(
            "transformer_blocks",
            "MochiTransformerBlock",
            attn="attn1",
            mlp="ff",
            image_first=True,
            per_sample=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        p = int(cast(Any, model.config).patch_size)
        return VideoGrid(model, video_patch=(1, p, p))


@register_adapter
class MotifVideoAdapter(CallSiteAdapter):
    """MotifVideo (``MotifVideoTransformer3DModel``): the joint attention ``attn`` of its double- and
    single-stream blocks at its call, after the rotary embedding, over ``[video, text]`` (in the decoder
    layers ``[video, the encoder's video output]``: only the first, the block's own, are reduced); the
    double-stream video feed-forward ``ff`` at block level (``merge_mlp``). Grid from the
    ``[B, C, F, H, W]`` latent and the patch sizes."""

    name = "diffusers-motifvideo"
    models = frozenset({"MotifVideoTransformer3DModel"})
    stacks = (
        _blocks("transformer_blocks", "MotifVideoTransformerBlock", attn="attn", mlp="ff", image_first=True),
        _blocks(
            "single_transformer_blocks", "MotifVideoSingleTransformerBlock", attn="attn", image_first=True
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _config_video_grid(model)


@register_adapter
class AnyFlowAdapter(CallSiteAdapter):
    """AnyFlow (``AnyFlowTransformer3DModel``, bidirectional; Wan-shaped blocks): the self-attention
    ``attn1`` of every ``AnyFlowTransformerBlock`` at its call, after the rotary embedding; the
    cross-attention's queries (``merge_crossattn``) and ``ffn`` (``merge_mlp``) at block level. Grid from
    the ``[B, F, C, H, W]`` latent and ``patch_size``."""

    name = "diffusers-anyflow"
    models = frozenset({"AnyFlowTransformer3DModel"})
    stacks = (_blocks("blocks", "AnyFlowTransformerBlock", attn="attn1", crossattn="attn2", mlp="ffn"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return VideoGrid(model, video_patch=_patch_size(model), frames_axis=1)


@register_adapter
class Kandinsky6Adapter(CallSiteAdapter):
    """Kandinsky 6 (``Kandinsky6Transformer3DModel``, video with optional audio): in every
    ``Kandinsky6FusedTransformerDecoderBlock``, the video self-attention (``video_dec_block``'s) at its
    call, after the rotary embedding; the video cross-attention's queries (``merge_crossattn``) and the
    video feed-forward (``merge_mlp``) at block level. The audio stream and the audio-video
    cross-attentions are left alone. Grid from the ``[B, F, H, W, C]`` latent and ``patch_size``."""

    name = "diffusers-kandinsky6"
    models = frozenset({"Kandinsky6Transformer3DModel"})
    stacks = (
        _blocks(
            "visual_transformer_blocks",
            "Kandinsky6FusedTransformerDecoderBlock",
            attn="video_dec_block.self_attention",
            crossattn="video_dec_block.cross_attention",
            mlp="video_dec_block.feed_forward",
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return VideoGrid(model, video_patch=_patch_size(model), frames_axis=1, spatial_axes=(2, 3))
