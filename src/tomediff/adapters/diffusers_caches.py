"""Which of diffusers' caches (``model.enable_cache(...)``, ``diffusers.hooks.apply_*``) keep the output of
a module tomediff reduces, and what tomediff does about it.

diffusers attaches a cache as a named hook in a ``HookRegistry`` kept in a module's ``_diffusers_hook``
attribute; the hook replaces the module's forward, and on the steps it skips returns an output kept,
or computed from outputs kept, at earlier steps. tomediff's hooks are torch hooks, always outside that
forward: merged around the module, the kept outputs would be in the merged token order of the steps
that made them, and tomediff would unmerge them with the current step's plan (every token in the wrong
place, with no error).

So at such a site tomediff reduces *inside* the module instead, when it can: an attention's tokens are
reduced at its attention call (:attr:`~tomediff.core.Site.inside`, the attention-call site), and the
module's output keeps the full token order. Correctness: the cache then sees exactly the outputs the
unpatched module would give at the steps it computes, except that tomediff computed them with fewer
tokens, and what it replays (Pyramid Attention Broadcast), extrapolates (FasterCache) or forecasts
(TaylorSeer) at the other steps is its own rule applied to those full-order outputs. At a skipped
step the module does not compute, so nothing is reduced there. A site with no attention call inside
(a feed-forward merged with ``merge_mlp``, a cross-attention merged with ``merge_crossattn``) is
refused with :func:`_message`.

What diffusers 0.42 keeps, and where (default settings; custom identifiers can move the hooks):

* Pyramid Attention Broadcast (``pyramid_attention_broadcast``): attention outputs, replayed.
* FasterCache (``faster_cache_block``): self-attention outputs (SD3/Flux ``attn``, PixArt ``attn1``),
  extrapolated from the last two. Its model-level hook only approximates the unconditional half of
  the model output.
* TaylorSeer (``taylorseer_cache``): outputs of ``transformer_blocks.*attn`` (SD3, Flux) or of any
  module the identifiers name, forecast by a Taylor series; in lite mode zeros from the blocks and a
  forecast of the model's ``proj_out``, neither of which tomediff reduces.
* FirstBlockCache, MagCache, SeaCache: the residual of the whole block stack, taken from block
  inputs and outputs, which are never merged: they compose as they are (a skipped block runs no site).
* TextKVCache: text keys and values of NucleusMoE-Image blocks, computed once per prompt; tomediff
  reduces the image tokens at those blocks' attention calls, where the cached text keys only join the
  keys, so the two compose as they are.

``tests/test_cache_stacks.py`` stacks each with tomediff in both orders and removes each alone.

``method="cache"`` runs a whole block on a different subset of its image tokens from step to step and
keeps its own residuals (:class:`BlockCacheCheck`):

* FirstBlockCache and MagCache stack with it on the blocks between their head and tail. Those blocks
  either run whole or return their input untouched (the cache adds the stack's kept residual at the
  head); :class:`BlockSkipCheck` tells tomediff which, so a passed-through block makes no plan and its
  token cache waits for the next step it computes. The head and the tail are refused: the cache
  measures its residual from the head's input to the tail's output, inside their forwards, where
  tomediff would have handed them part of the tokens (leave them unpatched: ``skip_blocks=(1, 1)``).
* Every other cache that skips or replays a block or anything inside it (the attention caches, and
  SeaCache, which also gates on the stack's inner outputs) is refused on the blocks it patches.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "BLOCK_SKIPPING_CACHES",
    "OUTPUT_REPLAYING_CACHES",
    "BlockCacheCheck",
    "BlockSkipCheck",
    "ReplayedOutputCheck",
]

# diffusers' hook name -> the cache's name for messages: the caches that keep a module's output.
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

# Whole-stack caches whose inner blocks run whole or pass their input through, as the shared state their
# head block sets says (``should_compute``): cache name -> (head block's hook, every other block's hook).
PASS_THROUGH_CACHES = {
    "FirstBlockCache": ("fbc_leader_block_hook", "fbc_block_hook"),
    "MagCache": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
}


def _diffusers_hooks(module: nn.Module) -> dict[str, object]:
    """The named diffusers hooks on ``module`` (empty when none)."""
    hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
    return hooks if isinstance(hooks, dict) else {}


class ReplayedOutputCheck:
    """A :attr:`~tomediff.core.Site.conflict` check: a message when a diffusers cache returns outputs kept
    from earlier steps at the site or inside it, else None. Such a site is reduced inside its module
    (:attr:`~tomediff.core.Site.inside`) where it can be; else the message refuses it."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.name = name
        # (qualified name, module): the site and everything inside it, where a kept output would be
        # in merged token order.
        self.modules = tuple(
            (f"{name}.{inner}" if inner else name, sub) for inner, sub in module.named_modules()
        )

    def __call__(self) -> str | None:
        for where, module in self.modules:
            hooks = _diffusers_hooks(module)
            for hook_name, cache in OUTPUT_REPLAYING_CACHES.items():
                if hook_name in hooks:
                    return _message(cache, where)
        return None


