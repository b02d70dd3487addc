"""diffusers' video diffusion transformers: Wan 2.1/2.2 (``WanTransformer3DModel``) and its relatives.

Their blocks see a video latent ``[B, C, F, H, W]`` patchified by ``patch_size = (pt, ph, pw)`` into
``F/pt × H/ph × W/pw`` tokens, frame after frame, and apply a 3-D rotary embedding inside the attention
processor. Token reduction therefore acts at the self-attention's call (``"call"`` sites, after the
rotary embedding): with merging, queries and keys/values merged (or, with ``kv_ratio``, apart); with
``method="downsample"``, keys/values from the grid downsampled in space (and in time by
``downsample_factor_time``). The cross-attention's queries (``merge_crossattn``) and the feed-forward
(``merge_mlp``) can be merged at block level, as in UNets.
"""

from __future__ import annotations

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in, register_adapter
from tomediff.core import BlockSpec, Site
from tomediff.core.spec import VideoGrid

__all__ = ["WanAdapter"]


def _patch_size(model: nn.Module) -> tuple[int, int, int]:
    patch = getattr(getattr(model, "config", None), "patch_size", None) or (1, 1, 1)
    pt, ph, pw = (int(p) for p in patch)
    return pt, ph, pw


@register_adapter
class WanAdapter(Adapter):
    """Wan 2.1/2.2 (text- and image-to-video; ``WanTransformerBlock``): the self-attention ``attn1`` at
    its attention call (``merge_attn``), the cross-attention ``attn2``'s queries (``merge_crossattn``) and
    the feed-forward ``ffn`` (``merge_mlp``). The text (and I2V image-encoder) tokens are keys/values of
    the cross-attention only and are never reduced."""

    name = "diffusers-wan"
    priority = 30

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name_in(model, {"WanTransformer3DModel"}) and hasattr(model, "blocks")

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        grid = VideoGrid(model, video_patch=_patch_size(model))
        specs = []
        for index, block in enumerate(model.blocks):
            if not class_name_in(block, {"WanTransformerBlock"}):
                continue
            sites = (
                Site(block.attn1, "attn", role="call"),
                Site(block.attn2, "crossattn"),
                Site(block.ffn, "mlp"),
            )
            specs.append(BlockSpec(f"blocks.{index}", block, 1, grid, sites))
        return specs
