"""Which of diffusers' caches (``model.enable_cache(...)``, ``diffusers.hooks.apply_*``) merging cannot
work with.

diffusers attaches a cache as a named hook in a ``HookRegistry`` kept in a module's ``_diffusers_hook``
attribute; the hook replaces the module's forward, and on the steps it skips returns an output kept
(or extrapolated) from earlier steps. Inside a merge site that output is in the merged token order
of the step that made it, and tomediff would unmerge it with the current step's plan: every token in
the wrong place, with no error. So a site whose output tomediff unmerges must not hold such a hook,
on itself or on any module inside it.

What diffusers 0.42 replays, and where (default settings; custom identifiers can move the hooks):

* Pyramid Attention Broadcast (``pyramid_attention_broadcast``): attention outputs. Refused.
* TaylorSeer (``taylorseer_cache``): outputs of ``transformer_blocks.*attn`` (SD3, Flux) or of any
  module the identifiers name; in lite mode zeros from the blocks and the model's ``proj_out``.
  Refused where it sits at or inside a merge site.
* FasterCache (``faster_cache_block``): self-attention outputs (SD3/Flux ``attn``, PixArt ``attn1``).
  Refused. Its model-level hook only approximates the unconditional half of the model output.
* FirstBlockCache, MagCache, SeaCache: the residual of the whole block stack, taken from block
  inputs and outputs, which are never merged: they compose (a skipped block runs no merge site).
  FirstBlockCache and MagCache are tested with a Flux pipeline; SeaCache is not (diffusers 0.42's
  FluxPipeline passes it no step information, so it never skips).
* TextKVCache: text keys and values only (NucleusMoE blocks, which tomediff does not patch).

``method="cache"`` runs a whole block on a different subset of its image tokens from step to step and
keeps its own residuals, so every cache that skips or replays a block or anything inside it (all of the
above but TextKVCache) is refused on the blocks it patches (:class:`BlockCacheCheck`).
"""

from __future__ import annotations

from torch import nn

__all__ = ["BLOCK_SKIPPING_CACHES", "OUTPUT_REPLAYING_CACHES", "BlockCacheCheck", "ReplayedOutputCheck"]

# diffusers' hook name -> the cache's name for messages.
OUTPUT_REPLAYING_CACHES = {
    "pyramid_attention_broadcast": "Pyramid Attention Broadcast",
    "taylorseer_cache": "TaylorSeer cache",
    "faster_cache_block": "FasterCache",
}


# Hooks that skip a block or replay what it (or a module inside it) returned at earlier steps.
BLOCK_SKIPPING_CACHES = {
    **OUTPUT_REPLAYING_CACHES,
    "fbc_leader_block_hook": "FirstBlockCache",
    "fbc_block_hook": "FirstBlockCache",
    "mag_cache_leader_block_hook": "MagCache",
    "mag_cache_block_hook": "MagCache",
    "sea_cache_leader_block": "SeaCache",
    "sea_cache_block": "SeaCache",
}


class ReplayedOutputCheck:
    """A :attr:`~tomediff.core.Site.conflict` check: the message refusing a merge site at which (or
    inside which) a diffusers cache returns outputs kept from earlier steps, else None."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.name = name
        # (qualified name, module): the site and everything inside it, where a kept output would be
        # in merged token order.
        self.modules = tuple(
            (f"{name}.{inner}" if inner else name, sub) for inner, sub in module.named_modules()
        )

    def __call__(self) -> str | None:
        for where, module in self.modules:
            hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
            if not hooks:
                continue
            for hook_name, cache in OUTPUT_REPLAYING_CACHES.items():
                if hook_name in hooks:
                    return _message(cache, where)
        return None


def _message(cache: str, where: str) -> str:
    return (
        f"diffusers' {cache} keeps the output of '{where}' from earlier denoising steps and returns it "
        "on the steps it skips, but tomediff merges the tokens there with a plan that changes every "
        "step, so a kept output would be unmerged into the wrong places. Use one or the other: "
        "model.disable_cache() (or tomediff.remove_tome(model)); with tomediff, use a cache that skips "
        "whole blocks, model.enable_cache(FirstBlockCacheConfig(...))."
    )


class BlockCacheCheck:
    """The :attr:`~tomediff.core.Site.conflict` check of a block site (``method="cache"``): the message
    refusing a block at which (or inside which) a diffusers cache skips or replays computation, else
    None."""

    def __init__(self, block: nn.Module, name: str) -> None:
        self.modules = tuple(
            (f"{name}.{inner}" if inner else name, sub) for inner, sub in block.named_modules()
        )

    def __call__(self) -> str | None:
        for where, module in self.modules:
            hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
            if not hooks:
                continue
            for hook_name, cache in BLOCK_SKIPPING_CACHES.items():
                if hook_name in hooks:
                    return (
                        f"diffusers' {cache} skips or replays the computation of '{where}' on some steps, "
                        "but method='cache' runs that block on a different part of its tokens each step "
                        "and keeps its own residuals, so the two would mix token sets. Use one or the "
                        "other: model.disable_cache(), or tomediff.remove_tome(model)."
                    )
        return None