def _message(cache: str, where: str) -> str:
    return (
        f"diffusers' {cache} keeps the output of '{where}' from earlier denoising steps and returns it "
        "(or a forecast from it) on the steps it skips, but tomediff merges the tokens of that module "
        "with a plan that changes every step and has no attention call inside it to reduce instead, so "
        "a kept output would be unmerged into the wrong places. Leave that module unmerged (e.g. "
        "merge_mlp=False, merge_crossattn=False), point the cache elsewhere (its identifiers), or use "
        "one or the other: model.disable_cache() (or tomediff.remove_tome(model))."
    )


def _pass_through_hook(block: nn.Module) -> tuple[str, object, str] | None:
    """(cache, its hook, the block's role in it: ``"head"``, ``"tail"`` or ``"inner"``) when a
    pass-through cache sits on ``block``, else None."""
    hooks = _diffusers_hooks(block)
    for cache, (head, inner) in PASS_THROUGH_CACHES.items():
        if head in hooks:
            return cache, hooks[head], "head"
        if inner in hooks:
            return cache, hooks[inner], "tail" if getattr(hooks[inner], "is_tail", False) else "inner"
    return None


class BlockCacheCheck:
    """The :attr:`~tomediff.core.Site.conflict` check of a block site (``method="cache"``): the message
    refusing a block at which (or inside which) a diffusers cache skips or replays computation in a way
    token caching cannot follow, else None. The inner blocks of a pass-through cache
    (:data:`PASS_THROUGH_CACHES`) are accepted: :class:`BlockSkipCheck` follows them."""

    def __init__(self, block: nn.Module, name: str) -> None:
        self.block = block
        self.name = name
        self.modules = tuple(
            (f"{name}.{inner}" if inner else name, sub) for inner, sub in block.named_modules()
        )

    def __call__(self) -> str | None:
        stack = _pass_through_hook(self.block)
        if stack is not None and stack[2] != "inner":
            return (
                f"diffusers' {stack[0]} measures the residual of the whole block stack from the input of "
                f"its head block to the output of its tail block, inside their forwards, and '{self.name}' "
                f"is its {stack[2]}: method='cache' would hand that block part of its tokens. Leave the head "
                "and tail blocks unpatched (e.g. skip_blocks=(1, 1)); token caching then runs in the blocks "
                "between, at the steps the cache computes."
            )
        for where, module in self.modules:
            hooks = _diffusers_hooks(module)
            if stack is not None and module is self.block:
                hooks = {k: v for k, v in hooks.items() if k not in PASS_THROUGH_CACHES[stack[0]]}
            for hook_name, cache in BLOCK_SKIPPING_CACHES.items():
                if hook_name in hooks:
                    return (
                        f"diffusers' {cache} skips or replays the computation of '{where}' on some steps, "
                        "but method='cache' runs that block on a different part of its tokens each step "
                        "and keeps its own residuals, so the two would mix token sets. Use one or the "
                        "other (model.disable_cache(), or tomediff.remove_tome(model)); FirstBlockCache and "
                        "MagCache stack with it."
                    )
        return None


class BlockSkipCheck:
    """The :attr:`~tomediff.core.Site.skipped` check of a block site: True when a pass-through cache
    (:data:`PASS_THROUGH_CACHES`) returns the block's input at this call without running it, as its
    head block decided for this step."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self) -> bool:
        stack = _pass_through_hook(self.block)
        if stack is None or stack[2] != "inner":
            return False
        manager = getattr(stack[1], "state_manager", None)
        if manager is None or getattr(manager, "_context", None) is None:
            return False  # no step started yet: the head block sets the context first
        return getattr(manager.get_state(), "should_compute", True) is False
