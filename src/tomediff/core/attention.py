"""The attention-call site: token reduction inside an attention module, at its attention call.

Modern diffusion transformers compute queries, keys and values in the attention processor, apply their
rotary positions there, and only then call attention. A hook around the module cannot reach that point,
so :class:`AttentionCallAction` pushes a :class:`torch.overrides.TorchFunctionMode` for the duration of
the module's call: it sees every ``F.scaled_dot_product_attention`` made inside (diffusers' ``native``
attention backend, and processors calling SDPA themselves) and reduces its image tokens with the block's
plan (:func:`tomediff.ops.reduced_attention`). Torch-function modes are per thread, so concurrent calls
of one module never see each other's plans; the mode is popped when the module returns or raises, so
nothing is left behind.

Attention computed any other way (flash-attn, SageAttention or xFormers backends) is never seen; the
site then raises instead of silently reducing nothing.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tomediff.core.actions import SiteAction
from tomediff.core.calls import Args, Kwargs
from tomediff.core.parallel import ulysses_group
from tomediff.core.reducers import PlanRequest, Reducer, WrappingReducer
from tomediff.core.selection import LevelSetting
from tomediff.core.spec import Site
from tomediff.errors import MergeCallError
from tomediff.ops import AttentionPlan, paired_plan, reduced_attention

if TYPE_CHECKING:
    from tomediff.core.state import ToMeState

__all__ = [
    "SDPA_PARAMETERS",
    "AttentionCallAction",
    "AttentionReducer",
    "PendingPlan",
    "attention_plan",
    "pop_own_mode",
]

# F.scaled_dot_product_attention's parameters in order; the first four are the tensors reduced.
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_plan(plan: Any, reduce_queries: bool) -> AttentionPlan:
    """The :class:`AttentionPlan` a block plan means at an attention call: itself; a downsampled grid
    (``reduce``) for the keys/values only; a merge plan for the keys/values, and for the queries when
    ``reduce_queries``."""
    if isinstance(plan, AttentionPlan):
        return plan
    if hasattr(plan, "reduce"):
        return AttentionPlan(None, plan)
    return AttentionPlan(plan if reduce_queries else None, plan)


# torch.Tensor methods written in Python (Tensor.unflatten, ...), by function: their names. Called as
# methods from the mode, torch.compile traces most of them as such instead of their Python bodies.
_PYTHON_TENSOR_METHODS = {
    f: name for name, f in vars(torch.Tensor).items() if isinstance(f, types.FunctionType)
}


class PendingPlan:
    """A block's plan, made by ``make`` only when the module's first attention call needs it: a cache
    that returns a kept output instead of computing the module then costs no matching either."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


