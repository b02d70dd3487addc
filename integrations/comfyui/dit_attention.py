"""Key/value downsampling (ToDo) for ComfyUI's own diffusion transformers (Flux, SD3, Wan) through
ComfyUI's attention override, one mechanism for every family.

ComfyUI's DiT blocks compute q/k/v with fused projections, apply rotary positions inside a function
and call ``optimized_attention``; that call honours ``transformer_options["optimized_attention_override"]``.
The override sees post-rotary keys and values, so reducing them needs no knowledge of the rotary
layout: queries (and so the output) keep every token, and the image keys/values come from the latent's
token grid downsampled by ``downsample_factor`` (per frame for video). Text keys/values are kept.

Which rows are image tokens: the blocks' sequences are ``[text, image]`` (Flux, SD3 joint attention)
or image alone (Wan and SD3.5 self-attention), with the image grid known from the latent and the
model's patch size. An attention call whose key count matches neither (cross-attention, extra
reference-image tokens, a mask) is left alone and counted as such in :class:`AttentionReport`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import tomediff
from tomediff.ops import downsample_grid

__all__ = ["ATTENTION_FAMILIES", "AttentionReport", "KeyValueDownsample", "dit_family", "dit_options_error"]

# ComfyUI model classes (by name, any base class) whose attention calls this module reduces.
ATTENTION_FAMILIES = {"Flux": "flux", "MMDiT": "sd3", "WanModel": "wan"}

# What the attention override can honour; other settings must keep their defaults.
_HONOURED = {"method", "downsample_factor", "downsample_mode", "seed", "generator", "use_rand"}


def dit_family(diffusion_model: Any) -> str | None:
    """The family key of a ComfyUI DiT this module handles, else None."""
    for klass in type(diffusion_model).__mro__:
        if klass.__name__ in ATTENTION_FAMILIES:
            return ATTENTION_FAMILIES[klass.__name__]
    return None


def dit_options_error(config: tomediff.ToMeConfig, family: str) -> str | None:
    """Why ``config`` cannot run on a ComfyUI DiT (None when it can)."""
    if config.method != "downsample":
        return (
            f"ComfyUI's {family} model is reduced by key/value downsampling only: set method to "
            "'downsample' (token merging on ComfyUI's DiTs is not available yet)."
        )
    default = tomediff.ToMeConfig(method="downsample")
    changed = sorted(
        name
        for name in tomediff.ToMeConfig.__dataclass_fields__
        if name not in _HONOURED and getattr(config, name) != getattr(default, name)
    )
    if changed:
        return (
            f"{', '.join(changed)} do not apply to ComfyUI's {family} model (its attention keys/values are "
            "downsampled in every block); leave them at their defaults."
        )
    return None


@dataclass
class AttentionReport:
    """What the override did in the latest model call."""

    family: str
    grid: tuple[int, int, int] | None = None
    reduced_calls: int = 0
    untouched_calls: int = 0
    keys_before: int = 0
    keys_after: int = 0
    untouched_shapes: set[tuple[int, int]] = field(default_factory=set)

    def __str__(self) -> str:
        return (
            f"tomediff key/value downsampling on ComfyUI {self.family}: grid (frames, h, w) {self.grid}, "
            f"{self.reduced_calls} attention calls reduced (keys {self.keys_before} -> {self.keys_after} "
            f"per call), {self.untouched_calls} left alone "
            f"(query/key lengths {sorted(self.untouched_shapes)})"
        )


def _token_grid(diffusion_model: Any, latent: torch.Tensor) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the image tokens of a ``[B, C, H, W]`` or ``[B, C, T, H, W]`` latent."""
    patch = diffusion_model.patch_size
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    if len(patch) == 2:
        patch = (1, *patch)
    sizes = (1, *latent.shape[-2:]) if latent.dim() == 4 else tuple(latent.shape[-3:])
    frames, height, width = (math.ceil(size / step) for size, step in zip(sizes, patch, strict=True))
    return frames, height, width


class KeyValueDownsample:
    """``APPLY_MODEL`` wrapper that installs the attention override for the model call it wraps."""

    def __init__(self, config: tomediff.ToMeConfig, family: str, diffusion_model: Any) -> None:
        self.factor = config.downsample_factor
        self.mode = config.downsample_mode
        self.diffusion_model = diffusion_model
        self.report = AttentionReport(family)

    def __call__(self, executor: Any, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        # Positional after (x, t): c_concat, c_crossattn, control, transformer_options.
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        context = args[1] if len(args) > 1 else kwargs.get("c_crossattn")
        grid = _token_grid(self.diffusion_model, x)
        text = int(context.shape[1]) if isinstance(context, torch.Tensor) else 0
        self.report = AttentionReport(self.report.family, grid)
        previous = transformer_options.get("optimized_attention_override")
        if previous is not None:
            raise tomediff.ConflictingPatchError(
                "another node already set ComfyUI's attention override on this model; tomediff's key/value "
                "downsampling uses it too. Remove one of the two nodes."
            )
        transformer_options["optimized_attention_override"] = _Override(self, grid, text)
        try:
            out = executor(x, t, *args, **kwargs)
        finally:
            transformer_options.pop("optimized_attention_override", None)
        if self.factor > 1 and self.report.reduced_calls == 0:
            raise tomediff.MergeCallError(
                f"tomediff reduced no attention call of this {self.report.family} model: none had the "
                f"{grid[0] * grid[1] * grid[2]} image tokens of the latent's {grid} grid (alone or after "
                f"{text} text tokens); {self.report}. Extra image inputs (reference latents) are not "
                "supported yet: bypass the tomediff node for this workflow."
            )
        return out

    def reduce(
        self, k: torch.Tensor, v: torch.Tensor, axis: int, prefix: int, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._reduce(k, axis, prefix, grid), self._reduce(v, axis, prefix, grid)

    def _reduce(self, x: torch.Tensor, axis: int, prefix: int, grid: tuple[int, int, int]) -> torch.Tensor:
        frames, height, width = grid
        image = x.narrow(axis, prefix, x.shape[axis] - prefix).movedim(axis, -2)
        lead, channels = image.shape[:-2], image.shape[-1]
        per_frame = image.reshape(-1, frames, height * width, channels).reshape(-1, height * width, channels)
        reduced = downsample_grid(per_frame, height, width, self.factor, self.mode)  # type: ignore[arg-type]
        reduced = reduced.reshape(*lead, frames * reduced.shape[1], channels).movedim(-2, axis)
        return torch.cat((x.narrow(axis, 0, prefix), reduced), dim=axis) if prefix else reduced


class _Override:
    """The attention function override for one model call."""

    def __init__(self, owner: KeyValueDownsample, grid: tuple[int, int, int], text: int) -> None:
        self.owner = owner
        self.grid = grid
        self.text = text

    def __call__(
        self, func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        axis = 2 if kwargs.get("skip_reshape", False) else 1
        report = self.owner.report
        image = self.grid[0] * self.grid[1] * self.grid[2]
        length = k.shape[axis]
        prefix = {image: 0, image + self.text: self.text}.get(length)
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        if prefix is None or q.shape[axis] != length or mask is not None or self.owner.factor == 1:
            report.untouched_calls += 1
            report.untouched_shapes.add((int(q.shape[axis]), int(length)))
            return func(q, k, v, *args, **kwargs)
        k, v = self.owner.reduce(k, v, axis, prefix, self.grid)
        report.reduced_calls += 1
        report.keys_before, report.keys_after = int(length), int(k.shape[axis])
        return func(q, k, v, *args, **kwargs)
