"""diffusers' multimodal diffusion transformers: SD3/SD3.5 (``SD3Transformer2DModel`` with MMDiT
``JointTransformerBlock``s) and Flux (``FluxTransformer2DModel``, double-stream
``FluxTransformerBlock``s then single-stream ``FluxSingleTransformerBlock``s).

Only image tokens are reduced; text tokens and their projections are never touched. All blocks see
the full-resolution token grid (level 1): SD3's from its patchified ``[B, C, H, W]`` latent, Flux's
from the ``img_ids`` of its packed latent. Which blocks merge is chosen with ``skip_blocks``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, cast

from torch import nn

from tomediff.adapters.base import Adapter, ForwardChunkingCheck, class_name_in, register_adapter
from tomediff.adapters.call_sites import BlockStack, CallSiteAdapter
from tomediff.adapters.diffusers_caches import BlockCacheCheck, BlockSkipCheck, ReplayedOutputCheck
from tomediff.core import BlockSpec, GridSource, Site
from tomediff.core.spec import PositionIdsGrid, ShapeListGrid

__all__ = [
    "BriaAdapter",
    "BriaFiboAdapter",
    "ChromaAdapter",
    "Flux2Adapter",
    "FluxAdapter",
    "FluxShapedAdapter",
    "QwenImageAdapter",
    "SD3Adapter",
]

_ROTARY = ("image_rotary_emb",)


class _FusedProjectionCheck:
    """Refuses key/value reduction while an attention uses fused projections (``to_qkv``): its
    ``to_k``/``to_v`` are then never called, and the reduction would silently do nothing."""

    def __init__(self, attn: nn.Module, name: str) -> None:
        self.attn = attn
        self.name = name

    def __call__(self) -> str | None:
        if not getattr(self.attn, "fused_projections", False):
            return None
        return (
            f"method='downsample' reduces the keys and values at '{self.name}.to_k'/'to_v', but that "
            "attention uses fused QKV projections; call model.unfuse_qkv_projections() first, or use "
            "method='merge'."
        )


def _attention_site(attn: nn.Module, name: str, inside: Site | None = None, **fields: Any) -> Site:
    """A block-level attention site; ``inside`` is its attention call, which reduces the tokens
    instead while a diffusers cache keeps the attention's output (see ``diffusers_caches``)."""
    conflict = ReplayedOutputCheck(attn, name)
    return Site(attn, "attn", role="attention", conflict=conflict, inside=inside, **fields)


def _mlp_site(module: nn.Module, name: str, **fields: Any) -> Site:
    return Site(module, "mlp", conflict=ReplayedOutputCheck(module, name), **fields)


def _call_site(attn: nn.Module) -> Site:
    """Flux's attention call: ``[text, image]`` after the rotary embedding. Merging reduces the whole
    attention at its block-level site; this one serves key/value reduction (``method="downsample"``,
    ``kv_ratio``), which only the call itself can do with every token keeping its own position."""
    return Site(attn, "attn", role="call", text_first=True, call_only_for_kv=True)


def _block_site(block: nn.Module, name: str, **fields: Any) -> Site:
    """The whole block (``method="cache"``): image tokens in ``hidden_states``, text apart, and
    ``(text, image)`` returned."""
    conflict = BlockCacheCheck(block, name)
    return Site(
        block,
        "attn",
        role="block",
        mask_names=(),
        output_index=1,
        conflict=conflict,
        skipped=BlockSkipCheck(block),
        **fields,
    )


def _key_value_sites(attn: nn.Module, name: str) -> list[Site]:
    check = _FusedProjectionCheck(attn, name)
    return [
        Site(getattr(attn, proj), "attn", role="key_value", unsupported=check)
        for proj in ("to_k", "to_v")
        if isinstance(getattr(attn, proj, None), nn.Module)
    ]


