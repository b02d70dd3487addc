"""What an adapter tells the core about a model: blocks, their merge sites and their token grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

__all__ = ["BlockSpec", "GridSource", "Site", "SiteKind"]

SiteKind = Literal["attn", "crossattn", "mlp"]


@dataclass(frozen=True, eq=False)
class GridSource:
    """A module whose input reveals the token grid of the blocks inside it.

    Its first positional argument (or the first of ``input_names`` passed by keyword) is a
    ``[B, C, H, W]`` map; the blocks see ``(H // patch_size) × (W // patch_size)`` tokens.
    """

    module: nn.Module
    patch_size: int = 1
    input_names: tuple[str, ...] = ("hidden_states", "x", "sample")


@dataclass(frozen=True, eq=False)
class Site:
    """A submodule whose token input is merged and whose output is unmerged.

    Attributes:
        module: the submodule (``attn1``, ``attn2``, ``ff``, ...).
        kind: which config switch enables it (``merge_attn``, ``merge_crossattn``, ``merge_mlp``).
        input_names: keyword names its token input may be passed by (else positional 0).
        mask_names: keyword names of an attention mask; for self-attention (no context passed) its
            token axes are merged too.
        context_names: keyword names of the key/value context; when one is given the keys are not
            the merged tokens and the mask is left alone.
        unsupported: called at each merge; a returned message means the site cannot merge in the
            module's current configuration and is raised as an error (never skipped silently).
    """

    module: nn.Module
    kind: SiteKind
    input_names: tuple[str, ...] = ("hidden_states", "x")
    mask_names: tuple[str, ...] = ("attention_mask", "mask")
    context_names: tuple[str, ...] = ("encoder_hidden_states", "context")
    unsupported: Callable[[], str | None] | None = None


@dataclass(frozen=True, eq=False)
class BlockSpec:
    """A transformer block to patch.

    Attributes:
        name: qualified name inside the patched model (for reports and errors).
        block: the block module; its input ``[B, N, C]`` is the similarity metric.
        downsample: how much its token grid is downsampled relative to the model's full-resolution
            token grid (1, 2, 4, ...), or None when only a call can tell.
        grid: where its ``h × w`` token grid comes from; None infers it from the patched model's
            input size (``ceil`` halving per level, as in a UNet).
        sites: the merge sites inside the block.
    """

    name: str
    block: nn.Module
    downsample: int | None
    grid: GridSource | None
    sites: tuple[Site, ...]
    input_names: tuple[str, ...] = ("hidden_states", "x")
