"""Token reduction for ComfyUI's own diffusion transformers (Flux, SD3, Wan, Qwen-Image) through
ComfyUI's attention override, one mechanism for every family.

ComfyUI's DiT blocks compute q/k/v with fused projections, apply rotary positions inside a function
and call ``optimized_attention``; that call honours ``transformer_options["optimized_attention_override"]``.
The override sees post-rotary queries, keys and values, so reducing them needs no knowledge of the
rotary layout (every token already carries its position):

* ``method="downsample"`` (ToDo): queries (and so the output) keep every token; the image keys/values
  come from the latent's token grid downsampled by ``downsample_factor`` (per frame for video).
* ``method="merge"`` (ToMe, q+kv): the image tokens are matched on their keys (all heads) within the
  call; the image queries are merged at ``ratio`` and the keys/values at ``kv_ratio`` (default: with
  the queries), attention runs on fewer tokens, and each merged query's output is copied back to every
  position it stands for (:func:`tomediff.ops.attention_merge_plan`, :func:`tomediff.ops.reduced_attention`).

Text tokens are never touched. Which rows are image tokens: the blocks' sequences are ``[text, image]``
(Flux, SD3, Qwen-Image joint attention) or image alone (Wan and SD3.5 self-attention), with the image
grid known from the latent and the model's patch size. An attention call whose key count matches neither
(cross-attention) or that has a mask is left alone and counted as such in :class:`AttentionReport`.

Reference latents (Flux Kontext, Qwen-Image-Edit): ComfyUI passes them to the model as ``ref_latents``,
and its Flux and Qwen-Image forwards patchify each one like the latent and append its tokens, row-major,
after the latent's (``ref_latents_method`` "offset", "index" or "uxo" only changes their rotary ids, which
the keys already carry). The image span is then ``[latent | reference 1 | reference 2 | ...]``, each a
grid of its own read from the reference's shape: every image is merged on its own grid (the latent at
``ratio``/``kv_ratio``, each reference at ``reference_ratio``, None = like the latent;
:func:`tomediff.ops.grouped_attention_merge_plan`) or downsampled on its own grid, never mixed with
another image's tokens.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

import tomediff
from tomediff.ops import (
    attention_merge_plan,
    downsample_grid,
    grouped_attention_merge_plan,
    reduced_attention,
)

__all__ = [
    "ATTENTION_FAMILIES",
    "REFERENCE_FAMILIES",
    "AttentionReport",
    "DitAttention",
    "call_seed",
    "dit_family",
    "dit_options_error",
]

# ComfyUI model classes (by name, any base class) whose attention calls this module reduces.
ATTENTION_FAMILIES = {
    "Flux": "flux",
    "MMDiT": "sd3",
    "WanModel": "wan",
    "QwenImageTransformer2DModel": "qwen_image",
}

# Families whose forward appends each of its ``ref_latents`` to the image tokens as a grid of its own.
REFERENCE_FAMILIES = frozenset({"flux", "qwen_image"})

Grid = tuple[int, int, int]  # (frames, height, width) of an image's tokens

# What the attention override can honour, per method; other settings must keep their defaults.
_HONOURED = {
    "downsample": {"method", "downsample_factor", "downsample_mode", "seed", "generator", "use_rand"},
    "merge": {"method", "ratio", "kv_ratio", "reference_ratio", "sx", "sy", "use_rand", "seed", "generator"},
}

# optimized_attention's parameters after (q, k, v), in order.
_ATTENTION_PARAMETERS = ("heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads node seeds apart before adding the sigma


def call_seed(seed: int, sigma: float) -> int:
    """The partition seed of a model call at noise level ``sigma``: the same for the conditional and
    unconditional calls of a step, whether ComfyUI batches them together or runs them apart."""
    (sigma_bits,) = struct.unpack("<Q", struct.pack("<d", sigma))
    return (seed * _SEED_MIX + sigma_bits) % 2**64


def dit_family(diffusion_model: Any) -> str | None:
    """The family key of a ComfyUI DiT this module handles, else None."""
    for klass in type(diffusion_model).__mro__:
        if klass.__name__ in ATTENTION_FAMILIES:
            return ATTENTION_FAMILIES[klass.__name__]
    return None


def dit_options_error(config: tomediff.ToMeConfig, family: str) -> str | None:
    """Why ``config`` cannot run on a ComfyUI DiT (None when it can)."""
    if config.reference_ratio is not None and family not in REFERENCE_FAMILIES:
        return (
            f"reference_ratio={config.reference_ratio} applies to ComfyUI's Flux (Kontext) and Qwen-Image "
            f"(Edit) models, which take reference latents; ComfyUI's {family} model takes none. Set "
            "reference_ratio to -1."
        )
    default = tomediff.ToMeConfig(method=config.method)
    honoured = _HONOURED[config.method]
    changed = sorted(
        name
        for name in tomediff.ToMeConfig.__dataclass_fields__
        if name not in honoured and getattr(config, name) != getattr(default, name)
    )
    if not changed:
        return None
    how = (
        "its image keys/values are downsampled at every self/joint attention call"
        if config.method == "downsample"
        else "its image queries and keys/values are merged at every self/joint attention call, "
        "set by ratio, kv_ratio, sx, sy, use_rand and seed"
    )
    names, verb, them = (
        ", ".join(changed),
        "do" if len(changed) > 1 else "does",
        "them" if len(changed) > 1 else "it",
    )
    return f"{names} {verb} not apply to ComfyUI's {family} model ({how}); leave {them} at the default."


@dataclass
class AttentionReport:
    """What the override did in the latest model call.

    Attributes:
        queries_before, queries_after: the sequence length of the latest reduced call, and how many
            queries attention computed there (downsampling keeps them all).
        keys_before, keys_after: the same for its keys/values.
    """

    family: str
    method: str = "downsample"
    grid: Grid | None = None
    reference_grids: tuple[Grid, ...] = ()
    reduced_calls: int = 0
    untouched_calls: int = 0
    queries_before: int = 0
    queries_after: int = 0
    keys_before: int = 0
    keys_after: int = 0
    untouched_shapes: set[tuple[int, int]] = field(default_factory=set)

    def __str__(self) -> str:
        what = "key/value downsampling" if self.method == "downsample" else "token merging (q+kv)"
        references = f", reference grids {list(self.reference_grids)}" if self.reference_grids else ""
        return (
            f"tomediff {what} on ComfyUI {self.family}: grid (frames, h, w) {self.grid}{references}, "
            f"{self.reduced_calls} attention calls reduced (queries {self.queries_before} -> "
            f"{self.queries_after}, keys {self.keys_before} -> {self.keys_after} per call), "
            f"{self.untouched_calls} left alone (query/key lengths {sorted(self.untouched_shapes)})"
        )


def _token_grid(diffusion_model: Any, latent: torch.Tensor) -> Grid:
    """``(frames, height, width)`` of the image tokens of a ``[B, C, H, W]`` or ``[B, C, T, H, W]`` latent."""
    patch = diffusion_model.patch_size
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    if len(patch) == 2:
        patch = (1, *patch)
    sizes = (1, *latent.shape[-2:]) if latent.dim() == 4 else tuple(latent.shape[-3:])
    frames, height, width = (math.ceil(size / step) for size, step in zip(sizes, patch, strict=True))
    return frames, height, width


def _reference_grids(
    diffusion_model: Any, family: str, latent: torch.Tensor, references: Any
) -> tuple[Grid, ...]:
    """The token grids of the reference latents ComfyUI passes as ``ref_latents`` (none: ``()``), in
    the order the model appends them; a layout this module cannot read is a :class:`MergeCallError`."""
    if references is None or (isinstance(references, (list, tuple)) and not references):
        return ()
    if family not in REFERENCE_FAMILIES:
        raise tomediff.MergeCallError(
            f"ComfyUI passed reference latents (ref_latents) to its {family} model, whose forward tomediff "
            f"does not know how to place them among the image tokens (only {sorted(REFERENCE_FAMILIES)} "
            "are read); bypass the tomediff node for this workflow."
        )
    listed = references if isinstance(references, (list, tuple)) else [references]
    shapes = [tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__ for ref in listed]
    if not isinstance(references, (list, tuple)) or not all(
        isinstance(ref, torch.Tensor) and ref.dim() == latent.dim() for ref in references
    ):
        raise tomediff.MergeCallError(
            f"cannot read the reference latents of this {family} call: expected a list of "
            f"{latent.dim()}-D latents like the sampled one {tuple(latent.shape)}, got {shapes}; bypass "
            "the tomediff node for this workflow."
        )
    grids = tuple(_token_grid(diffusion_model, ref) for ref in references)
    if any(frames != 1 for frames, _, _ in grids):
        raise tomediff.MergeCallError(
            f"cannot read the reference latents {shapes} of this {family} call: each must be one image "
            "(one frame); bypass the tomediff node for this workflow."
        )
    return grids


class DitAttention:
    """``APPLY_MODEL`` wrapper that installs the attention override for the model call it wraps.

    With ``method="merge"`` and ``use_rand`` the partitions come from a generator reseeded at every
    model call from the seed and the call's sigma (:func:`call_seed`), then drawn per reduced attention
    call in call order: both guidance halves of a step get the same partitions whether ComfyUI runs them
    in one call or two, and a re-run gives the same image."""

    def __init__(self, config: tomediff.ToMeConfig, family: str, diffusion_model: Any) -> None:
        self.config = config
        self.diffusion_model = diffusion_model
        self.generator = torch.Generator()
        self.report = AttentionReport(family, config.method)

    def reduces(self, references: bool = False) -> bool:
        """Whether the settings reduce anything in a call with or without reference latents (ratio 0,
        reference_ratio 0 / factor 1 leave every call alone)."""
        config = self.config
        if config.method == "downsample":
            return config.downsample_factor > 1
        if config.ratio > 0 or bool(config.kv_ratio):
            return True
        return references and bool(config.reference_ratio)

    def __call__(self, executor: Any, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        # Positional after (x, t): c_concat, c_crossattn, control, transformer_options.
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        context = args[1] if len(args) > 1 else kwargs.get("c_crossattn")
        grid = _token_grid(self.diffusion_model, x)
        family = self.report.family
        references = _reference_grids(self.diffusion_model, family, x, kwargs.get("ref_latents"))
        text = int(context.shape[1]) if isinstance(context, torch.Tensor) else 0
        self.report = AttentionReport(family, self.config.method, grid, references)
        if transformer_options.get("optimized_attention_override") is not None:
            raise tomediff.ConflictingPatchError(
                "another node already set ComfyUI's attention override on this model; tomediff's "
                "reduction on ComfyUI's DiTs uses it too. Remove one of the two nodes."
            )
        self.generator.manual_seed(call_seed(self.config.seed, float(t.reshape(-1)[0])))
        transformer_options["optimized_attention_override"] = _Override(self, (grid, *references), text)
        try:
            out = executor(x, t, *args, **kwargs)
        finally:
            transformer_options.pop("optimized_attention_override", None)
        if self.reduces(bool(references)) and self.report.reduced_calls == 0:
            image = sum(f * h * w for f, h, w in (grid, *references))
            of_references = f" and its {len(references)} reference latents' grids" if references else ""
            raise tomediff.MergeCallError(
                f"tomediff reduced no attention call of this {family} model: none had the {image} image "
                f"tokens of the latent's {grid} grid{of_references} (alone or after {text} text tokens) "
                f"without a mask; {self.report}. This model lays out its image tokens in a way the node "
                "cannot read: bypass the tomediff node for this workflow."
            )
        return out

    def downsample(
        self, k: torch.Tensor, v: torch.Tensor, axis: int, prefix: int, grids: tuple[Grid, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._downsample(k, axis, prefix, grids), self._downsample(v, axis, prefix, grids)

    def _downsample(self, x: torch.Tensor, axis: int, prefix: int, grids: tuple[Grid, ...]) -> torch.Tensor:
        """The image tokens after ``prefix`` along ``axis``, each image and frame downsampled on its grid."""
        image = x.narrow(axis, prefix, x.shape[axis] - prefix).movedim(axis, -2)
        lead, channels = image.shape[:-2], image.shape[-1]
        factor, mode = self.config.downsample_factor, self.config.downsample_mode
        parts, start = [], 0
        for frames, height, width in grids:
            size = frames * height * width
            per_frame = image.narrow(-2, start, size).reshape(-1, height * width, channels)
            reduced = downsample_grid(per_frame, height, width, factor, mode)  # type: ignore[arg-type]
            parts.append(reduced.reshape(*lead, frames * reduced.shape[1], channels))
            start += size
        reduced = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)).movedim(-2, axis)
        return torch.cat((x.narrow(axis, 0, prefix), reduced), dim=axis) if prefix else reduced


def _as_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H*D]`` or ``[B, L, H, D]`` (SD3 passes its values so) ``-> [B, H, L, D]``."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class _Override:
    """The attention function override for one model call."""

    def __init__(self, owner: DitAttention, grids: tuple[Grid, ...], text: int) -> None:
        self.owner = owner
        self.grids = grids  # the latent's, then each reference latent's
        self.text = text

    def __call__(
        self, func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        options = {**dict(zip(_ATTENTION_PARAMETERS, args, strict=False)), **kwargs}
        axis = 2 if options.get("skip_reshape", False) else 1
        image = sum(frames * height * width for frames, height, width in self.grids)
        length = int(k.shape[axis])
        prefix = {image: 0, image + self.text: self.text}.get(length)
        plan = None
        if prefix is not None and q.shape[axis] == length and options.get("mask") is None:
            plan = self._plan(k, axis, prefix, image)
        if plan is None:
            report = self.owner.report
            report.untouched_calls += 1
            report.untouched_shapes.add((int(q.shape[axis]), length))
            return func(q, k, v, *args, **kwargs)
        report = self.owner.report
        report.reduced_calls += 1
        report.queries_before = report.keys_before = length
        if isinstance(plan, str):  # "downsample"
            k, v = self.owner.downsample(k, v, axis, prefix, self.grids)
            report.queries_after, report.keys_after = length, int(k.shape[axis])
            return func(q, k, v, *args, **kwargs)
        report.queries_after = length - image + plan.num_queries
        report.keys_after = length - image + plan.num_merged
        return self._merge(func, q, k, v, options, plan, prefix)

    def _plan(self, k: torch.Tensor, axis: int, prefix: int, image: int) -> Any:
        """How this self/joint attention call is reduced: ``"downsample"``, an
        :class:`~tomediff.ops.AttentionPlan`, or None (nothing to reduce)."""
        config = self.owner.config
        if not self.owner.reduces(len(self.grids) > 1):
            return None
        if config.method == "downsample":
            return "downsample"
        image_keys = k.narrow(axis, prefix, image)
        # The tokens are matched on their post-rotary keys, all heads: [B, N, H*D].
        metric = (image_keys if axis == 1 else image_keys.transpose(1, 2)).flatten(2)
        generator = self.owner.generator if config.use_rand else None
        # Frames stacked in height: windows stay within a frame when sy divides it.
        grids = [(frames * height, width) for frames, height, width in self.grids]
        if len(grids) == 1:
            (height, width), ratio, kv_ratio = grids[0], config.ratio, config.kv_ratio
            return attention_merge_plan(
                metric, height, width, ratio, kv_ratio, sx=config.sx, sy=config.sy, generator=generator
            )
        latent = (config.ratio, config.kv_ratio)
        # reference_ratio merges a reference's queries and keys/values alike (None: like the latent).
        reference = latent if config.reference_ratio is None else (config.reference_ratio, None)
        ratios = [latent] + [reference] * (len(grids) - 1)
        return grouped_attention_merge_plan(
            metric, grids, ratios, sx=config.sx, sy=config.sy, generator=generator
        )

    @staticmethod
    def _merge(
        func: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        options: dict[str, Any],
        plan: Any,
        prefix: int,
    ) -> torch.Tensor:
        """Attention with the image rows merged by ``plan``, returned in the layout the caller asked for."""
        heads = int(options["heads"])
        if not options.get("skip_reshape", False):
            q, k, v = (_as_heads(x, heads) for x in (q, k, v))
        call_options = {**options, "skip_reshape": True, "skip_output_reshape": True}

        def attention(
            query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None
        ) -> torch.Tensor:
            out = func(query, key, value, **{**call_options, "mask": attn_mask})
            # attention_pytorch's batch-chunked branch (batches over SDP_BATCH_LIMIT) ignores
            # skip_output_reshape and returns [B, L, H*D].
            return _as_heads(out, heads) if out.dim() == 3 else out

        out = reduced_attention(attention, plan, prefix, q, k, v)  # [B, H, L, D]
        if options.get("skip_output_reshape", False):
            return out
        batch, _, length, dim = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * dim)