@register_adapter
class SD3Adapter(Adapter):
    """SD3 / SD3.5: the joint attention's image tokens (``attn``; queries, keys and values of the image
    stream), SD3.5's image-only ``attn2``, and the image feed-forward ``ff`` (``merge_mlp``). The text
    stream (``encoder_hidden_states``, ``ff_context``) is never reduced. ``method="downsample"``
    reduces the image keys/values at ``to_k``/``to_v``; the text keys/values stay intact."""

    name = "diffusers-sd3"
    priority = 30
    models: ClassVar[frozenset[str]] = frozenset({"SD3Transformer2DModel"})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, set(cls.models)) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        patch_size = int(getattr(getattr(model, "config", None), "patch_size", None) or 1)
        grid = GridSource(model, patch_size=patch_size)
        specs = []
        for index, block in enumerate(cast(Iterable[Any], model.transformer_blocks)):
            if not class_name_in(block, {"JointTransformerBlock"}):
                continue
            name = f"transformer_blocks.{index}"
            # The joint attention's call sees [image, text]; SD3.5's attn2 the image tokens alone.
            inside = Site(block.attn, "attn", role="call", image_first=True)
            sites = [_attention_site(block.attn, f"{name}.attn", inside)]
            sites += _key_value_sites(block.attn, f"{name}.attn")
            attn2 = getattr(block, "attn2", None)
            if isinstance(attn2, nn.Module):  # SD3.5: self-attention over the image tokens alone
                inside = Site(attn2, "attn", role="call")
                sites += [
                    _attention_site(attn2, f"{name}.attn2", inside),
                    *_key_value_sites(attn2, f"{name}.attn2"),
                ]
            sites.append(_mlp_site(block.ff, f"{name}.ff", unsupported=ForwardChunkingCheck(block, name)))
            specs.append(BlockSpec(name, block, 1, grid, tuple(sites), block_site=_block_site(block, name)))
        return specs


@register_adapter
class FluxAdapter(Adapter):
    """Flux.1: in double-stream blocks the joint attention's image tokens (``attn``) and the image
    feed-forward ``ff`` (``merge_mlp``); in single-stream blocks, which concatenate ``[text, image]``
    before ``attn``, the image part of that sequence in ``attn`` and in the parallel MLP's input
    projection ``proj_mlp`` (``merge_mlp``). The rotary table ``image_rotary_emb`` is reduced with the
    image tokens, so one plan serves the whole batch. Flux pipelines pass ``timestep / 1000``.

    FLUX.1 is guidance-distilled: a call predicts the whole step, so ``use_rand`` keeps its random
    partition at batch 1 too (with ``true_cfg_scale``, whose halves run as two calls, each half draws
    its own; pass ``use_rand=False`` to give both the top-left one).

    ``method="downsample"`` and ``kv_ratio`` act at the attention call, after the rotary embedding
    (the image keys/values reduced, text untouched; with ``kv_ratio`` the queries merged at ``ratio``).

    Flux Kontext appends its reference image's tokens (``img_ids`` with a first column of 1) after the
    image it predicts: each image is reduced on its own grid, the reference at ``reference_ratio``, and
    every kept token keeps its own rotary row."""

    name = "diffusers-flux"
    priority = 30
    timestep_scale = 1.0
    odd_batch_top_left = False
    models: ClassVar[frozenset[str]] = frozenset({"FluxTransformer2DModel"})
    # The positional index of img_ids in the model's forward (when not passed by keyword).
    ids_position: ClassVar[int] = 4

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, set(cls.models)) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        grid = PositionIdsGrid(model, position=cls.ids_position, group_axis=0)
        specs = []
        for index, block in enumerate(cast(Iterable[Any], model.transformer_blocks)):
            if class_name_in(block, {"FluxTransformerBlock"}):
                name = f"transformer_blocks.{index}"
                inside = Site(block.attn, "attn", role="call", text_first=True)
                sites = (
                    _attention_site(block.attn, f"{name}.attn", inside, rotary_names=_ROTARY),
                    _call_site(block.attn),
                    _mlp_site(block.ff, f"{name}.ff"),
                )
                whole = _block_site(block, name, rotary_names=_ROTARY)
                specs.append(BlockSpec(name, block, 1, grid, sites, batch_shared=True, block_site=whole))
        for index, block in enumerate(getattr(model, "single_transformer_blocks", ())):
            if class_name_in(block, {"FluxSingleTransformerBlock"}):
                name = f"single_transformer_blocks.{index}"
                inside = Site(block.attn, "attn", role="call", text_first=True)
                sites = (
                    _attention_site(
                        block.attn, f"{name}.attn", inside, text_first=True, rotary_names=_ROTARY
                    ),
                    _call_site(block.attn),
                    _mlp_site(block.proj_mlp, f"{name}.proj_mlp", text_first=True),
                )
                whole = _block_site(block, name, rotary_names=_ROTARY)
                specs.append(BlockSpec(name, block, 1, grid, sites, batch_shared=True, block_site=whole))
        return specs


