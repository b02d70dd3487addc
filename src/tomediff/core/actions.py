"""Site actions: what happens around a submodule of a block that has a plan.

* :class:`MergeAction`: merge the input (and a self-attention mask), unmerge the output (ToMe).
* :class:`KeyValueAction`: keep every query, pass reduced keys/values as the context (ToDo).
* :class:`ImageTokensMergeAction`: merge only the trailing image tokens, with their rotary rows (Flux).
* :class:`ReduceInputAction`: reduce a key or value projection's input (ToDo on joint attention).

:meth:`SiteAction.for_site` picks the variant a site's role and layout need.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tomediff.core.calls import Args, Kwargs, find_input, forward_parameters, replace_input
from tomediff.core.spec import Site
from tomediff.errors import ConfigError, MergeCallError
from tomediff.ops import GridDownsample, TokenPlan, merge_trailing, reduce_rotary, unmerge_trailing

__all__ = [
    "ImageTokensMergeAction",
    "KeyValueAction",
    "MergeAction",
    "ReduceInputAction",
    "SiteAction",
]


class SiteAction:
    """What happens around one submodule of a block that has a plan.

    Attributes:
        uses_output: whether :meth:`after` needs the plan (it is kept alive until then).
        after_on_error: :meth:`after` also runs when the submodule raises (to undo what :meth:`before`
            set up around the call).
    """

    uses_output: ClassVar[bool] = True
    after_on_error: ClassVar[bool] = False

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        """The action for ``site`` (by its role and layout): this one, a variant, or None to leave the
        site alone. Raises :class:`ConfigError` when the method cannot act on such a site."""
        return self

    def before(
        self, plan: Any, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs] | None:
        """New ``(args, kwargs)`` for the submodule, or None to leave them."""
        raise NotImplementedError

    def after(self, plan: Any, output: Any) -> Any:
        """The submodule's new output, or None to leave it."""
        return None


def _token_input(
    plan: Any, site: Site, block_name: str, args: Args, kwargs: Kwargs
) -> tuple[int | str, torch.Tensor]:
    where, x = find_input(args, kwargs, site.input_names)
    if where is None or not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != plan.num_tokens:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MergeCallError(
            f"tomediff cannot reduce the input of the {site.kind} site in block '{block_name}': "
            f"expected [batch, {plan.num_tokens}, channels], got {shape}."
        )
    return where, x


def _is_self_attention(site: Site, kwargs: Kwargs) -> bool:
    return not any(kwargs.get(name) is not None for name in site.context_names)


