"""Reducing the image part of a joint sequence: token ranges, batch-shared plans and rotary tables.

Diffusion transformers such as Flux attend over ``[text tokens, image tokens]`` with one rotary
position table ``(cos, sin)``, each ``[S, D]`` and shared by the whole batch. Merging their image
tokens therefore needs a plan that groups the tokens of every batch element alike
(:class:`SharedMergePlan`), whose slots each keep one position, and the two reductions below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tomediff.ops.merge import MergePlan, TokenPlan

__all__ = [
    "SharedMergePlan",
    "merge_trailing",
    "reduce_rotary",
    "shared_metric",
    "slot_positions",
    "unmerge_trailing",
]


def shared_metric(metric: torch.Tensor) -> torch.Tensor:
    """Features for matching once for a whole batch: ``[B, N, C] -> [1, N, B*C]``.

    Each sample's token vectors are L2-normalised and the samples concatenated along the channels, so
    the cosine similarity of two tokens under the result is the mean over the batch of their cosine
    similarities in each sample (every part has norm 1). A plan matched on it suits every sample.
    """
    batch, num_tokens, channels = metric.shape
    tiny = torch.finfo(metric.dtype).tiny
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(tiny)
    return unit.transpose(0, 1).reshape(1, num_tokens, batch * channels)


def slot_positions(local_slot: torch.Tensor, dst_idx: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The token whose position each slot of a merge plan takes: ``[M]`` int64.

    A slot holding a dst token (alone or with the src tokens merged into it) takes the dst's position;
    a slot holding one unmerged src token keeps that token's position.

    Args:
        local_slot: ``[N]`` slot of each token (one row of :attr:`MergePlan.local_slot`).
        dst_idx: ``[Nd]`` token indices of the dst tokens (:attr:`Partition.dst_idx`).
        num_slots: ``M``, the plan's slot count.
    """
    num_tokens = local_slot.numel()
    # Sort key: dst tokens come before src tokens, so each slot's minimum is its dst if it has one.
    key = torch.arange(num_tokens, device=local_slot.device) + num_tokens
    key = key.index_copy(0, dst_idx, dst_idx)
    best = torch.full((num_slots,), 2 * num_tokens, dtype=torch.int64, device=local_slot.device)
    best = best.scatter_reduce(0, local_slot, key, reduce="amin", include_self=True)
    return best.remainder(num_tokens)


@dataclass(frozen=True, eq=False)
class SharedMergePlan:
    """A merge plan that groups the tokens of every batch element alike, with a position per slot.

    Attributes:
        plan: the :class:`MergePlan` for the whole batch (its rows are identical).
        positions: ``[M]`` int64, the token whose position slot ``m`` takes (:func:`slot_positions`).
    """

    plan: MergePlan
    positions: torch.Tensor

    @classmethod
    def build(cls, plan: MergePlan, dst_idx: torch.Tensor, batch: int) -> SharedMergePlan:
        """From a plan matched for one sample (``plan.batch == 1``), repeated over ``batch`` samples."""
        if plan.batch != 1:
            raise ValueError(f"SharedMergePlan.build needs a plan for one sample, got batch {plan.batch}.")
        positions = slot_positions(plan.local_slot[0], dst_idx, plan.num_merged)
        return cls(plan.repeat_batch(batch), positions)

    @property
    def batch(self) -> int:
        return self.plan.batch

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def num_merged(self) -> int:
        return self.plan.num_merged

    @property
    def local_slot(self) -> torch.Tensor:
        return self.plan.local_slot

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.merge(x)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return self.plan.unmerge(y)

    def merge_mask(self, mask: torch.Tensor, dim: int) -> torch.Tensor:
        return self.plan.merge_mask(mask, dim)

    def sample(self, index: int) -> SharedMergePlan:
        """The plan of batch element ``index`` alone (batch 1)."""
        return SharedMergePlan(self.plan.sample(index), self.positions)


def merge_trailing(x: torch.Tensor, plan: TokenPlan, prefix: int) -> torch.Tensor:
    """Merge the last ``N`` tokens of ``x`` with ``plan``, keeping the first ``prefix`` as they are.

    ``x: [B, prefix + N, C] -> [B, prefix + M, C]`` (``N = plan.num_tokens``, ``M = plan.num_merged``).
    """
    if prefix == 0:
        return plan.merge(x)
    return torch.cat([x[:, :prefix], plan.merge(x[:, prefix:])], dim=1)


def unmerge_trailing(y: torch.Tensor, plan: TokenPlan, prefix: int) -> torch.Tensor:
    """Inverse of :func:`merge_trailing`: ``[B, prefix + M, C] -> [B, prefix + N, C]``."""
    if prefix == 0:
        return plan.unmerge(y)
    return torch.cat([y[:, :prefix], plan.unmerge(y[:, prefix:])], dim=1)


def reduce_rotary(
    table: torch.Tensor | tuple[torch.Tensor, ...], positions: torch.Tensor, num_tokens: int
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Keep the rotary rows of the reduced tokens: each ``[P + N, D] -> [P + M, D]``.

    The last ``num_tokens`` (N) rows belong to the image tokens; the first ``P`` (text) rows stay as
    they are, and image row ``positions[m]`` becomes row ``P + m``. ``table`` is one tensor or a tuple
    of them (diffusers' ``(cos, sin)``), reduced alike.
    """
    if isinstance(table, tuple):
        return tuple(reduce_rotary(t, positions, num_tokens) for t in table)  # type: ignore[misc]
    prefix = table.shape[0] - num_tokens
    image = table[prefix:].index_select(0, positions)
    return image if prefix == 0 else torch.cat([table[:prefix], image], dim=0)