def _double_and_single(double: str, single: str, single_image_last: bool) -> tuple[BlockStack, BlockStack]:
    """Flux-shaped block lists: double-stream blocks (joint attention ``attn`` over ``[text, image]``,
    image ``ff``) then, if the model has them, single-stream blocks (``attn`` only)."""
    return (
        BlockStack("transformer_blocks", frozenset({double}), attn="attn", mlp="ff"),
        BlockStack(
            "single_transformer_blocks",
            frozenset({single}),
            attn="attn",
            image_last=single_image_last,
            optional=True,
        ),
    )


@register_adapter
class Flux2Adapter(CallSiteAdapter):
    """Flux.2 (``Flux2Transformer2DModel``, also Klein): every attention at its call, after the rotary
    embedding, over ``[text, image]``: double-stream ``Flux2TransformerBlock.attn`` and single-stream
    ``Flux2SingleTransformerBlock.attn`` (whose block input is already ``[text, image]``). Merging reduces
    the image queries and keys/values there (outputs copied back), ``kv_ratio`` the keys/values apart,
    ``method="downsample"`` the keys/values from the downsampled grid; text tokens are never reduced. The
    double-stream image feed-forward ``ff`` merges at block level (``merge_mlp``). The grid comes from
    ``img_ids`` (``(t, h, w, l)`` columns). Reference images (edit) follow the predicted image with their
    own ``t`` (10, 20, ...): each image is reduced on its own grid, the references at
    ``reference_ratio``."""

    name = "diffusers-flux2"
    timestep_scale = 1.0
    models = frozenset({"Flux2Transformer2DModel"})
    stacks = _double_and_single("Flux2TransformerBlock", "Flux2SingleTransformerBlock", True)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return PositionIdsGrid(model, position=3, group_axis=0)


@register_adapter
class QwenImageAdapter(CallSiteAdapter):
    """Qwen-Image (``QwenImageTransformer2DModel``): the joint attention of every
    ``QwenImageTransformerBlock`` at its call, after the rotary embedding, over ``[text, image]``; the
    image feed-forward ``img_mlp`` at block level (``merge_mlp``). The text padding mask the processor
    builds from ``encoder_hidden_states_mask`` keeps its text columns; its image columns are reduced with
    the keys. The grid is read from ``img_shapes``. Qwen-Image-Edit (and Edit Plus) list the predicted
    image's grid then the reference images' per sample: each image is reduced on its own grid, the
    references at ``reference_ratio``; Qwen-Image-Layered predicts every listed grid but the last (its
    input image)."""

    name = "diffusers-qwenimage"
    timestep_scale = 1.0
    models = frozenset({"QwenImageTransformer2DModel"})
    stacks = (
        BlockStack(
            "transformer_blocks", frozenset({"QwenImageTransformerBlock"}), attn="attn", mlp="img_mlp"
        ),
    )

    # The positional index of img_shapes in the model's forward (when not passed by keyword).
    shapes_position: ClassVar[int] = 4

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        layered = bool(getattr(getattr(model, "config", None), "use_layer3d_rope", False))
        return ShapeListGrid(model, position=cls.shapes_position, references=1 if layered else None)


