"""Merge and unmerge driven by one per-token slot index.

Every token ``n`` of batch element ``b`` is assigned a slot ``slot[b, n]`` in ``[0, M)``. Merging
averages the tokens that share a slot (one scatter-add, then a multiply by the precomputed
``1 / count``); unmerging copies each slot's value back to all of its tokens (one gather).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from tomediff.ops.kernels import scatter_add_triton, triton_enabled

__all__ = ["KeepPlan", "MergePlan", "TokenPlan"]


class TokenPlan(Protocol):
    """What the hooks need from a plan: ``[B, N, C] -> [B, M, C]`` and back."""

    # Read-only, so frozen dataclasses and properties (SharedMergePlan) satisfy the protocol.
    @property
    def batch(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_merged(self) -> int: ...

    def merge(self, x: torch.Tensor) -> torch.Tensor: ...

    def unmerge(self, y: torch.Tensor) -> torch.Tensor: ...

    def merge_mask(self, mask: torch.Tensor, dim: int) -> torch.Tensor: ...


def _check_tokens(x: torch.Tensor, batch: int, tokens: int, what: str) -> None:
    if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != tokens:
        raise ValueError(
            f"{what} expects a [batch={batch}, tokens={tokens}, channels] tensor, got shape "
            f"{tuple(x.shape)}; the tensor does not belong to the block call the plan was made for."
        )


def _merge_mask_by_slot(
    mask: torch.Tensor, dim: int, local_slot: torch.Tensor, batch: int, num_slots: int
) -> torch.Tensor:
    """Reduce a mask's token axis to slots: a slot is attendable if any of its tokens is.

    Args:
        mask: ``[B or 1, ..., N, ...]`` boolean or additive (0 / large negative) mask.
        dim: the axis of ``mask`` that indexes the N tokens (negative, counted from the end).
        local_slot: ``[B, N]`` slot of each token.
    """
    if mask.shape[0] not in (1, batch):
        raise ValueError(
            f"attention mask batch size {mask.shape[0]} is neither 1 nor the hidden states' batch "
            f"size {batch}; ToMe can only merge masks given per sample or broadcast over the batch."
        )
    is_bool = mask.dtype == torch.bool
    values = mask.to(torch.uint8) if is_bool else mask
    values = values.expand(batch, *values.shape[1:]).movedim(dim, -1)
    index = local_slot.view(batch, *([1] * (values.dim() - 2)), -1).expand(values.shape)
    out_shape = (*values.shape[:-1], num_slots)
    out = values.new_zeros(out_shape).scatter_reduce_(-1, index, values, reduce="amax", include_self=False)
    out = out.movedim(-1, dim)
    return out.bool() if is_bool else out


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Mean-merge plan for ``batch`` sequences of ``num_tokens`` tokens onto ``num_merged`` slots.

    Only the flat index and the slot sizes are stored (about ``12·B·N`` bytes), so a plan alive
    during a block adds little to its peak memory.

    Attributes:
        flat_slot: ``[B*N]`` int64, ``b * M + slot[b, n]``: row of the flattened ``[B*M, C]`` output.
        counts: ``[B*M, 1]`` float32 number of tokens in each slot (the dst token itself counts, so a
            lone token keeps its exact value).
    """

    flat_slot: torch.Tensor
    counts: torch.Tensor
    batch: int
    num_tokens: int
    num_merged: int

    @property
    def local_slot(self) -> torch.Tensor:
        """``[B, N]`` int64 slot of each token within its batch element (computed on demand)."""
        offsets = torch.arange(self.batch, device=self.flat_slot.device).unsqueeze(1) * self.num_merged
        return self.flat_slot.view(self.batch, self.num_tokens) - offsets

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, N, C] -> [B, M, C]``, each slot the mean of its tokens.

        Half-precision inputs are summed in float32 (a large group of large values would overflow
        fp16 otherwise) and the mean is rounded once; float32/float64 inputs sum in their own dtype.
        """
        _check_tokens(x, self.batch, self.num_tokens, "merge")
        channels = x.shape[-1]
        flat = x.reshape(self.batch * self.num_tokens, channels)
        num_slots = self.batch * self.num_merged
        deterministic = x.is_cuda and torch.are_deterministic_algorithms_enabled()
        if x.dtype in (torch.float16, torch.bfloat16):
            if triton_enabled(x) and not deterministic:
                sums = scatter_add_triton(flat, self.flat_slot, num_slots)
            else:
                sums = _scatter_add(flat.float(), self.flat_slot, num_slots, deterministic)
            out = torch.div(sums, self.counts, out=x.new_empty(num_slots, channels))
        else:
            counts = self.counts if self.counts.dtype == x.dtype else self.counts.to(x.dtype)
            out = _scatter_add(flat, self.flat_slot, num_slots, deterministic).div_(counts)
        return out.view(self.batch, self.num_merged, channels)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``y: [B, M, C] -> [B, N, C]``, every token gets its slot's value."""
        _check_tokens(y, self.batch, self.num_merged, "unmerge")
        channels = y.shape[-1]
        flat = y.reshape(self.batch * self.num_merged, channels)
        return flat.index_select(0, self.flat_slot).view(self.batch, self.num_tokens, channels)

    def merge_mask(self, mask: torch.Tensor, dim: int) -> torch.Tensor:
        """Reduce axis ``dim`` (size N) of an attention mask to the M slots."""
        return _merge_mask_by_slot(mask, dim, self.local_slot, self.batch, self.num_merged)

    def sample(self, index: int) -> MergePlan:
        """The plan of batch element ``index`` alone (batch 1), for attention computed per sample."""
        n, m = self.num_tokens, self.num_merged
        flat_slot = self.flat_slot[index * n : (index + 1) * n] - index * m
        return MergePlan(flat_slot, self.counts[index * m : (index + 1) * m], 1, n, m)

    def repeat_batch(self, times: int) -> MergePlan:
        """The same grouping for ``times`` stacked copies of the batch: sample ``b + k * B`` is merged
        like sample ``b`` (e.g. one plan for both halves of classifier-free guidance)."""
        if times == 1:
            return self
        slots = self.flat_slot.view(1, self.batch * self.num_tokens)
        offsets = torch.arange(times, device=slots.device).unsqueeze(1) * (self.batch * self.num_merged)
        flat_slot = (slots + offsets).view(-1)
        counts = self.counts.repeat(times, 1)
        return MergePlan(flat_slot, counts, self.batch * times, self.num_tokens, self.num_merged)


