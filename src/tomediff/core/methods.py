"""The two seams every token-reduction method plugs into.

* A :class:`Reducer` decides what plan a block call gets: ToMe's similarity matching
  (:class:`MatchReducer`), a downsampled grid (:class:`DownsampleReducer`), or an earlier plan
  (:class:`ReusingReducer`, wrapping another reducer). Merging and downsampling wrap theirs in a
  :class:`GroupedReducer`, which plans a call holding several images (an edit model's reference
  images) one image at a time, the references at ``reference_ratio``.
* A :class:`SiteAction` decides what happens around a submodule of the block with that plan: merge
  its input and unmerge its output (:class:`MergeAction`), or keep the queries and pass reduced keys
  and values (:class:`KeyValueAction`); a method may also act around the whole block (its
  ``block_action``, on the block site an adapter declares), as token caching does
  (:class:`tomediff.core.token_cache.BlockCacheAction` with a :class:`TokenCacheReducer`, and
  :class:`~tomediff.core.token_cache.CachedKeysAction` on its attention modules).

The hooks call these through the :class:`Method` a config builds (:func:`build_method`) and know
neither by name. Reducers live in :mod:`tomediff.core.reducers`, actions in
:mod:`tomediff.core.actions`; this module pairs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tomediff.config import ToMeConfig
from tomediff.core.actions import (
    ImageTokensMergeAction,
    KeyValueAction,
    MergeAction,
    ReduceInputAction,
    SiteAction,
)
from tomediff.core.attention import AttentionCallAction, AttentionReducer
from tomediff.core.reducers import (
    DownsampleReducer,
    GroupedReducer,
    MatchReducer,
    PlanRequest,
    Reducer,
    ReusingReducer,
    cached,
)
from tomediff.core.spec import BlockSpec, Site, SiteKind
from tomediff.core.token_cache import BlockCacheAction, CachedKeysAction, TokenCacheReducer
from tomediff.errors import ConfigError, NothingToPatchError

__all__ = [
    "DownsampleReducer",
    "GroupedReducer",
    "ImageTokensMergeAction",
    "KeyValueAction",
    "MatchReducer",
    "MergeAction",
    "Method",
    "PlanRequest",
    "ReduceInputAction",
    "Reducer",
    "ReusingReducer",
    "SiteAction",
    "TokenCacheReducer",
    "build_method",
    "cached",
]


@dataclass(frozen=True)
class Method:
    """A reducer and the action each enabled site kind gets (adjusted per site by
    :meth:`SiteAction.for_site`); ``block_action``, when set, acts around every block itself (on its
    :attr:`BlockSpec.block_site`) and ``actions`` is then usually empty."""

    reducer: Reducer
    actions: Mapping[SiteKind, SiteAction]
    block_action: SiteAction | None = None

    def action_for(self, site: Site, block_name: str) -> SiteAction | None:
        """The action ``site`` gets, or None when the method leaves it alone."""
        action = self.actions.get(site.kind)
        return None if action is None else action.for_site(site, block_name)

    def block_action_for(self, spec: BlockSpec) -> SiteAction | None:
        """The action around the block ``spec`` itself, or None when the method has none."""
        if self.block_action is None:
            return None
        if spec.block_site is None:
            raise ConfigError(
                f"this method acts around whole blocks, but the model's adapter declares no block-level "
                f"layout for block '{spec.name}' ({type(spec.block).__name__}): where its image tokens are "
                "in its input and output is not known. method='cache' supports the blocks of Flux.1 and "
                "SD3 and every BasicTransformerBlock (PixArt, DiT, UNets); use method='merge' for this one."
            )
        return self.block_action.for_site(spec.block_site, spec.name)

    def inside_action_for(self, site: Site, block_name: str) -> SiteAction | None:
        """The action of ``site.inside`` (reducing inside the module, at its attention call) that takes
        over from ``site`` while a cache keeps the module's output, or None when there is none."""
        if site.inside is None:
            return None
        action = self.action_for(site.inside, block_name)
        return action if action is not None and action.uses_output else None

    def check(self, specs: Sequence[BlockSpec]) -> None:
        """Raise :class:`ConfigError` now (before anything is hooked) for a site the method cannot
        act on, and :class:`NothingToPatchError` when it acts on none of them."""
        acting = [self.action_for(site, spec.name) for spec in specs for site in spec.sites]
        acting += [self.block_action_for(spec) for spec in specs]
        if specs and not any(action is not None for action in acting):
            kinds = sorted(self.actions)
            raise NothingToPatchError(
                f"the method's settings act on none of the {kinds} sites of the {len(specs)} selected "
                "blocks (e.g. kv_ratio needs attention-call sites, which this model's adapter does not "
                "declare); use the default settings for this model, or another site switch."
            )

    def conflict(self, specs: Sequence[BlockSpec]) -> str | None:
        """The message of the first site whose output the method unmerges, which cannot be reduced
        inside instead (:attr:`Site.inside`), and whose :attr:`Site.conflict` check refuses it now (e.g.
        a cache replaying its output), else None."""
        for spec in specs:
            # The block site first: it runs first, and its message speaks for the whole block.
            for site in (spec.block_site, *spec.sites):
                if site is None or site.conflict is None:
                    continue
                if site.role == "block":
                    action = self.block_action_for(spec)
                else:
                    action = self.action_for(site, spec.name)
                if action is None or not action.uses_output:
                    continue
                if site.role != "block" and self.inside_action_for(site, spec.name) is not None:
                    continue  # reduced inside instead
                if (reason := site.conflict()) is not None:
                    return reason
        return None


def build_method(config: ToMeConfig, enabled: set[SiteKind], reducer: Reducer | None = None) -> Method:
    """The method ``config`` describes. ``reducer`` replaces the config's reducer (benchmark
    references, research methods); its plans must suit the config's site actions."""
    if config.method == "cache":
        if reducer is not None:
            raise ConfigError(
                "method='cache' plans with its own reducer (the tokens to recompute, from its cache); "
                "apply_reducer takes method='merge' or 'downsample'."
            )
        # cache_context="all": the block's attention modules add the kept keys/values of the others
        # (none with cache_ratio=0: no image token's output is computed between refreshes).
        keys: dict[SiteKind, SiteAction] = (
            {"attn": CachedKeysAction()} if config.cache_context == "all" and config.cache_ratio > 0 else {}
        )
        return Method(TokenCacheReducer(config), keys, BlockCacheAction())
    if config.method == "downsample":
        # Each image of a call (an edit model's references) is downsampled on its own grid.
        base: Reducer = GroupedReducer(reducer or DownsampleReducer(config))
        action = KeyValueAction(AttentionCallAction(reduce_queries=False))
        return Method(base, {"attn": action} if "attn" in enabled else {})
    # A given reducer is reused like the built-in matching: reuse_level/reuse_steps apply to it too.
    matching = reducer if reducer is not None else MatchReducer(config)
    base = matching
    separate_kv = config.kv_ratio is not None
    if separate_kv:  # two plans per block call (queries, keys/values); reused together
        base = AttentionReducer(base, config.kv_ratio)  # type: ignore[arg-type]
    # Reference images (edit models) are planned on their own, at reference_ratio when it is set.
    reference_ratio = config.reference_ratio
    base = GroupedReducer(base, None if reference_ratio is None else matching, reference_ratio)
    if config.reuse_level or config.reuse_steps > 1:
        base = ReusingReducer(base, config.reuse_level, config.reuse_steps)
    merge = MergeAction(AttentionCallAction(reduce_queries=True), separate_kv=separate_kv)
    return Method(base, dict.fromkeys(enabled, merge))