@register_adapter
class ChromaAdapter(CallSiteAdapter):
    """Chroma (``ChromaTransformer2DModel``, Flux-shaped): the attention of the double-stream blocks
    (``[text, image]`` joint) and the single-stream blocks (whose input is already ``[text, image]``) at
    its call, after the rotary embedding; the double-stream image ``ff`` at block level
    (``merge_mlp``). Grid from ``img_ids``; text tokens and their mask columns are never reduced."""

    name = "diffusers-chroma"
    timestep_scale = 1.0
    models = frozenset({"ChromaTransformer2DModel"})
    stacks = _double_and_single("ChromaTransformerBlock", "ChromaSingleTransformerBlock", True)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return PositionIdsGrid(model, position=3)


# Flux.1-shaped families: img_ids position in forward, double-stream and single-stream block classes, and
# the id column telling a call's images apart (None: their pipelines pass one image).
# Their single-stream blocks build [text, image] themselves.
_FLUX_SHAPED: dict[str, tuple[int, str, str, int | None]] = {
    "BriaTransformer2DModel": (4, "BriaTransformerBlock", "BriaSingleTransformerBlock", None),
    "LongCatImageTransformer2DModel": (
        3,
        "LongCatImageTransformerBlock",
        "LongCatImageSingleTransformerBlock",
        0,  # LongCat-Image-Edit: the predicted image's ids have a first column of 1, the reference's 2
    ),
    "OvisImageTransformer2DModel": (3, "OvisImageTransformerBlock", "OvisImageSingleTransformerBlock", None),
}


@register_adapter
class FluxShapedAdapter(Adapter):
    """LongCat-Image and Ovis-Image (Flux.1-shaped, timestep ``t / 1000``; Bria below): the joint
    attention of the double- and single-stream blocks at its call, after the rotary embedding, over
    ``[text, image]``; the double-stream image ``ff`` at block level (``merge_mlp``). Grid from
    ``img_ids``. LongCat-Image-Edit appends its reference image's tokens (ids with a first column of 2)
    after the image it predicts (1): each image is reduced on its own grid, the reference at
    ``reference_ratio``."""

    name = "diffusers-flux-shaped"
    priority = 30
    timestep_scale = 1.0
    models: ClassVar[frozenset[str]] = frozenset(
        {"LongCatImageTransformer2DModel", "OvisImageTransformer2DModel"}
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, set(cls.models)) and hasattr(model, "transformer_blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        name = next(k.__name__ for k in type(model).__mro__ if k.__name__ in _FLUX_SHAPED)
        position, double, single, group_axis = _FLUX_SHAPED[name]
        grid = PositionIdsGrid(model, position=position, group_axis=group_axis)
        stacks = _double_and_single(double, single, False)
        return [spec for stack in stacks for spec in stack.specs(model, grid)]


@register_adapter
class BriaAdapter(FluxShapedAdapter):
    """Bria (Flux.1-shaped, timestep in ``[0, 1000]``): as :class:`FluxShapedAdapter`."""

    name = "diffusers-bria"
    timestep_scale = 1000.0
    models = frozenset({"BriaTransformer2DModel"})


@register_adapter
class BriaFiboAdapter(CallSiteAdapter):
    """Bria FIBO (``BriaFiboTransformer2DModel``, Flux.1-shaped, timestep in ``[0, 1000]``): the joint
    attention of the double-stream blocks (``[text, image]``) and of the single-stream blocks (whose input is
    already ``[text, image]``) at its call, after the rotary embedding; the double-stream image ``ff`` at
    block level (``merge_mlp``). Grid from ``img_ids``. FIBO-Edit appends its reference images' tokens after
    the image it predicts, each image's ids with its own first column (0, then 1, 2, ...): each image is
    reduced on its own grid, the references at ``reference_ratio``. The text (re-projected from the text
    encoder's layers at every block) and its padding mask columns are never reduced."""

    name = "diffusers-bria-fibo"
    models = frozenset({"BriaFiboTransformer2DModel"})
    stacks = _double_and_single("BriaFiboTransformerBlock", "BriaFiboSingleTransformerBlock", True)

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        return PositionIdsGrid(model, position=5, group_axis=0)
