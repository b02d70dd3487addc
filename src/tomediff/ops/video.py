"""Token grids in three dimensions (video: frames × height × width, row-major within a frame).

A ``frames × height × width`` grid is downsampled by a window of ``st × sy × sx`` tokens (time, height,
width): one token per window, ``ceil`` on every axis so a grid that is not a multiple of the window is
still covered. ``st = 1`` downsamples in space only, frame by frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["downsample_video", "downsampled_video", "video_window_index"]


def downsampled_video(
    frames: int, height: int, width: int, st: int, sy: int, sx: int
) -> tuple[int, int, int]:
    """Grid after downsampling by ``st × sy × sx`` windows (``ceil`` of each side)."""
    return math.ceil(frames / st), math.ceil(height / sy), math.ceil(width / sx)


def video_window_index(
    frames: int, height: int, width: int, st: int, sy: int, sx: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[M]`` int64: the first (earliest, top-left) token of each ``st × sy × sx`` window, in the
    row-major order of the downsampled grid (``M = ceil(f/st) * ceil(h/sy) * ceil(w/sx)``)."""
    t = torch.arange(0, frames, st, device=device)
    y = torch.arange(0, height, sy, device=device)
    x = torch.arange(0, width, sx, device=device)
    return ((t[:, None, None] * height + y[None, :, None]) * width + x[None, None, :]).reshape(-1)


def downsample_video(
    x: torch.Tensor, frames: int, height: int, width: int, st: int, sy: int, sx: int, mode: str = "nearest"
) -> torch.Tensor:
    """Tokens of a coarser video grid: ``x: [B, f*h*w, C] -> [B, M, C]`` (row-major, time first).

    Modes: ``nearest`` (the first token of each window), ``avg`` (the mean of each window; partial
    windows at the borders average what they have) and ``bilinear`` (trilinear resampling to the
    coarser grid, ``align_corners=False``).
    """
    batch, num_tokens, channels = x.shape
    if num_tokens != frames * height * width:
        raise ValueError(f"downsample_video got {num_tokens} tokens for a {frames}x{height}x{width} grid.")
    if st == sy == sx == 1:
        return x
    if mode == "nearest":
        return x.index_select(1, video_window_index(frames, height, width, st, sy, sx, x.device))
    volume = x.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
    if mode == "avg":
        pooled = F.avg_pool3d(volume, (st, sy, sx), ceil_mode=True)
    elif mode == "bilinear":
        size = downsampled_video(frames, height, width, st, sy, sx)
        pooled = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)
    else:
        raise ValueError(f"downsample mode must be 'nearest', 'avg' or 'bilinear', got {mode!r}.")
    return pooled.flatten(2).transpose(1, 2)
