"""Block specs for diffusion transformers reduced at their attention call, and adapters that are only a
declaration of their block lists (:class:`CallSiteAdapter`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, cast

from torch import nn

from tomediff.adapters.base import Adapter, class_name_in
from tomediff.adapters.diffusers_caches import ReplayedOutputCheck
from tomediff.core import BlockSpec, GridSource, Site

__all__ = ["BlockStack", "CallSiteAdapter", "call_site_specs"]


def call_site_specs(
    blocks: Iterable[nn.Module],
    prefix: str,
    grid: GridSource,
    names: set[str],
    image_first: bool = False,
    *,
    image_last: bool = False,
    image_leads: bool = False,
    sequence_first: bool = False,
    inner: str | None = None,
    extra_keys: bool = False,
    per_sample: bool = False,
    **sites: str,
) -> list[BlockSpec]:
    """Specs of the blocks of ``blocks`` whose class is one of ``names``: a ``"call"`` site at the
    self/joint attention ``sites["attn"]`` (image tokens first, or after the text), and block-level
    ``crossattn``/``mlp`` sites at the named submodules that exist. ``image_last``/``image_leads``: the
    block input is already ``[text, image]`` / ``[image, others]`` (single-stream blocks);
    ``sequence_first``: it is ``[tokens, batch, channels]``; ``inner``: each listed module wraps its
    block in this attribute; ``extra_keys``: the attention's keys may hold more tokens than its queries,
    before them; ``per_sample``: see :attr:`Site.per_sample`."""
    specs = []
    for index, listed in enumerate(blocks):
        block = getattr(listed, inner) if inner is not None else listed
        if not class_name_in(block, names):
            continue
        attn = block.get_submodule(sites["attn"])  # a dotted path reaches into a sub-block
        found = [
            Site(
                attn,
                "attn",
                role="call",
                image_first=image_first,
                text_first=not image_first,
                extra_keys=extra_keys,
                per_sample=per_sample,
            )
        ]
        name = f"{prefix}.{index}" if inner is None else f"{prefix}.{index}.{inner}"
        for kind in ("crossattn", "mlp"):
            module = _submodule(block, sites.get(kind))
            if module is not None:  # merged at block level: refused where a cache keeps its output
                conflict = ReplayedOutputCheck(module, f"{name}.{sites[kind]}")
                found.append(Site(module, kind, conflict=conflict))
        specs.append(
            BlockSpec(
                name,
                block,
                1,
                grid,
                tuple(found),
                image_last=image_last,
                image_first=image_leads,
                sequence_first=sequence_first,
            )
        )
    return specs


def _submodule(block: nn.Module, path: str | None) -> nn.Module | None:
    """``block``'s submodule at the dotted ``path``, or None when it has none there."""
    if not path:
        return None
    try:
        return block.get_submodule(path)
    except AttributeError:  # e.g. a block without a cross-attention
        return None


@dataclass(frozen=True)
class BlockStack:
    """One list of a model's blocks reduced at the attention call.

    Attributes:
        attr: the model attribute holding the blocks (also the prefix of their spec names); a dotted
            path for a list inside a dict of lists (Flux 3's ``mode_blocks.image``).
        block_classes: the class names of the blocks to reduce; others are left alone.
        attn: the block's self/joint attention (its call site; a dotted path for a sub-block's).
        crossattn, mlp: the block's cross-attention / feed-forward, merged at block level, if any.
        image_first: the attention sequence is ``[image, text]`` (else ``[text, image]``).
        image_last: the block input is already ``[text, image]`` (single-stream blocks).
        image_leads: the block input is already ``[image, others]`` (text or padding after the image).
        sequence_first: the block input is ``[tokens, batch, channels]``.
        inner: each listed module wraps its block in this attribute (HiDream's ``HiDreamBlock.block``).
        extra_keys: the attention's keys may hold more tokens than its queries, before them (PRX's text
            keys for image queries, GLM-Image's cached condition-image keys), or after them with
            ``image_first`` (NucleusMoE-Image's text keys).
        optional: the model may lack this list (e.g. no single-stream blocks).
        per_sample: the attention may be called once per sample (:attr:`Site.per_sample`).
    """

    attr: str
    block_classes: frozenset[str]
    attn: str
    crossattn: str | None = None
    mlp: str | None = None
    image_first: bool = False
    image_last: bool = False
    image_leads: bool = False
    sequence_first: bool = False
    inner: str | None = None
    extra_keys: bool = False
    optional: bool = False
    per_sample: bool = False

    def specs(self, model: nn.Module, grid: GridSource) -> list[BlockSpec]:
        blocks: Iterable[nn.Module]
        try:
            blocks = cast(nn.ModuleList, model.get_submodule(self.attr))
        except AttributeError:
            if not self.optional:
                raise
            blocks = ()
        sites = {"attn": self.attn, "crossattn": self.crossattn, "mlp": self.mlp}
        return call_site_specs(
            blocks,
            self.attr,
            grid,
            set(self.block_classes),
            self.image_first,
            image_last=self.image_last,
            image_leads=self.image_leads,
            sequence_first=self.sequence_first,
            inner=self.inner,
            extra_keys=self.extra_keys,
            per_sample=self.per_sample,
            **{kind: name for kind, name in sites.items() if name is not None},
        )


class CallSiteAdapter(Adapter):
    """An adapter declared by its model classes (``models``), its block lists (``stacks``) and where
    its token grid comes from (``grid``). It matches a model of one of ``models`` that has the first
    stack's block list."""

    priority = 30
    models: ClassVar[frozenset[str]] = frozenset()
    stacks: ClassVar[tuple[BlockStack, ...]] = ()

    @classmethod
    def grid(cls, model: nn.Module) -> GridSource:
        raise NotImplementedError

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not class_name_in(model, set(cls.models)):
            return False
        try:
            model.get_submodule(cls.stacks[0].attr)
        except AttributeError:
            return False
        return True

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        grid = cls.grid(model)
        return [spec for stack in cls.stacks for spec in stack.specs(model, grid)]
