"""Public API: apply and remove token merging, the handle and its report, tomesd-compatible calls."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from torch import nn
from torch.utils.hooks import RemovableHandle

from tomediff.adapters import find_adapter, pipeline_caller, resolve_model
from tomediff.adapters.base import patched_by_tomesd
from tomediff.config import ToMeConfig, check_seed
from tomediff.core import BlockSpec, BlockStats, PlanEvent, ToMeState, install, remove_hooks
from tomediff.core.hooks import has_hooks, save_hooks
from tomediff.core.methods import Reducer, build_method
from tomediff.core.selection import Selection
from tomediff.core.spec import Caller
from tomediff.errors import ConflictingPatchError, NothingToPatchError, UnknownOptionError

__all__ = [
    "BlockReport",
    "ToMeHandle",
    "ToMeReport",
    "apply_patch",
    "apply_reducer",
    "apply_tome",
    "remove_patch",
    "remove_tome",
    "tome",
]


@dataclass(frozen=True)
class BlockReport:
    """One patched block: where it sits and what its last call did (None before any call)."""

    name: str
    downsample: int | None
    sites: tuple[str, ...]
    last_call: BlockStats | None


@dataclass(frozen=True)
class ToMeReport:
    """What a patch does: the adapter used, the level limit, and every patched block."""

    model: str
    adapter: str
    config: ToMeConfig
    max_downsample: int
    levels_found: tuple[int, ...]
    blocks: tuple[BlockReport, ...]
    calls: int
    partition: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def effective_ratio(self) -> float | None:
        """Tokens removed / tokens seen, over the blocks of the last call (None before a call)."""
        seen = [b.last_call for b in self.blocks if b.last_call is not None]
        total = sum(s.tokens for s in seen)
        return sum(s.removed for s in seen) / total if total else None

    def __str__(self) -> str:
        lines = [
            f"tomediff on {self.model} (adapter {self.adapter}): "
            f"{_describe_method(self.config, self.partition)}, "
            f"max_downsample={self.max_downsample} (levels with transformer blocks: "
            f"{list(self.levels_found) or 'found at call time'}), {len(self.blocks)} blocks patched, "
            f"{self.calls} calls so far",
            f"{'block':<58} {'level':>5} {'sites':<20} {'grid':>9} {'tokens':>7} {'reduced':>7} {'r':>6}",
        ]
        for block in self.blocks:
            stats = block.last_call
            level: int | str | None = block.downsample
            if level is None:  # told at call time (the generic adapter)
                level = stats.downsample if stats is not None and stats.downsample is not None else "?"
            if stats is None:
                tail = f"{'-':>9} {'-':>7} {'-':>7} {'-':>6}"
            else:
                grid = f"{stats.height}x{stats.width}"
                grid += "".join(f"+{'x'.join(map(str, g[-2:]))}" for g in stats.other_grids)
                tail = f"{grid:>9} {stats.tokens:>7} {stats.tokens_after_merge:>7} {stats.removed:>6}"
            lines.append(f"{block.name:<58} {level!s:>5} {','.join(block.sites):<20} {tail}")
        ratio = self.effective_ratio
        if ratio is not None and self.config.method == "cache":
            lines.append(f"image tokens filled from the cache over the last call: {ratio:.3f}")
        elif ratio is not None and self.config.method == "downsample":
            lines.append(
                f"key/value tokens removed over the last call: {ratio:.3f} (every query is kept: 'reduced' "
                "counts the keys/values of self-attention)"
            )
        elif ratio is not None:
            lines.append(f"effective ratio over the last call: {ratio:.3f}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _describe_method(cfg: ToMeConfig, partition: str | None = None) -> str:
    """The settings that matter for ``cfg.method``, for the report's first line; ``partition`` is the
    partition the last call used with ``use_rand`` (random, or top-left for an odd batch)."""
    if cfg.method == "cache":
        parts = [
            "method=cache (token-wise caching of whole blocks' residuals)",
            f"cache_interval={cfg.cache_interval}",
            f"cache_ratio={cfg.cache_ratio}",
            f"cache_select={cfg.cache_select}",
            f"cache_context={cfg.cache_context}",
            f"cache_forecast={cfg.cache_forecast}",
        ]
    elif cfg.method == "downsample":
        parts = [
            "method=downsample (keys/values of self-attention from a downsampled grid)",
            f"downsample_factor={cfg.downsample_factor}",
            f"downsample_factor_next={cfg.downsample_factor_next}",
            f"downsample_mode={cfg.downsample_mode}",
        ]
        if cfg.downsample_factor_time > 1:
            parts.append(f"downsample_factor_time={cfg.downsample_factor_time}")
    else:
        ratio = (
            f"level_ratios={dict(cfg.level_ratios)}" if cfg.level_ratios is not None else f"ratio={cfg.ratio}"
        )
        rand = f"use_rand={cfg.use_rand}"
        if cfg.use_rand and partition is not None:
            rand += f" (last call: {partition} partition"
            if partition.startswith("top-left"):
                rand += ", as tomesd: guidance halves may run as separate calls"
            rand += ")"
        parts = [
            f"method=merge, {ratio}",
            rand,
            f"sx={cfg.sx}, sy={cfg.sy}" + (f", st={cfg.st}" if cfg.st > 1 else ""),
        ]
        if cfg.kv_ratio is not None:
            parts.insert(1, f"kv_ratio={cfg.kv_ratio} (keys/values merged apart from the queries)")
        if cfg.reference_ratio is not None:
            parts.insert(1, f"reference_ratio={cfg.reference_ratio} (edit models' reference-image tokens)")
        reuse = [f"reuse_level={cfg.reuse_level}"] if cfg.reuse_level else []
        reuse += [f"reuse_steps={cfg.reuse_steps}"] if cfg.reuse_steps > 1 else []
        reuse += [f"reuse_cfg={cfg.reuse_cfg}, cfg_layout={cfg.cfg_layout}"] if cfg.reuse_cfg else []
        parts += reuse
    if cfg.min_tokens:
        parts.append(f"min_tokens={cfg.min_tokens}")
    if cfg.skip_blocks != (0, 0):
        parts.append(f"skip_blocks={cfg.skip_blocks} (first, last blocks left unreduced)")
    if cfg.start > 0 or cfg.stop < 1:
        closing = "]" if cfg.stop == 1 else ")"
        parts.append(f"active for denoising progress in [{cfg.start:g}, {cfg.stop:g}{closing}")
    return ", ".join(parts)


class ToMeHandle:
    """Returned by :func:`apply_tome`: removes the patch and reports what it does."""

    def __init__(
        self,
        model: nn.Module,
        state: ToMeState,
        specs: list[BlockSpec],
        adapter: str,
        levels: tuple[int, ...],
        handles: list[RemovableHandle],
    ) -> None:
        self.model = model
        self.state = state
        self.adapter = adapter
        self._specs = specs
        self._levels = levels
        self._handles = handles
        method = state.method
        self._sites = {
            spec.name: tuple(dict.fromkeys(s.kind for s in spec.sites if method.action_for(s, spec.name)))
            + (("block",) if method.block_action is not None else ())
            for spec in specs
        }

    @property
    def config(self) -> ToMeConfig:
        return self.state.config

    @property
    def active(self) -> bool:
        """True only while this patch's own hooks are installed: False after :meth:`remove`,
        :func:`remove_tome` or a later :func:`apply_tome` on the same model."""
        return bool(self._handles) and all(_hook_installed(h) for h in self._handles)

    @property
    def num_blocks(self) -> int:
        return len(self._specs)

    def remove(self) -> None:
        """Detach every hook of this patch (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.state.release()  # kept plans and token caches go with the hooks

    def watch(self, observer: Callable[[PlanEvent], None]) -> Callable[[], None]:
        """Call ``observer(event)`` with every plan a block makes in an eager model call (a
        :class:`tomediff.core.PlanEvent`: block name, call number, token grid, the plan).

        For inspection and visualisation (``tomediff.eval.visualize``); the observer runs inside the
        model call, so it should be quick and must not change the plan. Returns a function that
        stops the observation. Observers are not called while the model runs compiled.
        """
        observers = self.state.observers
        observers.append(observer)

        def stop() -> None:
            if observer in observers:
                observers.remove(observer)

        return stop

    def reseed(self, seed: int | None = None) -> None:
        """Restart the partition RNG, e.g. before each generation to reproduce it in one process. Plans
        kept by ``reuse_steps`` are dropped too: every thread's next call starts a new generation."""
        self.state.reseed(None if seed is None else check_seed(seed))

    def new_generation(self) -> None:
        """Say that the calling thread's next model call starts a new generation, so ``reuse_steps``
        keeps no plan from the previous one.

        A patched pipeline marks each of its calls itself. A model patched on its own only sees
        timesteps, which cannot tell a generation cut short (an interrupt, an error, custom timesteps)
        followed by one that starts below its last timestep (img2img): call this before each generation.
        """
        self.state.new_generation()

    def set_caller(self, caller: Caller | None) -> None:
        """Say what calls the patched model when it is not a diffusers pipeline (which tomediff asks
        itself), e.g. a host's sampler; None forgets it. A :class:`tomediff.core.spec.Caller`: at the
        start of each model call, in the calling thread, tomediff asks ``caller.guidance(sample)``
        whether the batch stacks the two guidance halves as ``[unconditional, conditional]`` (True),
        holds no such pair (False) or cannot tell (None), for ``reuse_cfg`` with ``cfg_layout="auto"``;
        and, with ``reuse_steps > 1``, ``caller.generation()``, an object that stays the same (``is``)
        within one generation. ``caller.name`` names it in messages."""
        self.state.caller = caller

    def report(self) -> ToMeReport:
        blocks = tuple(
            BlockReport(spec.name, spec.downsample, self._sites[spec.name], self.state.stats.get(spec.name))
            for spec in self._specs
        )
        return ToMeReport(
            model=type(self.model).__name__,
            adapter=self.adapter,
            config=self.state.config,
            max_downsample=self.state.max_downsample,
            levels_found=self._levels,
            blocks=blocks,
            calls=self.state.calls,
            partition=self.state.partition_used,
            notes=tuple(self.state.method.reducer.report_lines()),
        )

    def __enter__(self) -> ToMeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return f"ToMeHandle({type(self.model).__name__}, {len(self._specs)} blocks, {status}, {self.config})"


def _hook_installed(handle: RemovableHandle) -> bool:
    """Whether the hook behind ``handle`` is still in its module's hook table."""
    table = handle.hooks_dict_ref()
    return table is not None and handle.id in table


def _check_not_patched_by_tomesd(target: nn.Module) -> None:
    """tomesd patches by swapping each block's class for a ``ToMeBlock`` subclass (keeping the original
    in ``_parent``); merging on top of that would merge twice and fail with a shape error."""
    for name, module in target.named_modules():
        if patched_by_tomesd(module):
            where = f"block '{name}'" if name else "it"
            raise ConflictingPatchError(
                f"{type(target).__name__} is already patched by tomesd ({where} is a tomesd ToMeBlock). "
                "Call tomesd.remove_patch(model) (or tomediff.remove_patch(model)) first, then apply "
                "tomediff."
            )


def _make_config(config: ToMeConfig | None, overrides: dict[str, Any]) -> ToMeConfig:
    if config is None:
        # replace() names unknown options the same way whether or not a config was given.
        return ToMeConfig().replace(**overrides) if overrides else ToMeConfig()
    if not isinstance(config, ToMeConfig):
        raise UnknownOptionError(f"config must be a ToMeConfig, got {type(config).__name__}.")
    return config.replace(**overrides) if overrides else config


def apply_tome(model: Any, config: ToMeConfig | None = None, **overrides: Any) -> ToMeHandle:
    """Patch ``model`` with token reduction (ToMe merging by default), in place; returns a handle.

    Args:
        model: a diffusers pipeline (its ``.unet`` or ``.transformer`` is patched), a diffusers model
            (``UNet2DConditionModel``, ``ControlNetModel``, ``PixArtTransformer2DModel``, ...), an
            LDM/CompVis model (``model.model.diffusion_model``), or any module containing
            ``BasicTransformerBlock``s. A model that is already patched by tomediff is first restored,
            but only once the new settings and model have been validated: when this call raises, the
            previous patch is still in place.
        config: the settings; keyword ``overrides`` replace single fields (``ratio=0.6``).

    Raises:
        ConfigError (a ValueError): invalid settings.
        NothingToPatchError (a ValueError): a level limit or site selection that leaves nothing to merge.
        UnknownOptionError, UnsupportedModelError (TypeErrors): an unknown keyword; an object that
            contains no supported transformer block.
        ConflictingPatchError (a RuntimeError): the model is patched by tomesd.
    """
    return _patch(model, _make_config(config, overrides), None)


def apply_reducer(
    model: Any, reducer: Reducer, config: ToMeConfig | None = None, **overrides: Any
) -> ToMeHandle:
    """Like :func:`apply_tome`, with the plan of every block call coming from ``reducer`` (a
    :class:`tomediff.core.reducers.Reducer`) instead of the config's method: the seam for research
    methods and benchmark references. The config still selects blocks, sites, levels and schedule, and
    its site actions apply (merge/unmerge for ``method="merge"``), so the plans must suit them."""
    if not isinstance(reducer, Reducer):
        raise UnknownOptionError(
            f"reducer must be a tomediff.core.reducers.Reducer, got {type(reducer).__name__}."
        )
    return _patch(model, _make_config(config, overrides), reducer)


def _patch(model: Any, cfg: ToMeConfig, reducer: Reducer | None) -> ToMeHandle:
    target = resolve_model(model)
    _check_not_patched_by_tomesd(target)
    adapter = find_adapter(target)
    specs = adapter.block_specs(target)
    if not specs:
        raise NothingToPatchError(
            f"{type(target).__name__} contains no transformer block that adapter '{adapter.name}' can "
            "patch, so token merging would do nothing."
        )
    levels = tuple(sorted({s.downsample for s in specs if s.downsample is not None}))
    selection = Selection(cfg, levels)
    selected = selection.blocks(specs, type(target).__name__)
    method = build_method(cfg, selection.enabled_kinds(), reducer)
    method.check(selected)
    if (conflict := method.conflict(selected)) is not None:
        raise ConflictingPatchError(conflict)
    state = ToMeState(
        cfg,
        selection,
        method,
        len(selected),
        adapter.timestep_scale,
        adapter.odd_batch_top_left,
        pipeline_caller(model),
        adapter.timestep_rises,
    )
    # Everything is validated: only now is the previous patch (if any) replaced.
    remove_hooks(target)
    handles = install(target, selected, state)
    return ToMeHandle(target, state, selected, adapter.name, levels, handles)


def remove_tome(model: Any) -> Any:
    """Remove token merging from ``model`` (a no-op when it is not patched); returns ``model``, as given
    (a pipeline stays a pipeline)."""
    remove_hooks(resolve_model(model))
    return model


@contextmanager
def tome(model: Any, config: ToMeConfig | None = None, **overrides: Any) -> Iterator[ToMeHandle]:
    """``with tome(pipe, ratio=0.5): pipe(...)`` — patched inside the block, restored after it.

    A model already patched by :func:`apply_tome` gets that patch back after the block (its handle is
    active again), unless the block left another tomediff patch on the model.
    """
    target = resolve_model(model)
    earlier = save_hooks(target)
    handle = apply_tome(model, config, **overrides)
    try:
        yield handle
    finally:
        handle.remove()
        if not has_hooks(target):
            earlier.restore()


def apply_patch(
    model: Any,
    ratio: float = 0.5,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
) -> Any:
    """Drop-in replacement for ``tomesd.apply_patch`` (same signature and defaults); returns ``model``.

    Accepts what tomesd accepts: numpy scalars (``np.float32(0.3)``, ``np.int64(2)``), any truthy or
    falsy value for the switches (``merge_attn=1``), and a ``max_downsample`` that is not a power of two
    (it selects the levels at most that downsampled, so ``3`` acts as ``2``, as in tomesd). Unlike tomesd
    it raises instead of silently patching nothing (SDXL has no transformer block at
    ``max_downsample=1``: pass ``max_downsample=2``, or use :func:`apply_tome`, which picks the level),
    and it refuses a model still patched by tomesd (call ``tomesd.remove_patch(model)`` first).
    """
    apply_tome(
        model,
        ToMeConfig(
            ratio=ratio,
            max_downsample=_tomesd_level(max_downsample),
            sx=sx,
            sy=sy,
            use_rand=bool(use_rand),
            merge_attn=bool(merge_attn),
            merge_crossattn=bool(merge_crossattn),
            merge_mlp=bool(merge_mlp),
        ),
    )
    return model


def _tomesd_level(max_downsample: Any) -> Any:
    """tomesd patches the levels whose downsampling (1, 2, 4, 8) is ``<= max_downsample``: the same
    blocks as the largest power of two not above it. Other values go on to ToMeConfig's own checks."""
    # Not narrowed by isinstance: numbers.Real's stub declares neither comparisons nor int().
    real = isinstance(max_downsample, numbers.Real) and not isinstance(max_downsample, bool)
    if real and max_downsample >= 1:
        return 1 << (int(max_downsample).bit_length() - 1)
    return max_downsample


def remove_patch(model: Any) -> Any:
    """Drop-in replacement for ``tomesd.remove_patch``; returns ``model``.

    Removes tomediff's patch and also one made by tomesd itself (for code that swapped
    ``import tomesd`` for ``import tomediff as tomesd`` halfway): tomesd's blocks get their original
    class back, and its size hook and ``_tome_info`` attributes are removed, so the model computes
    exactly what it did before either patch.
    """
    target = resolve_model(model)
    remove_hooks(target)
    _remove_tomesd_patch(target)
    return model


def _remove_tomesd_patch(target: nn.Module) -> None:
    """Undo what tomesd 0.1.3's ``apply_patch`` does to ``target``: its forward pre-hook on the patched
    model (kept in ``_tome_info["hooks"]``), the ``_tome_info`` dict on that model and on every block,
    and the ``ToMeBlock`` class of each block (the original is the class attribute ``_parent``). The
    flags it sets only on blocks of old LDM/diffusers versions that lack them (``disable_self_attn``,
    ``use_ada_layer_norm*``) stay: nothing tells whether a block had them before."""
    for module in target.modules():
        info = vars(module).get("_tome_info")
        if isinstance(info, dict):
            for hook in info.get("hooks", ()):
                hook.remove()
            del module._tome_info
        if patched_by_tomesd(module):
            module.__class__ = cast(Any, type(module))._parent  # set by tomesd on its ToMeBlock classes
