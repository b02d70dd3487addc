"""Split an ``h × w`` token grid into dst tokens (one per ``sy × sx`` window) and src tokens.

A video's ``frames`` frames are stacked into one grid (``height = frames × frame height``); its windows
are ``st × sy × sx`` (time, height, width) and never cross a frame boundary except across the ``st``
frames one window spans, whether or not ``sy`` divides the frame height. Rows and columns left over
in each frame (and frames left over in time) are src.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Partition", "draw_dst_offsets", "grid_partition", "num_windows", "window_tokens"]


@dataclass(frozen=True)
class Partition:
    """Which tokens of a row-major ``height × width`` grid are dst and which are src.

    Attributes:
        dst_idx: ``[Nd]`` int64 token indices of the dst tokens, one per full window, in row-major
            window order.
        src_idx: ``[Ns]`` int64 token indices of every other token, increasing (leftover rows and
            columns of grids that are not multiples of the window are src), ``Nd + Ns = height * width``.
    """

    dst_idx: torch.Tensor
    src_idx: torch.Tensor
    height: int
    width: int
    num_dst: int
    num_src: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


def num_windows(height: int, width: int, sx: int, sy: int, frames: int = 1, st: int = 1) -> int:
    """How many full ``sy × sx`` windows (``st × sy × sx`` for ``frames`` frames stacked in ``height``),
    and so dst tokens, an ``height × width`` grid has."""
    return (frames // st) * (height // frames // sy) * (width // sx)


def draw_dst_offsets(
    height: int, width: int, sx: int, sy: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Position of the dst token inside each full window, ``k = row * sx + col``.

    Returns:
        ``[height // sy, width // sx]`` int64 on the CPU: uniform in ``[0, sx*sy)`` drawn from
        ``generator``, or all zeros (top-left) when ``generator`` is None.
    """
    shape = (height // sy, width // sx)
    if generator is None:
        return torch.zeros(shape, dtype=torch.int64)
    return torch.randint(sx * sy, shape, generator=generator, dtype=torch.int64)


def window_tokens(
    height: int,
    width: int,
    sx: int,
    sy: int,
    device: torch.device | str | None = None,
    frames: int = 1,
    st: int = 1,
) -> torch.Tensor:
    """Token index of every position of every full window: ``[Nd, st*sy*sx]`` int64, row ``w`` for the
    w-th window (time, then row-major within the frame), column ``k = (t * sy + row) * sx + col``
    inside it. ``height`` holds ``frames`` stacked frames. Depends only on the shape, so callers cache
    it and pass it to :func:`grid_partition`."""
    frame_height = height // frames
    windows_y, windows_x = frame_height // sy, width // sx
    corner = (
        torch.arange(windows_y, device=device).mul_(sy * width).unsqueeze(1)
        + torch.arange(windows_x, device=device).mul_(sx).unsqueeze(0)
    ).view(-1, 1)
    k = torch.arange(sx * sy, device=device)
    offsets = (k.div(sx, rounding_mode="floor") * width + k.remainder(sx)).unsqueeze(0)
    if frames == 1 and st == 1:
        return corner + offsets
    frame_size = frame_height * width
    groups = torch.arange(frames // st, device=device).mul_(st * frame_size).view(-1, 1, 1)
    corner = (groups + corner.view(1, -1, 1)).view(-1, 1)
    steps = torch.arange(st, device=device).mul_(frame_size).view(-1, 1)
    return corner + (steps + offsets).view(1, -1)


def grid_partition(
    height: int,
    width: int,
    sx: int,
    sy: int,
    offsets: torch.Tensor,
    device: torch.device | str | None = None,
    windows: torch.Tensor | None = None,
    frames: int = 1,
    st: int = 1,
) -> Partition:
    """Build the dst/src index sets of a grid from per-window dst offsets, on the offsets' device.

    Everything is shape-static tensor arithmetic (no ``nonzero``), so it needs no host sync and
    traces into one graph under ``torch.compile``.

    Args:
        height, width: token grid size; need not be multiples of ``sy``/``sx``.
        offsets: ``[Nd // (width // sx), width // sx]`` (``[height // sy, width // sx]`` for an image)
            or flat ``[Nd]`` integer offsets in ``[0, st*sy*sx)``, as from :func:`draw_dst_offsets`.
        device: where the indices live; default the device of ``offsets``.
        windows: :func:`window_tokens` for this grid, if the caller keeps it (saves its construction).
        frames, st: a video's frames stacked in ``height``, and how many frames a window spans.
    """
    windows_x = width // sx
    num_dst = num_windows(height, width, sx, sy, frames, st)
    windows_y = num_dst // windows_x if windows_x else 0
    if offsets.numel() != num_dst or (offsets.dim() == 2 and tuple(offsets.shape) != (windows_y, windows_x)):
        raise ValueError(
            f"offsets must have shape {(windows_y, windows_x)} for a {height}x{width} grid with "
            f"sx={sx}, sy={sy}; got {tuple(offsets.shape)}."
        )
    device = offsets.device if device is None else torch.device(device)
    if windows is None:
        windows = window_tokens(height, width, sx, sy, device, frames, st)
    num_tokens = height * width
    dst_idx = windows.gather(1, offsets.to(device=device, dtype=torch.int64).view(-1, 1)).view(-1)
    # A stable sort of "is src" puts the dst tokens first and the src tokens after them, each group in
    # increasing token order; unlike nonzero() its output size is known without a sync.
    is_src = torch.ones(num_tokens, dtype=torch.uint8, device=device).index_fill_(0, dst_idx, 0)
    src_idx = torch.sort(is_src, stable=True).indices[num_dst:]
    return Partition(dst_idx, src_idx, height, width, num_dst, num_tokens - num_dst)
