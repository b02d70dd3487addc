"""Plans over several token groups: an image-token span ``[group 0 | group 1 | ...]`` (an edit model's
output image then its reference images), each group reduced by a plan of its own (or kept whole).

The combined plan offers what the sites use of one plan: ``merge``/``unmerge``/``merge_mask`` (and the
``positions`` of a batch-shared plan, for rotary rows) in :class:`GroupedPlan`; ``reduce``/``kept_index``
for downsampled keys and values in :class:`GroupedDownsample`. Its slots are the groups' slots in group
order, so no token is ever merged with a token of another group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tomediff.ops.attention import AttentionPlan, attention_merge_plan

__all__ = [
    "GroupedDownsample",
    "GroupedPlan",
    "combine_group_plans",
    "group_starts",
    "grouped_attention_merge_plan",
]


def group_starts(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Where each group starts in the concatenated span: ``(0, n0, n0 + n1, ...)``."""
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return tuple(starts)


def _check_span(x: torch.Tensor, batch: int, tokens: int, what: str) -> None:
    if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != tokens:
        raise ValueError(
            f"{what} expects a [batch={batch}, tokens={tokens}, channels] tensor, got shape "
            f"{tuple(x.shape)}; the tensor does not belong to the block call the plan was made for."
        )


def _check_plans(plans: tuple[Any, ...], sizes: tuple[int, ...], batch: int) -> None:
    if len(plans) != len(sizes) or not plans:
        raise ValueError(f"a grouped plan needs one plan (or None) per group, got {len(plans)} for {sizes}.")
    for index, (plan, size) in enumerate(zip(plans, sizes, strict=True)):
        if plan is not None and (int(plan.num_tokens) != size or int(plan.batch) != batch):
            raise ValueError(
                f"the plan of group {index} is for [batch={plan.batch}, tokens={plan.num_tokens}], not the "
                f"group's [batch={batch}, tokens={size}]."
            )


def _sample(plan: Any, index: int) -> Any:
    return None if plan is None or plan.batch == 1 else plan.sample(index)


@dataclass(frozen=True, eq=False)
class GroupedPlan:
    """A merge plan over consecutive groups: group ``g`` (``sizes[g]`` tokens) is merged by
    ``plans[g]`` (a :class:`~tomediff.ops.MergePlan`-like plan, or None to keep its tokens), and the
    merged groups follow each other in the same order: ``[B, sum(sizes), C] <-> [B, sum(merged), C]``.

    Attributes:
        plans: one plan or None per group.
        sizes: each group's token count.
        batch: the batch size every plan is for.
        positions: ``[M]`` the token (of the whole span) whose position each slot keeps, when every
            group's plan has ``positions`` (a plan shared by the batch) or is None; else None.
    """

    plans: tuple[Any, ...]
    sizes: tuple[int, ...]
    batch: int
    positions: torch.Tensor | None = None

    @classmethod
    def build(cls, plans: tuple[Any, ...], sizes: tuple[int, ...], batch: int) -> GroupedPlan:
        """The grouped plan, with its ``positions`` when the groups' plans all give theirs."""
        _check_plans(plans, sizes, batch)
        given = [p for p in plans if p is not None]
        if not given:
            raise ValueError("a grouped plan needs at least one group's plan; None reduces nothing.")
        positions = None
        if all(getattr(p, "positions", None) is not None for p in given):
            device = given[0].positions.device
            parts = [
                torch.arange(start, start + size, device=device) if plan is None else plan.positions + start
                for plan, size, start in zip(plans, sizes, group_starts(sizes), strict=True)
            ]
            positions = torch.cat(parts)
        return cls(plans, sizes, batch, positions)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    @property
    def merged_sizes(self) -> tuple[int, ...]:
        """Each group's token count after merging."""
        return tuple(
            size if plan is None else int(plan.num_merged)
            for plan, size in zip(self.plans, self.sizes, strict=True)
        )

    @property
    def num_merged(self) -> int:
        return sum(self.merged_sizes)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, N, C] -> [B, M, C]``: each group merged by its plan, the groups concatenated."""
        _check_span(x, self.batch, self.num_tokens, "merge")
        return self._apply(x, 1, self.sizes, lambda plan, part: plan.merge(part))

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``y: [B, M, C] -> [B, N, C]``: each group's slots copied back to its tokens."""
        _check_span(y, self.batch, self.num_merged, "unmerge")
        return self._apply(y, 1, self.merged_sizes, lambda plan, part: plan.unmerge(part))

    def merge_mask(self, mask: torch.Tensor, dim: int) -> torch.Tensor:
        """Reduce axis ``dim`` (size N) of an attention mask to the M slots, group by group."""
        return self._apply(mask, dim, self.sizes, lambda plan, part: plan.merge_mask(part, dim))

    def _apply(self, x: torch.Tensor, dim: int, sizes: tuple[int, ...], reduce: Any) -> torch.Tensor:
        parts = []
        for plan, size, start in zip(self.plans, sizes, group_starts(sizes), strict=True):
            part = x.narrow(dim, start, size)
            parts.append(part if plan is None else reduce(plan, part))
        return torch.cat(parts, dim=dim)

    @property
    def local_slot(self) -> torch.Tensor:
        """``[B, N]`` int64 slot of each token within its batch element (for observers)."""
        parts = []
        reference = next(p for p in self.plans if p is not None)
        device = reference.local_slot.device
        for plan, size, start in zip(self.plans, self.sizes, group_starts(self.merged_sizes), strict=True):
            if plan is None:
                parts.append(torch.arange(start, start + size, device=device).expand(self.batch, size))
            else:
                parts.append(plan.local_slot + start)
        return torch.cat(parts, dim=1)

    def sample(self, index: int) -> GroupedPlan:
        """The plan of batch element ``index`` alone (batch 1)."""
        positions = self.positions
        return GroupedPlan(tuple(_sample(p, index) for p in self.plans), self.sizes, 1, positions)


