"""Split an ``h × w`` token grid into dst tokens (one per ``sy × sx`` window) and src tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Partition", "draw_dst_offsets", "grid_partition"]


@dataclass(frozen=True)
class Partition:
    """Which tokens of a row-major ``height × width`` grid are dst and which are src.

    Attributes:
        dst_idx: ``[Nd]`` int64 token indices of the dst tokens, one per full window.
        src_idx: ``[Ns]`` int64 token indices of every other token (leftover rows and columns
            of grids that are not multiples of the window are src), ``Nd + Ns = height * width``.
    """

    dst_idx: torch.Tensor
    src_idx: torch.Tensor
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_dst(self) -> int:
        return int(self.dst_idx.shape[0])

    @property
    def num_src(self) -> int:
        return int(self.src_idx.shape[0])


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


def grid_partition(
    height: int, width: int, sx: int, sy: int, offsets: torch.Tensor, device: torch.device | str = "cpu"
) -> Partition:
    """Build the dst/src index sets of a grid from per-window dst offsets.

    Args:
        height, width: token grid size; need not be multiples of ``sy``/``sx``.
        offsets: ``[height // sy, width // sx]`` int64, as from :func:`draw_dst_offsets`.
        device: where the returned indices live. They are built on the CPU (cheap integer work)
            and copied once, so no device-to-host synchronisation is needed.
    """
    windows_y, windows_x = height // sy, width // sx
    if tuple(offsets.shape) != (windows_y, windows_x):
        raise ValueError(
            f"offsets must have shape {(windows_y, windows_x)} for a {height}x{width} grid with "
            f"sx={sx}, sy={sy}; got {tuple(offsets.shape)}."
        )
    offsets = offsets.to("cpu", torch.int64)
    rows = torch.arange(windows_y).mul_(sy).unsqueeze(1) + offsets // sx
    cols = torch.arange(windows_x).mul_(sx).unsqueeze(0) + offsets % sx
    dst_idx = (rows * width + cols).flatten()
    is_dst = torch.zeros(height * width, dtype=torch.bool)
    is_dst[dst_idx] = True
    src_idx = torch.nonzero(~is_dst).flatten()
    device = torch.device(device)
    return Partition(dst_idx.to(device), src_idx.to(device), height, width)