class MergeAction(SiteAction):
    """Merge the input (and a self-attention mask) with the plan; unmerge ``output`` / ``output[0]``.

    ``attention_call``: the action of ``"call"`` sites (merging at the attention call itself), or None to
    leave them alone. ``separate_kv``: keys/values are reduced apart from the queries (``kv_ratio``), which
    only the attention call can do, so block-level attention sites are then left to it."""

    def __init__(self, attention_call: SiteAction | None = None, separate_kv: bool = False) -> None:
        self.attention_call = attention_call
        self.separate_kv = separate_kv

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        if site.role == "key_value":  # merging reduces the whole attention at its own site
            return None
        if site.role == "call":
            if site.call_only_for_kv and not self.separate_kv:
                return None
            return self.attention_call
        if self.separate_kv:  # block-level sites merge queries and keys/values alike
            return None
        if site.text_first or site.rotary_names:
            return ImageTokensMergeAction()
        return self

    def before(
        self, plan: TokenPlan, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        where, x = _token_input(plan, site, block_name, args, kwargs)
        args, kwargs = replace_input(args, kwargs, where, plan.merge(x))
        if _is_self_attention(site, kwargs):
            for name in site.mask_names:
                mask = kwargs.get(name)
                if isinstance(mask, torch.Tensor):
                    kwargs = {**kwargs, name: _merge_mask(mask, plan)}
        return args, kwargs

    def after(self, plan: TokenPlan, output: Any) -> Any:
        if isinstance(output, tuple):
            return (plan.unmerge(output[0]), *output[1:])
        return plan.unmerge(output)


def _merge_mask(mask: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    n = plan.num_tokens
    if mask.dim() >= 2 and mask.shape[-1] == n:
        mask = plan.merge_mask(mask, -1)
    if mask.dim() >= 3 and mask.shape[-2] == n:
        mask = plan.merge_mask(mask, -2)
    return mask


class KeyValueAction(SiteAction):
    """Self-attention with every query and the plan's reduced tokens as keys and values, passed as
    the module's context argument (``encoder_hidden_states`` in diffusers, ``context`` in LDM)."""

    uses_output = False

    def __init__(self, attention_call: SiteAction | None = None) -> None:
        self._context_names: dict[int, str] = {}
        self.attention_call = attention_call

    def for_site(self, site: Site, block_name: str) -> SiteAction | None:
        if site.role == "key_value":
            return ReduceInputAction()
        if site.role == "call":
            return self.attention_call
        if site.role == "tokens":
            if getattr(site.module, "is_cross_attention", False):  # diffusers' only_cross_attention
                raise ConfigError(
                    f"method='downsample' reduces self-attention keys and values, but the {site.kind} site "
                    f"of block '{block_name}' is a cross-attention (the block was built with "
                    "only_cross_attention=True): its keys come from the text. Use method='merge'."
                )
            return self
        if site.rotary_names and self.attention_call is None:
            raise ConfigError(
                f"method='downsample' cannot reduce the keys and values of the {site.kind} site of block "
                f"'{block_name}' ({type(site.module).__name__}): its attention processor applies one "
                "rotary position table to queries and keys alike, so keys from a downsampled grid cannot "
                "keep their own positions from outside the processor. Use method='merge' for this model."
            )
        return None  # an attention computing its keys inside: its key_value sites are reduced

    def before(
        self, plan: GridDownsample, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        _, x = _token_input(plan, site, block_name, args, kwargs)
        if not _is_self_attention(site, kwargs) or len(args) > 1:
            raise MergeCallError(
                f"method='downsample' reduces self-attention keys and values, but the {site.kind} site of "
                f"block '{block_name}' was given its own context (cross-attention); use method='merge' "
                "for this model."
            )
        for name in site.mask_names:
            mask = kwargs.get(name)
            if isinstance(mask, torch.Tensor) and mask.shape[-1] == plan.num_tokens:
                raise MergeCallError(
                    f"method='downsample' cannot reduce the attention mask '{name}' given to block "
                    f"'{block_name}' (its key axis has {plan.num_tokens} tokens); use method='merge'."
                )
        return args, {**kwargs, self._context_name(site): plan.reduce(x)}

    def _context_name(self, site: Site) -> str:
        name = self._context_names.get(id(site.module))
        if name is None:
            name = self._context_names[id(site.module)] = _accepted_name(site.module, site.context_names)
        return name


def _accepted_name(module: nn.Module, names: tuple[str, ...]) -> str:
    """The first of ``names`` that ``module.forward`` takes as a parameter (the first one when it
    takes ``**kwargs`` or its signature cannot be read)."""
    taken = {p.name for p in forward_parameters(module) or ()}
    return next((name for name in names if name in taken), names[0])


class ImageTokensMergeAction(SiteAction):
    """Merge only the image tokens of a site: the last ``N`` of its token input (after text tokens,
    for Flux's single-stream blocks), with the rotary table's image rows reduced alike, so every kept
    token attends with its own position (a merged token with its dst's); unmerge the last tokens of
    ``output`` / ``output[0]``. Needs a plan with ``positions`` when a rotary table is passed."""

    def before(
        self, plan: TokenPlan, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        where, x = find_input(args, kwargs, site.input_names)
        num = plan.num_tokens
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or (x.shape[1] != num and not site.text_first):
            _token_input(plan, site, block_name, args, kwargs)  # raises with the shapes
            raise AssertionError("unreachable: _token_input accepts only [batch, N, channels] inputs")
        prefix = int(x.shape[1]) - num
        if prefix < 0:
            raise MergeCallError(
                f"tomediff cannot reduce the input of the {site.kind} site in block '{block_name}': it "
                f"has {x.shape[1]} tokens, fewer than the block's {num} image tokens."
            )
        if len(args) > 1 and site.rotary_names:
            raise MergeCallError(
                f"the {site.kind} site of block '{block_name}' was called with positional arguments after "
                "its tokens; tomediff finds its rotary table only by keyword "
                f"({', '.join(site.rotary_names)})."
            )
        for name in site.mask_names:
            if isinstance(kwargs.get(name), torch.Tensor):
                raise MergeCallError(
                    f"tomediff cannot merge the image tokens of block '{block_name}' under the attention "
                    f"mask '{name}' (its rows mix text and image tokens); call the model without it, or "
                    "apply tomediff with merge_attn=False."
                )
        assert where is not None
        args, kwargs = replace_input(args, kwargs, where, merge_trailing(x, plan, prefix))
        for name in site.rotary_names:
            table = kwargs.get(name)
            if table is None:
                continue
            positions = getattr(plan, "positions", None)
            if positions is None:
                raise MergeCallError(
                    f"block '{block_name}' passes rotary positions ('{name}') shared by the batch, but its "
                    f"plan ({type(plan).__name__}) reduces samples differently and has no positions; "
                    "a reducer for such blocks must honour PlanRequest.batch_shared."
                )
            rows = [t.shape[0] for t in (table if isinstance(table, tuple) else (table,))]
            if any(r < num for r in rows):
                raise MergeCallError(
                    f"the rotary table '{name}' of block '{block_name}' has {rows} rows, fewer than its "
                    f"{num} image tokens; tomediff expects [text rows, image rows]."
                )
            kwargs = {**kwargs, name: reduce_rotary(table, positions, num)}
        return args, kwargs

    def after(self, plan: TokenPlan, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        restored = unmerge_trailing(first, plan, int(first.shape[1]) - plan.num_merged)
        return (restored, *output[1:]) if isinstance(output, tuple) else restored


class ReduceInputAction(SiteAction):
    """Replace a key or value projection's input by the plan's reduced tokens (``plan.reduce``): the
    attention around it then has every query and fewer image keys/values; its other inputs (text)
    are untouched."""

    uses_output = False

    def before(
        self, plan: GridDownsample, site: Site, block_name: str, args: Args, kwargs: Kwargs
    ) -> tuple[Args, Kwargs]:
        where, x = _token_input(plan, site, block_name, args, kwargs)
        return replace_input(args, kwargs, where, plan.reduce(x))
