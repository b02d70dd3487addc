"""Downsample a token grid (ToDo: keys and values of self-attention from a coarser grid)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tomediff.ops.video import downsample_video, downsampled_video, video_window_index

__all__ = ["DOWNSAMPLE_MODES", "DownsampleMode", "GridDownsample", "downsample_grid", "downsampled_grid"]

DownsampleMode = Literal["nearest", "avg", "bilinear"]
DOWNSAMPLE_MODES: tuple[str, ...] = ("nearest", "avg", "bilinear")


def downsampled_grid(height: int, width: int, factor: int) -> tuple[int, int]:
    """Grid after downsampling ``height × width`` by ``factor``: ``ceil`` of each side, so every
    token of a grid that is not a multiple of ``factor`` is still covered."""
    return math.ceil(height / factor), math.ceil(width / factor)


def downsample_grid(
    x: torch.Tensor, height: int, width: int, factor: int, mode: DownsampleMode = "nearest"
) -> torch.Tensor:
    """Tokens of a coarser grid: ``x: [B, h*w, C] -> [B, ceil(h/f) * ceil(w/f), C]``, row-major.

    Modes:
        nearest: the top-left token of each ``f × f`` window (a strided view, no arithmetic).
        avg: the mean of each window (partial windows at the border average what they have).
        bilinear: bilinear resampling to the coarser grid (``F.interpolate``, ``antialias=False``).
    """
    batch, num_tokens, channels = x.shape
    if num_tokens != height * width:
        raise ValueError(f"downsample_grid got {num_tokens} tokens for a {height}x{width} grid.")
    if factor == 1:
        return x
    out_h, out_w = downsampled_grid(height, width, factor)
    if mode == "nearest":
        grid = x.view(batch, height, width, channels)[:, ::factor, ::factor]
        return grid.reshape(batch, out_h * out_w, channels)
    image = x.view(batch, height, width, channels).permute(0, 3, 1, 2)
    if mode == "avg":
        pooled = F.avg_pool2d(image, factor, ceil_mode=True)
    elif mode == "bilinear":
        pooled = F.interpolate(image, size=(out_h, out_w), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"downsample mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}.")
    return pooled.flatten(2).transpose(1, 2)


@dataclass(frozen=True, eq=False)
class GridDownsample:
    """Plan of a downsampling block call: queries keep all ``num_tokens`` tokens; keys and values come
    from ``num_merged`` tokens of the grid downsampled by ``factor`` (in height and width; for a video
    grid of ``frames`` frames also by ``time_factor`` in time). Nothing is unmerged.

    ``height`` is the height of all frames stacked (``frames × frame height``), so a reader that knows
    only 2-D grids sees a valid ``height × width`` grid."""

    batch: int
    num_tokens: int
    num_merged: int
    height: int
    width: int
    factor: int
    mode: DownsampleMode
    frames: int = 1
    time_factor: int = 1

    @classmethod
    def build(
        cls,
        batch: int,
        height: int,
        width: int,
        factor: int,
        mode: DownsampleMode,
        frames: int = 1,
        time_factor: int = 1,
    ) -> GridDownsample:
        if frames > 1 or time_factor > 1:
            out = downsampled_video(frames, height // frames, width, time_factor, factor, factor)
            num_merged = out[0] * out[1] * out[2]
        else:
            out_h, out_w = downsampled_grid(height, width, factor)
            num_merged = out_h * out_w
        return cls(batch, height * width, num_merged, height, width, factor, mode, frames, time_factor)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, N, C] -> [B, M, C]`` key/value tokens."""
        if self.frames > 1 or self.time_factor > 1:
            f = self.frames
            return downsample_video(
                x, f, self.height // f, self.width, self.time_factor, self.factor, self.factor, self.mode
            )
        return downsample_grid(x, self.height, self.width, self.factor, self.mode)

    def sample(self, index: int) -> GridDownsample:
        """The plan of one batch element (batch 1; every element is downsampled alike)."""
        return dataclasses.replace(self, batch=1)

    def kept_index(self, device: torch.device) -> torch.Tensor | None:
        """``[M]`` the tokens ``reduce`` keeps when it only selects (``mode="nearest"``), else None."""
        if self.mode != "nearest":
            return None
        f = self.frames
        return video_window_index(
            f, self.height // f, self.width, self.time_factor, self.factor, self.factor, device
        )