@dataclass(frozen=True, eq=False)
class GroupedDownsample:
    """Downsampled keys/values over consecutive groups: group ``g`` (``sizes[g]`` tokens) reduced by
    ``plans[g]`` (a :class:`~tomediff.ops.GridDownsample`, or None to keep its tokens), the reduced
    groups concatenated in order: ``[B, sum(sizes), C] -> [B, sum(merged), C]``. Nothing is unmerged."""

    plans: tuple[Any, ...]
    sizes: tuple[int, ...]
    batch: int

    def __post_init__(self) -> None:
        _check_plans(self.plans, self.sizes, self.batch)
        if all(p is None for p in self.plans):
            raise ValueError("a grouped plan needs at least one group's plan; None reduces nothing.")

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    @property
    def num_merged(self) -> int:
        return sum(
            size if plan is None else int(plan.num_merged)
            for plan, size in zip(self.plans, self.sizes, strict=True)
        )

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, N, C] -> [B, M, C]`` key/value tokens."""
        _check_span(x, self.batch, self.num_tokens, "reduce")
        parts = []
        for plan, size, start in zip(self.plans, self.sizes, group_starts(self.sizes), strict=True):
            part = x.narrow(1, start, size)
            parts.append(part if plan is None else plan.reduce(part))
        return torch.cat(parts, dim=1)

    def kept_index(self, device: torch.device) -> torch.Tensor | None:
        """``[M]`` the tokens :meth:`reduce` keeps when every group's plan only selects, else None."""
        parts = []
        for plan, size, start in zip(self.plans, self.sizes, group_starts(self.sizes), strict=True):
            if plan is None:
                parts.append(torch.arange(start, start + size, device=device))
                continue
            kept = plan.kept_index(device)
            if kept is None:
                return None
            parts.append(kept + start)
        return torch.cat(parts)

    def sample(self, index: int) -> GroupedDownsample:
        """The plan of batch element ``index`` alone (batch 1)."""
        return GroupedDownsample(tuple(_sample(p, index) for p in self.plans), self.sizes, 1)