class _AttentionCallMode(TorchFunctionMode):
    """Reduces the image tokens of the SDPA calls made while it is on the stack (one module call)."""

    def __init__(
        self, plan: AttentionPlan | PendingPlan, reduce_queries: bool, site: Site, block_name: str
    ) -> None:
        super().__init__()
        self._plan: AttentionPlan | PendingPlan | None = plan
        self.reduce_queries = reduce_queries
        self.site = site
        self.block_name = block_name
        self.calls = 0
        self.projected = False  # a linear layer ran: the module computed (else a cache returned for it)

    def __torch_function__(self, func: Any, types: Any, args: Args = (), kwargs: Kwargs | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            if func is F.linear:
                self.projected = True
            # Tensor.unflatten's Python body calls super(), which torch.compile cannot trace inside the mode:
            # the builtin torch.unflatten does the same (an identity test, not a dict lookup, so that dynamo
            # resolves it while tracing).
            if func is torch.Tensor.unflatten:
                return torch.unflatten(*args, **kwargs)
            method = _PYTHON_TENSOR_METHODS.get(func)
            if method is not None and args and isinstance(args[0], torch.Tensor):
                return getattr(args[0], method)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        options = {**kwargs, **dict(zip(SDPA_PARAMETERS, args, strict=False))}
        values = {name: options.pop(name, None) for name in SDPA_PARAMETERS[:4]}
        query, key, value = values["query"], values["key"], values["value"]
        queries = int(query.shape[-2])
        extra = key.shape[-2] != queries
        if extra and not (self.site.extra_keys and key.shape[-2] > queries):
            # A cross-attention inside the module: keys are not its tokens.
            return func(query, key, value, attn_mask=values["attn_mask"], **options)
        plan = self._resolve_plan()
        if extra and plan is not None and queries < plan.num_tokens:  # a cross-attention after all
            return func(query, key, value, attn_mask=values["attn_mask"], **options)
        self.calls += 1
        if plan is None:  # the reducer reduces nothing in this block call
            return func(query, key, value, attn_mask=values["attn_mask"], **options)
        plan = self._call_plan(plan, query)
        # With extra keys before them, the image tokens are the last queries and the last keys.
        query_start = queries - plan.num_tokens if extra else None
        start = self._image_start(plan, key)
        if options.get("is_causal"):
            raise MergeCallError(
                f"tomediff cannot reduce the causal attention of block '{self.block_name}' (is_causal=True)."
            )
        return reduced_attention(
            func, plan, start, query, key, value, values["attn_mask"], query_start, **options
        )

    def _resolve_plan(self) -> AttentionPlan | None:
        if isinstance(self._plan, PendingPlan):  # made here, outside this mode (it is off in its handler)
            made = self._plan.make()
            self._plan = None if made is None else attention_plan(made, self.reduce_queries)
        return self._plan

    def _call_plan(self, plan: AttentionPlan, query: torch.Tensor) -> AttentionPlan:
        """The plan of this attention call: the block's, or for a site whose attention runs once per
        sample (``per_sample``), the plan of the sample this call is for (calls come in batch order)."""
        if not (self.site.per_sample and query.shape[0] == 1 and plan.batch > 1):
            return plan
        if self.calls > plan.batch:
            raise MergeCallError(
                f"tomediff expected the attention of block '{self.block_name}' to be called once per "
                f"sample ({plan.batch} calls), but it was called {self.calls} times."
            )
        return plan.sample(self.calls - 1)

    def _image_start(self, plan: AttentionPlan, key: torch.Tensor) -> int:
        """Where the image tokens start in the keys (and in the queries, unless there are fewer)."""
        site = self.site
        num, seq = plan.num_tokens, int(key.shape[-2])
        if (
            key.dim() != 4
            or key.shape[0] != plan.batch
            or seq < num
            # The site's layout first: Mochi's per-sample key count depends on its caption's mask,
            # which torch.compile cannot compare with ``num`` (a data-dependent size).
            or (not (site.text_first or site.image_first) and seq != num)
        ):
            raise MergeCallError(
                f"tomediff cannot reduce the attention call of the {site.kind} site in block "
                f"'{self.block_name}': it expected keys [batch={plan.batch}, heads, {num} image tokens"
                f"{' + others' if site.text_first or site.image_first else ''}, dim], got "
                f"{tuple(key.shape)}."
            )
        return 0 if site.image_first else seq - num


_Mode = TypeVar("_Mode", bound=TorchFunctionMode)


def pop_own_mode(kind: type[_Mode], doing: str) -> _Mode:
    """Pop the torch function mode a site action pushed around its module (of type ``kind``); raise
    :class:`MergeCallError`, leaving the stack as it was, when another mode is on top of it."""
    mode = torch._C._pop_torch_function_stack()
    if not isinstance(mode, kind):  # someone else's mode on top: put it back
        torch._C._push_on_torch_function_stack(mode)
        raise MergeCallError(
            f"tomediff found a torch function mode ({type(mode).__name__}) left on the stack by an "
            f"attention module it {doing}; modes pushed inside the module must be popped inside it."
        )
    return mode


class AttentionCallAction(SiteAction):
    """Reduce the image tokens at the attention call(s) of an attention module: fewer keys/values, and
    with ``reduce_queries`` fewer queries (merged, outputs copied back). See the module docstring."""

    uses_output: ClassVar[bool] = True
    after_on_error: ClassVar[bool] = True

    def __init__(self, reduce_queries: bool) -> None:
        self.reduce_queries = reduce_queries

    def before(self, plan: Any, site: Site, block_name: str, args: Args, kwargs: Kwargs) -> None:
        ulysses_group((site,), block_name)  # raises for the parallel settings it cannot reduce under
        if not isinstance(plan, PendingPlan):
            plan = attention_plan(plan, self.reduce_queries)
        mode = _AttentionCallMode(plan, self.reduce_queries, site, block_name)
        torch._C._push_on_torch_function_stack(mode)
        return None

    def after(self, plan: Any, output: Any) -> Any:
        mode = pop_own_mode(_AttentionCallMode, "reduces")
        # No attention call and no projection: the module did not compute (a cache such as Pyramid
        # Attention Broadcast returned a kept or forecast output for it), so there was nothing to reduce.
        # A module that computed without an SDPA call uses another attention backend: refused.
        if mode.calls == 0 and mode.projected:
            raise MergeCallError(
                f"tomediff saw no attention call (torch.nn.functional.scaled_dot_product_attention) inside "
                f"the {mode.site.kind} site of block '{mode.block_name}' "
                f"({type(mode.site.module).__name__}), so it reduced nothing there: its attention backend "
                "computes attention another way. Use "
                "diffusers' native backend (model.reset_attention_backend() or "
                "model.set_attention_backend('native')) with tomediff."
            )
        return None


class AttentionReducer(WrappingReducer):
    """Two plans of one block call from ``inner``: the queries' at ``ratio`` and the keys/values' at
    ``kv_ratio`` (one plan when equal), as an :class:`AttentionPlan` (asymmetric reduction, AsymRnR)."""

    def __init__(self, inner: Reducer, kv_ratio: float) -> None:
        super().__init__(inner)
        self.kv_ratio = kv_ratio

    def plan(self, state: ToMeState, request: PlanRequest) -> AttentionPlan | None:
        def plan_at(ratio: float) -> Any:
            if ratio != request.setting.ratio:
                request_at = dataclasses.replace(request, setting=LevelSetting(ratio, request.setting.factor))
                return self.inner.plan(state, request_at)
            return self.inner.plan(state, request)

        # kv_ratio 0 keeps every key/value (None would mean "as the queries", not the case here).
        return paired_plan(plan_at, request.setting.ratio, self.kv_ratio)

    def nothing_reason(self, request: PlanRequest) -> str | None:
        if request.setting.ratio == 0 and self.kv_ratio == 0:
            return None
        return self.inner.nothing_reason(
            dataclasses.replace(
                request,
                setting=LevelSetting(max(request.setting.ratio, self.kv_ratio), request.setting.factor),
            )
        )
