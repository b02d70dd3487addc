"""Token reduction under diffusers' context parallelism (``model.enable_parallelism(config=...)``).

With Ulysses attention (``ulysses_degree > 1``) every rank's blocks see one shard of the sequence, but
each attention call sees the whole sequence for a share of the heads (an all-to-all before and after
it). tomediff then makes the plan from the whole sequence: the block's input shards are gathered
(one all-gather per reduced block call), every rank computes the same plan from the same tokens, and
each reduces its heads' whole-sequence keys/values (and queries) at the attention call exactly as
without parallelism. So no rank reduces tokens it does not see, and outputs match the unsplit model's.

Ring attention needs an attention op that returns its log-sum-exp: diffusers' ``native`` backend
refuses it, and the backends that can compute attention outside ``F.scaled_dot_product_attention``,
where tomediff cannot reach it; ring (and the uneven ``ulysses_anything`` mode) are refused clearly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from tomediff.core.spec import Site
from tomediff.errors import MergeCallError

__all__ = ["context_parallel_config", "gather_sequence", "ulysses_group"]


def context_parallel_config(site: Site) -> Any | None:
    """The diffusers ``ContextParallelConfig`` active on ``site``'s attention module (its processor's
    ``_parallel_config``), or None when the module does not run under context parallelism."""
    parallel = getattr(getattr(site.module, "processor", None), "_parallel_config", None)
    config = getattr(parallel, "context_parallel_config", None)
    if config is None or (getattr(config, "_world_size", None) or 1) <= 1:
        return None
    return config


def ulysses_group(sites: Iterable[Site], block_name: str) -> Any | None:
    """The process group whose ranks each hold a shard of the block's sequence, when the block's
    reduced sites run under diffusers' Ulysses context parallelism (None without parallelism).

    Raises :class:`MergeCallError` for what cannot be reduced there: ring attention, uneven shards
    (``ulysses_anything``), and sites whose sequence is not the image tokens alone or which act on the
    block's (sharded) tokens rather than at the attention call."""
    sites = tuple(sites)
    config = None
    for site in sites:  # a loop, not a comprehension: torch.compile traces this hook without a break
        config = context_parallel_config(site)
        if config is not None:
            break
    if config is None:
        return None
    prefix = f"tomediff cannot reduce block '{block_name}' under diffusers' context parallelism"
    if config.ring_degree > 1:
        raise MergeCallError(
            f"{prefix} with ring attention (ring_degree={config.ring_degree}): ring attention needs an "
            "attention op that returns its log-sum-exp, which diffusers' 'native' backend does not, and "
            "other backends compute attention outside torch.nn.functional.scaled_dot_product_attention, "
            "where tomediff cannot reduce it. Use ContextParallelConfig(ulysses_degree=...) instead."
        )
    if config.ulysses_anything:
        raise MergeCallError(
            f"{prefix} with ulysses_anything=True (shards of unequal length). Use a token count divisible "
            "by ulysses_degree and ulysses_anything=False."
        )
    for site in sites:
        if site.role != "call" or site.text_first or site.image_first:
            raise MergeCallError(
                f"{prefix}: its {site.kind} site ({type(site.module).__name__}) "
                + (
                    "joins text and image tokens in one sequence, which Ulysses interleaves rank by rank"
                    if site.role == "call"
                    else "acts on the block's tokens, which each rank holds only a shard of"
                )
                + ". Only attention-call sites over the image tokens alone (Wan's self-attention) can be "
                "reduced under Ulysses; disable that site or context parallelism."
            )
    return config._ulysses_mesh.get_group()


def gather_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[B, n, C]`` shards of the ranks of ``group`` -> ``[B, n * ranks, C]`` in rank order (the
    order Ulysses' all-to-all puts them in at the attention call)."""
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.detach().contiguous(), group=group)
    return torch.cat(shards, dim=1)