def grouped_attention_merge_plan(
    metric: torch.Tensor,
    grids: Sequence[tuple[int, int]],
    ratios: Sequence[tuple[float, float | None]],
    *,
    sx: int = 2,
    sy: int = 2,
    generator: torch.Generator | None = None,
) -> AttentionPlan | None:
    """ToMe's q+kv merge plan for one attention call whose image span holds several images (an edit
    model's predicted image then its reference images), each merged on its own grid.

    Args:
        metric: ``[B, N, C]`` features of the image tokens, the images one after another, each
            row-major: ``N = sum(height * width for height, width in grids)``.
        grids: ``(height, width)`` of each image's token grid, in span order (video: frames stacked in
            ``height``).
        ratios: ``(ratio, kv_ratio)`` of each image, as for :func:`~tomediff.ops.attention_merge_plan`
            (``kv_ratio`` None: the queries' ratio; 0 keeps that side whole).
        sx, sy, generator: as for :func:`~tomediff.ops.attention_merge_plan`; the images draw their dst
            tokens from ``generator`` in span order.

    Returns:
        An :class:`~tomediff.ops.AttentionPlan` whose sides are :class:`GroupedPlan` (``[B, N, C] <->
        [B, M, C]``; no token is merged with another image's), for
        :func:`~tomediff.ops.reduced_attention`; None when no image is merged.
    """
    if len(grids) != len(ratios) or not grids:
        raise ValueError(
            f"one (ratio, kv_ratio) per image grid is needed, got {len(ratios)} for {len(grids)} grids."
        )
    sizes = tuple(height * width for height, width in grids)
    if metric.dim() != 3 or metric.shape[1] != sum(sizes):
        raise ValueError(
            f"metric of shape {tuple(metric.shape)} is not [B, N, C] with the N={sum(sizes)} tokens of the "
            f"grids {list(grids)}."
        )
    plans = [
        attention_merge_plan(
            metric.narrow(1, start, size), height, width, ratio, kv_ratio, sx=sx, sy=sy, generator=generator
        )
        for (height, width), (ratio, kv_ratio), size, start in zip(
            grids, ratios, sizes, group_starts(sizes), strict=True
        )
    ]
    return combine_group_plans(plans, sizes, int(metric.shape[0]))


def combine_group_plans(
    plans: Sequence[Any], sizes: Sequence[int], batch: int, where: str = "this attention call"
) -> Any:
    """One plan over the concatenated images of a call from each image's plan (None: that image is kept
    whole).

    Args:
        plans: per image, in span order: a merge plan (``[B, n, C] <-> [B, m, C]``), a downsampled grid
            (``reduce``), an :class:`~tomediff.ops.AttentionPlan` (queries and keys/values apart), or None.
        sizes: each image's token count ``n``.
        batch: ``B``.
        where: what the plans are for, in the error message.

    Returns:
        A :class:`GroupedPlan` of merge plans, a :class:`GroupedDownsample` of downsampled grids, or,
        when an image's plan reduces queries and keys/values apart, an AttentionPlan of the two grouped
        sides (one grouped plan serving both where every image's sides are one plan). None when no image
        is reduced.
    """
    if all(plan is None for plan in plans):
        return None
    sizes = tuple(sizes)
    if any(isinstance(plan, AttentionPlan) for plan in plans):
        sides = [
            (None, None)
            if plan is None
            else (plan.queries, plan.keys)
            if isinstance(plan, AttentionPlan)
            else (plan, plan)
            for plan in plans
        ]
        queries = combine_group_plans([q for q, _ in sides], sizes, batch, where)
        if all(q is k for q, k in sides):
            return AttentionPlan(queries, queries)
        return AttentionPlan(queries, combine_group_plans([k for _, k in sides], sizes, batch, where))
    given = [plan for plan in plans if plan is not None]
    if all(hasattr(plan, "reduce") for plan in given):
        return GroupedDownsample(tuple(plans), sizes, batch)
    if all(hasattr(plan, "merge") and not hasattr(plan, "reduce") for plan in given):
        return GroupedPlan.build(tuple(plans), sizes, batch)
    kinds = sorted({type(plan).__name__ for plan in given})
    raise TypeError(
        f"the images of {where} got plans of different kinds ({', '.join(kinds)}); a reducer must give "
        "every image of a call a merge plan, or every one a downsampled grid."
    )