def _scatter_add(
    flat: torch.Tensor, index: torch.Tensor, num_slots: int, deterministic: bool
) -> torch.Tensor:
    """``out[index[i]] += flat[i]`` into new ``[num_slots, C]`` zeros of ``flat``'s dtype."""
    out = flat.new_zeros(num_slots, flat.shape[-1])
    if deterministic:
        # index_add_ uses atomics on CUDA; accumulate-put has a deterministic (sorted) kernel.
        return out.index_put_((index,), flat, accumulate=True)
    return out.index_add_(0, index, flat)


@dataclass(frozen=True, eq=False)
class KeepPlan:
    """The zero-cost reference: keep the first ``M`` tokens, copy them back to all ``N``.

    No similarity is computed and merging is a slice, so a model patched with this plan runs as
    fast as any merging method could at the same token counts (the "ideal" benchmark variant).
    Its outputs are not meaningful images.

    Attributes:
        source: ``[N]`` int64, which kept token each position copies on unmerge.
    """

    source: torch.Tensor
    batch: int
    num_tokens: int
    num_merged: int

    @classmethod
    def build(cls, batch: int, num_tokens: int, num_merged: int, device: torch.device) -> KeepPlan:
        source = torch.arange(num_tokens, device=device) % num_merged
        return cls(source, batch, num_tokens, num_merged)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, N, C] -> [B, M, C]`` (a view of the first M tokens)."""
        _check_tokens(x, self.batch, self.num_tokens, "merge")
        return x[:, : self.num_merged]

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``y: [B, M, C] -> [B, N, C]`` by one gather along the token axis."""
        _check_tokens(y, self.batch, self.num_merged, "unmerge")
        return y.index_select(1, self.source)

    def merge_mask(self, mask: torch.Tensor, dim: int) -> torch.Tensor:
        return mask.narrow(dim, 0, self.num_merged)

    def sample(self, index: int) -> KeepPlan:
        """The plan of one batch element (batch 1; every element keeps the same tokens)."""
        return dataclasses.replace(self, batch=1)

    @property
    def positions(self) -> torch.Tensor:
        """``[M]`` the token whose position each slot keeps (the kept tokens themselves; the same in
        every sample, so a rotary table shared by the batch can be reduced with it)."""
        return torch.arange(self.num_merged, device=self.source.device)
