"""diffusers' image diffusion transformers: CogView4 and AuraFlow (attention-call sites), Sana
(block-level sites only), and the families tomediff refuses, each with the reason (a clear
``UnsupportedModelError`` instead of the generic one)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, cast

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter
from tomediff.adapters.call_sites import BlockStack, CallSiteAdapter
from tomediff.adapters.diffusers_caches import ReplayedOutputCheck
from tomediff.core import BlockSpec, GridSource, Site
from tomediff.core.spec import (
    EqualLengthsGrid,
    ItemsVideoGrid,
    LatentListGrid,
    LeadingShapeListGrid,
    MarkedPositionIdsGrid,
    PositionIdsGrid,
    ShapeListGrid,
    TrailingPositionIdsGrid,
    VideoGrid,
)
from tomediff.errors import UnsupportedModelError

__all__ = [
    "AuraFlowAdapter",
    "CogView3PlusAdapter",
    "CogView4Adapter",
    "ErnieImageAdapter",
    "Flux3Adapter",
    "GlmImageAdapter",
    "HiDreamAdapter",
    "HunyuanDiTAdapter",
    "HunyuanImageAdapter",
    "Ideogram4Adapter",
    "JoyImageEditAdapter",
    "JoyImageEditPlusAdapter",
    "Krea2Adapter",
    "Lumina2Adapter",
    "LuminaNextAdapter",
    "NucleusMoEImageAdapter",
    "OmniGenAdapter",
    "PRXAdapter",
    "RefusedFamilyAdapter",
    "SanaAdapter",
    "ZImageAdapter",
]


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
    models: ClassVar[frozenset[str]] = frozenset({"SanaTransformer2DModel"})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, set(cls.models)) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        patch_size = int(getattr(model.config, "patch_size", 1) or 1)
        grid = GridSource(model, patch_size=patch_size)
        specs = []
        for index, block in enumerate(cast(Iterable[Any], model.transformer_blocks)):
            if not class_name_in(block, {"SanaTransformerBlock"}):
                continue
            # Merged at block level (linear attention: no attention call to reduce inside), so refused
            # where a diffusers cache keeps their output.
            name = f"transformer_blocks.{index}"
            sites = [Site(block.attn1, "attn", conflict=ReplayedOutputCheck(block.attn1, f"{name}.attn1"))]
            if isinstance(getattr(block, "attn2", None), nn.Module):
                conflict = ReplayedOutputCheck(block.attn2, f"{name}.attn2")
                sites.append(Site(block.attn2, "crossattn", conflict=conflict))
            specs.append(BlockSpec(f"transformer_blocks.{index}", block, 1, grid, tuple(sites)))
        return specs


def _patch_grid(model: nn.Module) -> GridSource:
    return GridSource(model, patch_size=int(cast(Any, model.config).patch_size))


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


@register_adapter
class CogView3PlusAdapter(CallSiteAdapter):
    """CogView3-Plus (``CogView3PlusTransformer2DModel``): the joint attention ``attn1`` of every
    ``CogView3PlusTransformerBlock`` at its call, after ``[text, image]`` are joined. Its ``ff`` runs on
    text and image together and is not reduced."""

    name = "diffusers-cogview3plus"
    models = frozenset({"CogView3PlusTransformer2DModel"})
    stacks = (BlockStack("transformer_blocks", frozenset({"CogView3PlusTransformerBlock"}), attn="attn1"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class HunyuanDiTAdapter(CallSiteAdapter):
    """HunyuanDiT (``HunyuanDiT2DModel``): the self-attention ``attn1`` of every ``HunyuanDiTBlock`` at its
    call, after the rotary embedding (image tokens only), and the feed-forward ``ff`` at block level
    (``merge_mlp``). The cross-attention ``attn2`` applies the image rotary table to its queries inside
    its processor, so its queries are not merged (``merge_crossattn`` has no site here)."""

    name = "diffusers-hunyuandit"
    models = frozenset({"HunyuanDiT2DModel"})
    stacks = (BlockStack("blocks", frozenset({"HunyuanDiTBlock"}), attn="attn1", mlp="ff"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class HunyuanImageAdapter(CallSiteAdapter):
    """HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): the joint attention of the double- and
    single-stream blocks at its call, after the rotary embedding, over ``[image, text]`` (the text padding
    mask keeps its text columns); the double-stream image ``ff`` at block level (``merge_mlp``). Grid from
    the ``[B, C, H, W]`` (or ``[B, C, F, H, W]``) latent and the patch sizes."""

    name = "diffusers-hunyuanimage"
    models = frozenset({"HunyuanImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "transformer_blocks",
            frozenset({"HunyuanImageTransformerBlock"}),
            attn="attn",
            mlp="ff",
            image_first=True,
        ),
        BlockStack(
            "single_transformer_blocks",
            frozenset({"HunyuanImageSingleTransformerBlock"}),
            attn="attn",
            image_first=True,
            optional=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        patch = tuple(int(p) for p in cast(Any, model.config).patch_size)
        pt, ph, pw = patch if len(patch) == 3 else (1, *patch)
        return VideoGrid(model, video_patch=(pt, ph, pw))


@register_adapter
class ZImageAdapter(CallSiteAdapter):
    """Z-Image (``ZImageTransformer2DModel``, Turbo and Base): the attention of the main ``layers``
    (``[image, image padding, caption]`` per sample) and of the image-only ``noise_refiner`` blocks
    (``[image, padding]``) at its call, after the rotary embedding. Every sample's image tokens come first,
    so one layout serves a batch whose latents share a shape, whatever its captions' lengths; the padding
    to a multiple of 32 tokens and the captions are never reduced. Its feed-forwards see the captions too
    and are not reduced. Omni calls (several images per sample) and latents of different shapes in one
    call are refused as an unknown grid. Its timestep is ``1 - t / 1000``: it rises during a generation."""

    name = "diffusers-zimage"
    timestep_scale = 1.0
    timestep_rises = True
    models = frozenset({"ZImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "layers",
            frozenset({"ZImageTransformerBlock"}),
            attn="attention",
            image_first=True,
            image_leads=True,
        ),
        BlockStack(
            "noise_refiner",
            frozenset({"ZImageTransformerBlock"}),
            attn="attention",
            image_first=True,
            image_leads=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return LatentListGrid(model)


@register_adapter
class Lumina2Adapter(CallSiteAdapter):
    """Lumina-Image 2.0 (``Lumina2Transformer2DModel``): the attention of the joint ``layers`` (``[caption,
    image]``) and of the image-only ``noise_refiner`` blocks at its call, after the rotary embedding; the
    captions are never reduced. Each sample's image follows its own caption, so a call is reduced when its
    samples' captions share one length (as in diffusers' pipeline, which runs the conditional and the
    unconditional prompt as two calls) and refused otherwise. Its timestep is ``1 - t / 1000``: it rises
    during a generation."""

    name = "diffusers-lumina2"
    timestep_scale = 1.0
    timestep_rises = True
    models = frozenset({"Lumina2Transformer2DModel"})
    stacks = (
        BlockStack("layers", frozenset({"Lumina2TransformerBlock"}), attn="attn", image_last=True),
        BlockStack("noise_refiner", frozenset({"Lumina2TransformerBlock"}), attn="attn"),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return EqualLengthsGrid(model, patch_size=int(cast(Any, model.config).patch_size))


@register_adapter
class HiDreamAdapter(CallSiteAdapter):
    """HiDream-I1 (``HiDreamImageTransformer2DModel``): the attention of the double-stream blocks
    (``[image, text]``, the text being the T5/Llama tokens of that block) and of the single-stream blocks
    (``[image, text, this block's Llama tokens]``) at its call, after the rotary embedding; the text and
    the padding of a non-square image (to the model's ``max_resolution``) are never reduced. The image
    feed-forwards (a mixture of experts) are not reduced."""

    name = "diffusers-hidream"
    models = frozenset({"HiDreamImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "double_stream_blocks",
            frozenset({"HiDreamImageTransformerBlock"}),
            attn="attn1",
            image_first=True,
            image_leads=True,
            inner="block",
        ),
        BlockStack(
            "single_stream_blocks",
            frozenset({"HiDreamImageSingleTransformerBlock"}),
            attn="attn1",
            image_first=True,
            image_leads=True,
            inner="block",
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class Krea2Adapter(CallSiteAdapter):
    """Krea 2 (``Krea2Transformer2DModel``): the attention of every single-stream
    ``Krea2TransformerBlock`` (``[text, image]``) at its call, after the rotary embedding; the text is
    never reduced. Grid from the image rows of ``position_ids``."""

    name = "diffusers-krea2"
    timestep_scale = 1.0
    models = frozenset({"Krea2Transformer2DModel"})
    stacks = (
        BlockStack("transformer_blocks", frozenset({"Krea2TransformerBlock"}), attn="attn", image_last=True),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return TrailingPositionIdsGrid(model, input_names=("position_ids",), position=3)


@register_adapter
class ErnieImageAdapter(CallSiteAdapter):
    """ERNIE-Image (``ErnieImageTransformer2DModel``): the attention of every
    ``ErnieImageSharedAdaLNBlock`` (``[image, text]``; its blocks take sequence-first hidden states) at
    its call, after the rotary embedding; the text is never reduced."""

    name = "diffusers-ernieimage"
    models = frozenset({"ErnieImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "layers",
            frozenset({"ErnieImageSharedAdaLNBlock"}),
            attn="self_attention",
            image_first=True,
            image_leads=True,
            sequence_first=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class PRXAdapter(CallSiteAdapter):
    """PRX (``PRXTransformer2DModel``): the attention of every ``PRXBlock`` at its call, after the rotary
    embedding: its queries are the image tokens, its keys/values ``[text, image]``; the text keys/values
    and their mask columns are never reduced."""

    name = "diffusers-prx"
    timestep_scale = 1.0
    models = frozenset({"PRXTransformer2DModel"})
    stacks = (BlockStack("blocks", frozenset({"PRXBlock"}), attn="attention", extra_keys=True),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class Flux3Adapter(CallSiteAdapter):
    """Flux 3 (``Flux3Transformer2DModel``): the self-attention of the image's own blocks
    (``mode_blocks.image``, image tokens only) and the joint attention of the single-stream blocks
    (``[text, image]``) at its call, after the rotary embedding; the image blocks' parallel feed-forward
    ``ff`` at block level (``merge_mlp``). The text is never reduced. Grid from ``img_ids``.

    Reference images (``image_cond_hidden_states``, their ids ``image_cond_ids`` given apart, each image
    with its own last id column ``l``: -1, -2, ...) run through blocks of their own, left whole, then join
    the single-stream blocks after the generated image: there each image is reduced on its own grid, the
    references at ``reference_ratio``."""

    name = "diffusers-flux3"
    timestep_scale = 1.0
    models = frozenset({"Flux3Transformer2DModel"})
    stacks = (
        BlockStack("mode_blocks.image", frozenset({"Flux3ModeTransformerBlock"}), attn="attn", mlp="ff"),
        BlockStack("single_transformer_blocks", frozenset({"Flux3SingleTransformerBlock"}), attn="attn"),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        """The generated image's grid, which its own blocks (``mode_blocks.image``) see."""
        return PositionIdsGrid(model, position=3)

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        image_blocks, single_blocks = cls.stacks
        # The single-stream blocks see the generated image's tokens, then the reference images'.
        with_references = PositionIdsGrid(
            model, position=3, group_axis=3, appended_ids=(("image_cond_ids", 6),)
        )
        return image_blocks.specs(model, cls.grid(model)) + single_blocks.specs(model, with_references)


@register_adapter
class GlmImageAdapter(CallSiteAdapter):
    """GLM-Image (``GlmImageTransformer2DModel``): the joint attention ``attn1`` of every
    ``GlmImageTransformerBlock`` at its call, after the rotary embedding, over ``[text, image]`` (with an
    image-edit KV cache being read: ``[cached condition tokens, text, image]`` keys, which stay whole). Its
    ``ff`` runs on text and image together and is not reduced."""

    name = "diffusers-glmimage"
    models = frozenset({"GlmImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "transformer_blocks", frozenset({"GlmImageTransformerBlock"}), attn="attn1", extra_keys=True
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class LuminaNextAdapter(CallSiteAdapter):
    """Lumina-Next (``LuminaNextDiT2DModel``): the self-attention ``attn1`` of every ``LuminaNextDiTBlock``
    at its call, after the rotary embedding (image tokens only); the cross-attention ``attn2`` and the
    feed-forward are not reduced. Its timestep is ``1 - t / 1000``: it rises during a generation."""

    name = "diffusers-luminanext"
    timestep_scale = 1.0
    timestep_rises = True
    models = frozenset({"LuminaNextDiT2DModel"})
    stacks = (BlockStack("layers", frozenset({"LuminaNextDiTBlock"}), attn="attn1"),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


@register_adapter
class OmniGenAdapter(CallSiteAdapter):
    """OmniGen (``OmniGenTransformer2DModel``): the attention of every ``OmniGenBlock`` at its call, after
    the rotary embedding, over ``[instruction tokens (text and input images), time token, image]``; the
    instruction and time tokens are never reduced, and the attention mask's rows and columns follow the
    image tokens. Its ``mlp`` runs on the whole sequence and is not reduced."""

    name = "diffusers-omnigen"
    models = frozenset({"OmniGenTransformer2DModel"})
    stacks = (BlockStack("layers", frozenset({"OmniGenBlock"}), attn="self_attn", image_last=True),)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return _patch_grid(model)


# Families with an image or video grid that tomediff does not reduce yet, and why.
_REFUSED = {
    "QwenImage21Transformer2DModel": (
        "Qwen-Image 2.1 runs its block-causal prefill as one attention call per prefix segment (text and "
        "condition images) plus one for the target image, placed by the vision-language template; that "
        "attention-call layout is not described yet"
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
    "BriaFibo2Transformer2DModel": (
        "Bria FIBO 2 places the image tokens of its main blocks after its gist tokens, whose count follows "
        "the prompt's length, or before them when a batch's prompts give different counts, with edit context "
        "tokens after the image: where the image tokens sit is decided by each call, and that layout is not "
        "described yet"
    ),
    "Kandinsky6SRTransformer3DModel": (
        "Kandinsky 6 SR is a video super-resolution model whose self-attention always runs NABLA sparse "
        "attention on the flex backend (a block mask over local token blocks), with no scaled-dot-product "
        "attention call to reduce at"
    ),
    "LTX2VideoDiffusionDecoderModel": (
        "the LTX-2 diffusion decoder is a VAE decoder (latents to pixels) whose attention is neighborhood "
        "attention over local windows (flex block mask or NATTEN), not a generation grid's attention; patch "
        "the pipeline's transformer instead"
    ),
    "SanaWMTransformer3DModel": (
        "SANA-WM runs a gated delta-net linear recurrence (no softmax attention call) in three blocks of "
        "every four, and its softmax blocks apply per-token camera (UCPE) transforms to their keys and "
        "values; reducing only those blocks is not implemented"
    ),
    "SanaWMLTX2RefinerTransformer3DModel": (
        "the SANA-WM refiner denoises a few latent frames at a time (chunk-causal) while attending to a "
        "cache of earlier frames' keys/values, so a call's keys are not its own video grid"
    ),
    # Several ControlNets in one wrapper: each is a model of its own, patched with its own handle.
    **{
        name: (
            f"it holds several {label} ControlNets (in .nets), each a model of its own with its own patch; "
            "patch each of them: for net in pipe.controlnet.nets: tomediff.apply_tome(net)"
        )
        for name, label in (
            ("FluxMultiControlNetModel", "Flux"),
            ("SD3MultiControlNetModel", "SD3"),
            ("QwenImageMultiControlNetModel", "Qwen-Image"),
            ("HunyuanDiT2DMultiControlNetModel", "HunyuanDiT"),
        )
    },
    "ZImageControlNetModel": (
        "the Z-Image ControlNet's ZImageControlTransformerBlocks are a block class of their own, called with "
        "the control stream and the main model's unified token list together and returning stacked "
        "residuals; the Z-Image adapter does not describe that block yet (patch the main transformer)"
    ),
    "CosmosControlNetModel": (
        "the Cosmos ControlNet's blocks are called with the base model's latent tokens beside their own "
        "(latents=) and return a control projection apart from their output; the Cosmos adapter does not "
        "describe that block call yet (patch the main transformer)"
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
            f"tomediff does not reduce tokens in {name}: {_REFUSED[name]}. Supported diffusion "
            "transformers: SD3, Flux.1, Flux.2, Flux 3, Chroma, Bria, Bria FIBO, LongCat-Image, Ovis-Image, "
            "Qwen-Image, Z-Image, HiDream, HunyuanDiT, HunyuanImage 2.1, Lumina2, Lumina-Next, "
            "CogView3-Plus, CogView4, GLM-Image, Krea 2, ERNIE-Image, PRX, OmniGen, Ideogram 4, "
            "JoyImage-Edit (and Plus), NucleusMoE-Image, AuraFlow, Sana, PixArt, DiT, DreamLite, "
            "Wan 2.x (and VACE, ChronoEdit, Wan-Animate), SkyReels-V2, HunyuanVideo 1.0/1.5, CogVideoX, "
            "ConsisID, LTX-Video, LTX-2, Kandinsky 5/6, Mochi, EasyAnimate, MotifVideo, AnyFlow, Allegro, "
            "Cosmos, and the ControlNets of Flux.1, SD3, Qwen-Image, Sana and HunyuanDiT (see docs/dits.md)."
        )


@register_adapter
class Ideogram4Adapter(CallSiteAdapter):
    """Ideogram 4 (``Ideogram4Transformer2DModel``): the attention of every single-stream
    ``Ideogram4TransformerBlock`` at its call, after the rotary embedding, over the packed ``[padding, text,
    image]`` row (the unconditional call: the image alone); the padding and text are never reduced, and the
    block-diagonal segment mask's rows and columns follow the image tokens. Grid from the image rows of
    ``position_ids``, found by ``indicator``; a row packing several samples is refused as an unknown grid. Its
    timestep is ``1 - t / 1000`` (0 at pure noise): it rises during a generation."""

    name = "diffusers-ideogram4"
    timestep_scale = 1.0
    timestep_rises = True
    models = frozenset({"Ideogram4Transformer2DModel"})
    stacks = (
        BlockStack("layers", frozenset({"Ideogram4TransformerBlock"}), attn="attention", image_last=True),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        # diffusers' OUTPUT_IMAGE_INDICATOR (transformer_ideogram4.py) marks the generated image's tokens.
        return MarkedPositionIdsGrid(model, input_names=("position_ids",), position=3, image_role=2)


@register_adapter
class JoyImageEditAdapter(CallSiteAdapter):
    """JoyImage-Edit (``JoyImageEditTransformer3DModel``): the joint attention of every double-stream
    ``JoyImageTransformerBlock`` at its call, after the rotary embedding, over ``[image, text]``; the text
    is never reduced. Given reference images (a ``[B, items, C, F, H, W]`` input), the model lays out the
    generated image's tokens first and the references' after them: each image is reduced on its own grid,
    the references at ``reference_ratio`` (0 keeps them whole). The image feed-forward ``img_mlp`` is not
    reduced."""

    name = "diffusers-joyimage-edit"
    models = frozenset({"JoyImageEditTransformer3DModel"})
    stacks = (
        BlockStack(
            "double_blocks",
            frozenset({"JoyImageTransformerBlock"}),
            attn="attn",
            image_first=True,
            image_leads=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        patch = tuple(int(p) for p in cast(Any, model.config).patch_size)
        return ItemsVideoGrid(model, video_patch=(patch[0], patch[1], patch[2]))


@register_adapter
class JoyImageEditPlusAdapter(CallSiteAdapter):
    """JoyImage-Edit-Plus (``JoyImageEditPlusTransformer3DModel``): the joint attention of every
    double-stream ``JoyImageEditPlusTransformerBlock`` at its call, after the rotary embedding, over
    ``[generated image, reference images, padding, text]``: each image is reduced on its own grid (read from
    ``shape_list``, which must list the same images' sizes for every sample), the references at
    ``reference_ratio`` (0 keeps them whole); the padding (masked) and the text never are. The image
    feed-forward ``img_mlp`` is not reduced."""

    name = "diffusers-joyimage-edit-plus"
    models = frozenset({"JoyImageEditPlusTransformer3DModel"})
    stacks = (
        BlockStack(
            "double_blocks",
            frozenset({"JoyImageEditPlusTransformerBlock"}),
            attn="attn",
            image_first=True,
            image_leads=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return LeadingShapeListGrid(model)


@register_adapter
class NucleusMoEImageAdapter(CallSiteAdapter):
    """NucleusMoE-Image (``NucleusMoEImageTransformer2DModel``): the attention of every
    ``NucleusMoEImageTransformerBlock`` at its call, after the rotary embedding: its queries are the image
    tokens, its keys/values ``[image, text]``; the text keys/values and their mask columns are never reduced.
    The image feed-forwards (a mixture of experts in most blocks) are not reduced. Grid from
    ``img_shapes``."""

    name = "diffusers-nucleusmoe-image"
    timestep_scale = 1.0
    models = frozenset({"NucleusMoEImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "transformer_blocks",
            frozenset({"NucleusMoEImageTransformerBlock"}),
            attn="attn",
            image_first=True,
            extra_keys=True,
        ),
    )

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return ShapeListGrid(model, position=1)
