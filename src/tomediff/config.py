"""``ToMeConfig``: every knob of token merging, validated once, never mutated."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tomediff.errors import ConfigError, UnknownOptionError

if TYPE_CHECKING:  # torch is imported where a generator is checked: the CLI's flags need no torch
    import torch

__all__ = [
    "CACHE_CONTEXTS",
    "CACHE_FORECASTS",
    "CACHE_SELECTS",
    "CFG_LAYOUTS",
    "DOWNSAMPLE_MODES",
    "METHODS",
    "SEED_MAX",
    "SEED_MIN",
    "TOMESD_FIELDS",
    "ToMeConfig",
    "check_seed",
    "config_from",
    "tomesd_arguments",
]

# The settings tomesd.apply_patch takes, in its order (tomediff.apply_patch has the same signature).
TOMESD_FIELDS = (
    "ratio",
    "max_downsample",
    "sx",
    "sy",
    "use_rand",
    "merge_attn",
    "merge_crossattn",
    "merge_mlp",
)

# Token-reduction methods: ToMe's merge/unmerge, ToDo's keys/values from a downsampled grid, and
# token-wise caching (a block recomputes some tokens between refresh steps, the rest reuse their residual).
METHODS = ("merge", "downsample", "cache")
# How method="cache" picks the tokens it recomputes between refresh steps.
CACHE_SELECTS = ("change", "stride")
CACHE_CONTEXTS = ("all", "computed")
# How method="cache" fills the tokens it does not compute: kept residual, or extrapolated in time.
CACHE_FORECASTS = ("none", "linear")
DOWNSAMPLE_MODES = ("nearest", "avg", "bilinear")
# How a classifier-free-guidance batch is stacked (``reuse_cfg``): asked of the patched pipeline, diffusers'
# and ComfyUI's [unconditional, conditional], or the reverse for a host that stacks them the other way.
CFG_LAYOUTS = ("auto", "uncond_cond", "cond_uncond")

# What torch.Generator.manual_seed accepts (negative seeds wrap around to 2**64 + seed).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


_WINDOW = "a positive integer window size"
_LEVEL = (
    "a power of two (1, 2, 4, 8, ...: how much a UNet level is downsampled) or None for the "
    "highest-resolution level with transformer blocks"
)


def _is_numpy_bool(value: object) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _as_int(name: str, value: object, kind: str = "an integer") -> int:
    """``value`` as a Python int: ints and numpy integers, never bools (a bool here is a mistake)."""
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    return int(value)


def _as_float(name: str, value: object) -> float:
    """``value`` as a Python float: ints, floats and numpy numbers, never bools."""
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    return float(value)


def _as_bool(name: str, value: object) -> bool:
    """``value`` as a Python bool: True/False or numpy's ``np.bool_``."""
    if isinstance(value, bool) or _is_numpy_bool(value):
        return bool(value)
    raise ConfigError(f"{name} must be True or False, got {value!r}.")


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as a Python int in the range ``torch.Generator.manual_seed`` accepts, else ConfigError."""
    value = _as_int(name, seed)
    if not SEED_MIN <= value <= SEED_MAX:
        raise ConfigError(
            f"{name}={value} is outside the range torch.Generator.manual_seed accepts, "
            "[-2**63, 2**64 - 1]; pass a smaller seed (e.g. seed % 2**64)."
        )
    return value


@dataclass(frozen=True)
class ToMeConfig:
    """Settings for token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023).

    Args:
        ratio: fraction of a block's image tokens removed by merging, ``r = int(ratio * N)``.
            0 disables merging (outputs are bit-identical to the unpatched model). The largest
            allowed value is ``1 - 1/(sx*sy)`` (every src token merged); 0.5 is the paper's
            recommended setting.
        max_downsample: merge only in transformer blocks whose token grid is downsampled at most
            this much relative to the model's full-resolution token grid: a power of two (1, 2, 4
            or 8 in a Stable Diffusion UNet; other values raise). ``None`` (default) picks the
            highest-resolution level that has transformer blocks: 1 for SD 1.x/2.x and DiTs, 2 for
            SDXL, whose first level has none.
        sx: width of the window in which one destination (dst) token is chosen.
        sy: height of that window.
        st: on video models, how many frames that window spans (``st × sy × sx``). With the
            default 1 a window stays within one frame, even where ``sy`` does not divide the frame
            height; frames left over in time (``frames % st``) are all src.
        use_rand: choose each window's dst token at random (from the library's own generator)
            instead of always the top-left one. Random choice avoids grid artifacts. As in tomesd,
            an odd batch size falls back to top-left: the conditional and unconditional halves of
            classifier-free guidance may then run as separate calls, and they must share the
            partition. FLUX.1 (guidance-distilled: a call predicts the whole step) stays random at
            batch 1. One draw per model call serves every block; the report says which partition
            the last call used.
        merge_attn: merge tokens before self-attention (the main speed-up).
        merge_crossattn: merge tokens before cross-attention (its queries only).
        merge_mlp: merge tokens before the feed-forward layer (fast but hurts quality).
        seed: seed of the library's private generator for ``use_rand``. The same seed gives
            the same partitions in every process; the global torch RNG is never touched. Any integer
            ``torch.Generator.manual_seed`` accepts, ``[-2**63, 2**64 - 1]``.

        method: ``"merge"`` (ToMe, default): merge similar tokens before the enabled sites and copy the
            result back after them. ``"downsample"`` (ToDo, Smith et al. 2024): self-attention keeps every
            query, its keys and values come from the token grid downsampled by ``downsample_factor``; no
            matching, nothing to unmerge. Only ``merge_attn`` applies to it (``ratio`` is not used).
            ``"cache"`` (token-wise caching, after ToCa): a block computes every token at a refresh step
            and keeps each image token's residual (output minus input); at the steps between, only
            ``cache_ratio`` of its image tokens (and every text token) go through it, and the others'
            output is their input plus their kept residual. The blocks of Flux.1 and SD3 and every
            ``BasicTransformerBlock`` (PixArt, DiT, UNets); only ``merge_attn`` applies to it (``ratio``
            is not used).
        cache_interval: ``method="cache"``: every ``cache_interval``-th denoising step is a refresh
            step (the first of a generation always is); at least 2. Steps at which a diffusers cache
            (FirstBlockCache, MagCache) passes the block through count too, so a partial step never
            uses residuals more than ``cache_interval - 1`` steps old: the block's first step after a
            longer gap refreshes.
        cache_intervals: ``method="cache"``: other refresh intervals for later parts of denoising,
            ``{0.4: 3}``: from progress ``p = 1 - t / T`` 0.4 on (as ``start``), every 3rd step is a refresh;
            before the first listed progress, ``cache_interval``. Early steps change fastest and their
            errors carry through the rest of the trajectory, so they need refreshes most. Stored as
            sorted ``(progress, interval)`` pairs; None (default): ``cache_interval`` throughout.
        cache_ratio: ``method="cache"``: fraction of a block's image tokens computed at the steps
            between refreshes, in [0, 1] (1 computes them all: outputs equal the unpatched model's). 0
            computes none: at those steps each image token's output is its input plus its kept (or,
            with ``cache_forecast="linear"``, forecast) residual. The block then still runs on its other
            tokens (the text) and one image token, whose output is dropped, so that whatever else it
            returns keeps its shape; no keys or values are kept (``cache_select`` and ``cache_context``
            do not apply). With a forecast, the few tokens a small ratio computes change its images
            little and cost most of a partial step.
        cache_select: ``method="cache"``: which tokens are computed between refreshes: ``"change"``
            (default) those whose block input changed most, relative to its norm, since they were last
            computed; ``"stride"`` an evenly spread set that shifts every step.
        cache_context: ``method="cache"``: what the computed tokens attend to between refreshes.
            ``"all"`` (default): every image token, the others through the keys and values they had when
            last computed (kept per attention module); ``"computed"``: only the computed tokens (and the
            text), which is cheaper but changes the computed tokens' outputs much more.
        cache_forecast: ``method="cache"``: how the tokens not computed are filled between refreshes.
            ``"none"`` (default): their residual (and, with ``cache_context="all"``, key and value) as
            last computed; ``"linear"``: as at the last refresh, moved on to the call's timestep along
            their change between the last two refreshes (a first-order forecast, as TaylorSeer's for whole
            modules, per token). The tokens a partial step computes then serve that step's output only:
            forecasts from whole refreshes were as good at a refresh every 2nd step and better at longer
            intervals, and cost less. One more residual-sized tensor per block, and two key/value-sized
            ones per attention.
        downsample_factor: ``method="downsample"``: the grid downsampling factor at the
            highest-resolution level patched (1 = off).
        downsample_factor_next: ``method="downsample"``: the factor at the deeper levels; above 1 it
            also extends the default level selection to the next level (1 = those levels are left alone).
        downsample_mode: ``"nearest"`` (top-left token of each window, default), ``"avg"`` or
            ``"bilinear"``.
        level_ratios: a ratio per level, ``{1: 0.6, 2: 0.3}``: exactly the listed levels are merged, each
            with its own ratio (instead of ``ratio`` and ``max_downsample``, which must stay at their
            defaults). Stored as a sorted tuple of ``(level, ratio)`` pairs.
        min_tokens: leave a block alone when it receives fewer tokens than this (on a fast GPU, merging
            a few thousand tokens costs more than it saves). 0 = every selected block merges.
        reuse_level: one matching per level per model call: the first block of a level plans, the
            other blocks of the level (same grid) reuse its plan.
        reuse_steps: recompute a block's plan only every ``k``-th denoising step and reuse it in
            between; 1 = every call. A plan is never reused across generations, for another call at the
            same timestep (the two halves of guidance run as two calls keep a plan each), or for another
            batch size or grid. A generation starts at each call of the patched pipeline (when
            ``apply_tome`` was given the pipeline), at ``handle.new_generation()`` (for the calling thread)
            and ``handle.reseed()`` (for every thread), and, as a fallback, when the timestep goes up or a
            third call comes at one timestep. A model patched on its own cannot tell a generation cut
            short followed by one starting below its last timestep (img2img, custom timesteps): call
            ``handle.new_generation()`` before each generation. Eager only.
        reuse_cfg: both halves of a classifier-free-guidance batch share one plan, matched on the
            conditional half (which half that is: ``cfg_layout``); odd batches, and even batches that are
            no guidance pair, plan per sample as usual.
        cfg_layout: how an even batch holds the two guidance halves, for ``reuse_cfg``. ``"auto"``
            (default): the patched pipeline tells at each call: a pair when its
            ``do_classifier_free_guidance`` is true and the two halves of the model input are one latent
            batch twice, stacked ``[unconditional, conditional]`` as diffusers does (one host
            synchronisation per call). A model patched on its own, or a pipeline that does not say, gets an
            error instead of a guess. ``"uncond_cond"``: every even batch is ``[unconditional,
            conditional]`` (diffusers', and ComfyUI 0.3's when it runs both halves in one call);
            ``"cond_uncond"``: ``[conditional, unconditional]``, for a host that stacks them that way.
        start, stop: active only while the denoising progress ``p = 1 - t / T`` is in ``[start, stop)``,
            with ``t`` the timestep the model receives and ``T`` its training horizon (1000 for the
            Stable Diffusion family), ``p`` clamped to ``[0, 1]``. ``stop == 1`` closes the range:
            ``[start, 1]`` includes the final step (``t = 0``, ``p = 1``), as the default ``(0, 1)``
            does. Defaults 0 and 1: always active; ``start == stop`` never is. Reading the timestep
            costs one host synchronisation per model call, only when set.
        kv_ratio: merge the image keys/values of self-attention at this ratio, apart from the queries,
            which are merged at ``ratio`` (0 keeps every query): asymmetric reduction (AsymRnR) at the
            attention call, after rotary positions, on models whose adapter declares attention-call
            sites (Flux, Wan, ...). None (default): queries and keys/values are merged alike, where the
            model's adapter places merging. ``merge_attn`` only.
        reference_ratio: ``method="merge"`` on edit and in-context models (Flux Kontext, Flux.2 with
            reference images, Qwen-Image-Edit, Bria FIBO-Edit, LongCat-Image-Edit, JoyImage-Edit and
            Edit-Plus, Flux 3 with ``image_cond_hidden_states``), whose calls hold reference-image
            tokens after the image they predict: merge each reference image's tokens at this ratio
            (queries and keys/values alike), 0 keeps them all. Every image of such a call is merged on
            its own grid, never with another image's tokens. None (default): reference images are
            merged like the predicted image (``ratio``, ``kv_ratio``).
        downsample_factor_time: ``method="downsample"`` on video models: the keys/values' grid is also
            downsampled in time by this factor (1 = per frame, in space only).
        skip_blocks: ``(first, last)``: leave the first ``first`` and the last ``last`` of the blocks
            the other settings select (in the model's order) unreduced. Diffusion transformers have no
            levels; this is how to spare their most sensitive blocks. ``(0, 0)`` (default) keeps all.

    Integers and floats may also be numpy scalars (``np.int64(3)``, ``np.float32(0.5)``); they are
    stored as Python ``int``/``float``.
        generator: a ``torch.Generator`` to draw partitions from instead of a private one seeded
            with ``seed``. It is used as given (its state advances); must be a CPU generator so
            partitions do not depend on the model's device.
    """

    ratio: float = 0.5
    max_downsample: int | None = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0
    generator: torch.Generator | None = dataclasses.field(default=None, compare=False)
    method: str = "merge"
    downsample_factor: int = 2
    downsample_factor_next: int = 1
    downsample_mode: str = "nearest"
    level_ratios: Mapping[int, float] | tuple[tuple[int, float], ...] | None = None
    min_tokens: int = 0
    reuse_level: bool = False
    reuse_steps: int = 1
    reuse_cfg: bool = False
    cfg_layout: str = "auto"
    start: float = 0.0
    stop: float = 1.0
    skip_blocks: tuple[int, int] = (0, 0)
    kv_ratio: float | None = None
    downsample_factor_time: int = 1
    cache_interval: int = 3
    cache_intervals: Mapping[float, int] | tuple[tuple[float, int], ...] | None = None
    cache_ratio: float = 0.25
    cache_select: str = "change"
    cache_context: str = "all"
    cache_forecast: str = "none"
    st: int = 1
    reference_ratio: float | None = None

    def __post_init__(self) -> None:
        self._check_merge_fields()
        self._check_method_fields()
        self._check_attention_call_fields()
        self._check_cache_fields()
        self._check_reference_ratio()

    def _check_fraction(self, name: str, meaning: str) -> float:
        """Field ``name``, a merge ratio set apart from ``ratio``, as a float in ``[0, max_ratio]`` (stored
        back so); ``meaning`` says what it is in the error."""
        value = _as_float(name, getattr(self, name))
        object.__setattr__(self, name, value)
        if not 0.0 <= value <= self.max_ratio + 1e-12:  # also refuses NaN
            raise ConfigError(
                f"{name}={value!r} is outside [0, {self.max_ratio:g}] (sx={self.sx}, sy={self.sy}); "
                f"it is {meaning}."
            )
        return value

    def _check_reference_ratio(self) -> None:
        """``reference_ratio``: the merge ratio of edit models' reference-image tokens."""
        if self.reference_ratio is None:
            return
        self._check_fraction("reference_ratio", "the fraction of each reference image's tokens merged away")
        if self.method != "merge":
            raise ConfigError(
                f"reference_ratio applies to method='merge' (got method={self.method!r}): "
                "method='downsample' reduces every image of an edit model's call by downsample_factor, "
                "on its own grid. Leave reference_ratio=None."
            )

    def _check_cache_fields(self) -> None:
        """``cache_interval``, ``cache_ratio``, ``cache_select`` and ``cache_context``: settings of
        ``method="cache"``."""
        object.__setattr__(self, "cache_interval", _as_int("cache_interval", self.cache_interval))
        object.__setattr__(self, "cache_ratio", _as_float("cache_ratio", self.cache_ratio))
        if self.cache_interval < 2:
            raise ConfigError(
                f"cache_interval must be an integer of at least 2 (every cache_interval-th step computes "
                f"every token), got {self.cache_interval!r}; use e.g. 3."
            )
        if not 0.0 <= self.cache_ratio <= 1.0:  # also refuses NaN
            raise ConfigError(
                f"cache_ratio={self.cache_ratio!r} is outside [0, 1]: it is the fraction of image tokens "
                "computed between refresh steps; use e.g. 0.25 (1 computes them all, 0 none)."
            )
        object.__setattr__(self, "cache_intervals", self._checked_cache_intervals())
        if self.cache_select not in CACHE_SELECTS:
            selects = ", ".join(map(repr, CACHE_SELECTS))
            raise ConfigError(f"cache_select must be one of {selects}, got {self.cache_select!r}.")
        if self.cache_context not in CACHE_CONTEXTS:
            contexts = ", ".join(map(repr, CACHE_CONTEXTS))
            raise ConfigError(f"cache_context must be one of {contexts}, got {self.cache_context!r}.")
        if self.cache_forecast not in CACHE_FORECASTS:
            forecasts = ", ".join(map(repr, CACHE_FORECASTS))
            raise ConfigError(f"cache_forecast must be one of {forecasts}, got {self.cache_forecast!r}.")
        if self.method != "cache":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [n for n in defaults if n.startswith("cache_") and getattr(self, n) != defaults[n]]
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} apply to method='cache' only (got method={self.method!r}); "
                    "set method='cache' or leave them at their defaults."
                )
            return
        if self.merge_crossattn or self.merge_mlp or not self.merge_attn:
            raise ConfigError(
                "method='cache' acts on whole blocks, switched by merge_attn: leave merge_attn=True, "
                "merge_crossattn=False and merge_mlp=False."
            )
        merge_only = {
            "reuse_level": self.reuse_level,
            "reuse_cfg": self.reuse_cfg,
            "reuse_steps": self.reuse_steps > 1,
            "level_ratios": self.level_ratios is not None,
            "kv_ratio": self.kv_ratio is not None,
        }
        if any(merge_only.values()):
            names = ", ".join(name for name, used in merge_only.items() if used)
            raise ConfigError(
                f"{names} apply to method='merge' only: method='cache' keeps residuals between steps "
                "instead of merging plans; leave them at their defaults."
            )

    def _check_attention_call_fields(self) -> None:
        """``kv_ratio`` and ``downsample_factor_time``: settings of the attention-call sites (DiTs)."""
        name = "downsample_factor_time"
        object.__setattr__(self, name, _as_int(name, self.downsample_factor_time, "a positive integer"))
        if self.downsample_factor_time < 1:
            raise ConfigError(
                f"downsample_factor_time must be a positive integer, got {self.downsample_factor_time!r}."
            )
        if self.downsample_factor_time > 1 and self.method != "downsample":
            raise ConfigError(
                f"downsample_factor_time={self.downsample_factor_time} applies to method='downsample' only "
                f"(got method={self.method!r}); leave it at 1."
            )
        if self.st > 1 and self.method != "merge":
            raise ConfigError(
                f"st={self.st} (windows spanning frames) applies to method='merge' only (got "
                f"method={self.method!r}); to downsample in time use downsample_factor_time."
            )
        if self.kv_ratio is None:
            return
        kv_ratio = self._check_fraction("kv_ratio", "the fraction of image keys/values merged")
        if self.method != "merge":
            raise ConfigError(
                "kv_ratio applies to method='merge' (keys/values merged apart from the queries); "
                "method='downsample' reduces them by downsample_factor. Leave kv_ratio=None."
            )
        conflicts = [n for n in ("merge_crossattn", "merge_mlp") if getattr(self, n)]
        conflicts += ["level_ratios"] if self.level_ratios is not None else []
        if conflicts:
            raise ConfigError(
                f"kv_ratio reduces tokens inside self-attention only; it cannot be combined with "
                f"{', '.join(conflicts)} (set them to their defaults, or leave kv_ratio=None)."
            )
        if kv_ratio == 0 and self.ratio == 0 and not self.reference_ratio:
            raise ConfigError(
                "ratio=0 and kv_ratio=0 reduce neither queries nor keys/values; raise one of them."
            )

    def _check_merge_fields(self) -> None:
        # numpy scalars (np.int64, np.float32, np.bool_) are accepted and stored as Python numbers, so
        # the frozen config compares, hashes and serialises like one built from plain values.
        for name in ("sx", "sy", "st"):
            object.__setattr__(self, name, _as_int(name, getattr(self, name), _WINDOW))
        object.__setattr__(self, "seed", check_seed(self.seed))
        md = self.max_downsample
        if md is not None:
            object.__setattr__(self, "max_downsample", _as_int("max_downsample", md, _LEVEL))
        object.__setattr__(self, "ratio", _as_float("ratio", self.ratio))
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            object.__setattr__(self, name, _as_bool(name, getattr(self, name)))
        for name in ("sx", "sy", "st"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name} must be {_WINDOW}, got {value!r}.")
        if self.sx * self.sy < 2:
            raise ConfigError(
                f"sx*sy must be at least 2 so each window has a src token to merge, got sx={self.sx}, "
                f"sy={self.sy}; use the default sx=2, sy=2."
            )
        ratio = self.ratio
        if math.isnan(ratio):
            raise ConfigError(f"ratio must be a number in [0, {self.max_ratio:g}], got {ratio!r}.")
        if ratio < 0.0:
            raise ConfigError(
                f"ratio={ratio!r} is outside [0, {self.max_ratio:g}]: it is the fraction of a block's tokens "
                "merged away and cannot be negative. Use 0 for no merging, or e.g. 0.5."
            )
        if ratio > self.max_ratio + 1e-12:
            raise ConfigError(
                f"ratio={ratio!r} is outside [0, {self.max_ratio:g}]: with sx={self.sx}, sy={self.sy} "
                f"at most 1 - 1/(sx*sy) = {self.max_ratio:g} of the tokens can be merged. "
                "Lower ratio or use larger sx/sy."
            )
        md = self.max_downsample
        if md is not None and (md < 1 or md & (md - 1)):
            hint = f" Use {1 << (md.bit_length() - 1)}, which selects the same levels." if md > 1 else ""
            raise ConfigError(f"max_downsample must be {_LEVEL}, got {md!r}.{hint}")
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ConfigError(
                "merge_attn, merge_crossattn and merge_mlp are all False, so nothing would be merged; "
                "enable at least one (merge_attn=True is the recommended default)."
            )
        gen = self.generator
        if gen is not None:
            import torch

            if not isinstance(gen, torch.Generator):
                raise ConfigError(f"generator must be a torch.Generator, got {type(gen).__name__}.")
            if gen.device.type != "cpu":
                raise ConfigError(
                    f"generator must live on the CPU (got device {gen.device}); partitions are drawn "
                    "on the CPU so the same seed gives the same result on every device."
                )

    def _check_method_fields(self) -> None:
        for name in ("downsample_factor", "downsample_factor_next", "min_tokens", "reuse_steps"):
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in ("reuse_level", "reuse_cfg"):
            object.__setattr__(self, name, _as_bool(name, getattr(self, name)))
        for name in ("start", "stop"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}.")
        if self.cfg_layout not in CFG_LAYOUTS:
            layouts = ", ".join(map(repr, CFG_LAYOUTS))
            raise ConfigError(
                f"cfg_layout must be one of {layouts}, got {self.cfg_layout!r}: 'uncond_cond' when a "
                "guidance batch is [unconditional, conditional] (diffusers, ComfyUI), 'cond_uncond' when "
                "it is [conditional, unconditional], 'auto' to ask the patched pipeline."
            )
        if self.downsample_mode not in DOWNSAMPLE_MODES:
            modes = ", ".join(map(repr, DOWNSAMPLE_MODES))
            raise ConfigError(f"downsample_mode must be one of {modes}, got {self.downsample_mode!r}.")
        for name in ("downsample_factor", "downsample_factor_next", "reuse_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.min_tokens < 0:
            raise ConfigError(
                f"min_tokens must be 0 (no minimum) or a positive integer, got {self.min_tokens}."
            )
        if not (0.0 <= self.start <= self.stop <= 1.0):  # also refuses NaN
            raise ConfigError(
                f"start={self.start!r} and stop={self.stop!r} must satisfy 0 <= start <= stop <= 1 "
                "(fractions of the denoising; start=0, stop=1 is always active)."
            )
        object.__setattr__(self, "level_ratios", self._checked_level_ratios())
        object.__setattr__(self, "skip_blocks", self._checked_skip_blocks())
        if self.method == "downsample":
            if self.merge_crossattn or self.merge_mlp:
                raise ConfigError(
                    "method='downsample' reduces the keys and values of self-attention only; set "
                    "merge_crossattn=False and merge_mlp=False (or use method='merge')."
                )
            if not self.merge_attn:
                raise ConfigError("method='downsample' needs merge_attn=True (it acts on self-attention).")
            merge_only = {
                "reuse_level": self.reuse_level,
                "reuse_cfg": self.reuse_cfg,
                "reuse_steps": self.reuse_steps > 1,
                "level_ratios": self.level_ratios is not None,
            }
            if any(merge_only.values()):
                names = ", ".join(name for name, used in merge_only.items() if used)
                raise ConfigError(
                    f"{names} apply to method='merge' only: method='downsample' makes no matching plan to "
                    "reuse and takes downsample_factor / downsample_factor_next instead of ratios."
                )

    def _checked_cache_intervals(self) -> tuple[tuple[float, int], ...] | None:
        value = self.cache_intervals
        if value is None:
            return None
        example = "e.g. {0.4: 3} (from progress 0.4 on, a refresh every 3rd step)"
        try:
            pairs = list(value.items()) if isinstance(value, Mapping) else [tuple(p) for p in value]
        except TypeError:
            pairs = None
        if pairs is None or not pairs or any(len(p) != 2 for p in pairs):
            raise ConfigError(
                f"cache_intervals must map progress points to refresh intervals, {example}; got {value!r}."
            )
        checked: dict[float, int] = {}
        for at, interval in pairs:
            at = _as_float("a cache_intervals progress", at)
            interval = _as_int(f"cache_intervals[{at:g}]", interval)
            if not 0.0 <= at <= 1.0:  # also refuses NaN
                raise ConfigError(
                    f"cache_intervals progress {at!r} is outside [0, 1] (it is 1 - t / T, as start); "
                    f"{example}."
                )
            if interval < 2:
                raise ConfigError(
                    f"cache_intervals[{at:g}]={interval!r}: an interval must be an integer of at least 2, "
                    f"as cache_interval; {example}."
                )
            if at in checked:
                raise ConfigError(f"cache_intervals lists progress {at:g} twice; {example}.")
            checked[at] = interval
        return tuple(sorted(checked.items()))

    def interval_at(self, progress: float | None) -> int:
        """``method="cache"``: the refresh interval at denoising ``progress`` (``cache_interval`` before
        the first of ``cache_intervals``, and when the progress is unknown)."""
        interval = self.cache_interval
        if progress is None:
            return interval
        intervals = self.cache_intervals or ()
        assert isinstance(intervals, tuple)  # stored as sorted (progress, interval) pairs
        for at, value in intervals:
            if progress >= at:
                interval = value
        return interval

    def _checked_level_ratios(self) -> tuple[tuple[int, float], ...] | None:
        value = self.level_ratios
        if value is None:
            return None
        items = value.items() if isinstance(value, Mapping) else value
        try:
            pairs = [(level, ratio) for level, ratio in items]
        except (TypeError, ValueError):
            raise ConfigError(
                f"level_ratios must map levels to ratios, e.g. {{1: 0.6, 2: 0.3}}, got {value!r}."
            ) from None
        if not pairs:
            raise ConfigError(
                "level_ratios is empty, so no level would be merged; pass None or e.g. {1: 0.5}."
            )
        checked: dict[int, float] = {}
        for level, ratio in pairs:
            level = _as_int("a level_ratios key", level, _LEVEL)
            if level < 1 or level & (level - 1):
                raise ConfigError(f"level_ratios key {level!r} must be {_LEVEL}.")
            ratio = _as_float(f"level_ratios[{level}]", ratio)
            if not 0.0 <= ratio <= self.max_ratio + 1e-12:  # also refuses NaN
                raise ConfigError(
                    f"level_ratios[{level}]={ratio!r} is outside [0, {self.max_ratio:g}] "
                    f"(sx={self.sx}, sy={self.sy})."
                )
            checked[level] = ratio
        if self.max_downsample is not None:
            raise ConfigError(
                "level_ratios chooses the merged levels itself; leave max_downsample=None "
                f"(got max_downsample={self.max_downsample})."
            )
        if self.ratio != ToMeConfig.ratio:
            raise ConfigError(
                f"level_ratios replaces ratio; leave ratio at its default (got ratio={self.ratio}) and put "
                "each level's ratio in level_ratios."
            )
        return tuple(sorted(checked.items()))

    def _checked_skip_blocks(self) -> tuple[int, int]:
        value = self.skip_blocks
        fix = "pass two non-negative integers (first, last), e.g. skip_blocks=(1, 1)"
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise ConfigError(f"skip_blocks must be a pair (first, last), got {value!r}; {fix}.")
        first, last = (_as_int("skip_blocks", v, "a non-negative integer") for v in value)
        if first < 0 or last < 0:
            raise ConfigError(f"skip_blocks={value!r} has a negative count; {fix}.")
        return first, last

    @property
    def max_ratio(self) -> float:
        """Largest mergeable fraction, ``1 - 1/(sx*sy)``."""
        return 1.0 - 1.0 / (self.sx * self.sy)

    def replace(self, **overrides: object) -> ToMeConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            names = ", ".join(sorted(unknown))
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise UnknownOptionError(f"Unknown ToMeConfig option(s): {names}. Valid options: {valid}.")
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]


def config_from(source: object, **overrides: object) -> ToMeConfig:
    """The :class:`ToMeConfig` described by ``source``: every attribute of ``source`` named like a
    ToMeConfig field (a benchmark's or evaluation's settings record), then ``overrides``; validated.

    This keeps the settings records of the CLIs, the benchmark and the evaluation derived from
    ToMeConfig: they may hold a subset of its fields (with their own defaults), never a different meaning.
    """
    values = {
        f.name: getattr(source, f.name) for f in dataclasses.fields(ToMeConfig) if hasattr(source, f.name)
    }
    values.update(overrides)
    return ToMeConfig(**values)


def tomesd_arguments(config: ToMeConfig) -> dict[str, object]:
    """Keyword arguments of ``tomesd.apply_patch`` for ``config`` (``max_downsample=None`` becomes 1,
    tomesd's default; ``seed``/``generator`` have no tomesd counterpart)."""
    args = {name: getattr(config, name) for name in TOMESD_FIELDS}
    if args["max_downsample"] is None:
        args["max_downsample"] = 1
    return args
