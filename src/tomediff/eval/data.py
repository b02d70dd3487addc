"""Fashion-MNIST loading (the real data set the bundled demo model is trained on).

The files come from Debian's ``dataset-fashion-mnist`` package; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATA_DIR",
    "DatasetMissingError",
    "load_fashion_mnist",
    "to_model_space",
    "to_uint8",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# Environment override so tests and CI can point at another copy without a flag on every command.
DATA_DIR_ENV = "TOMEDIFF_FASHION_MNIST_DIR"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissingError(FileNotFoundError):
    """Fashion-MNIST files are not where we looked."""


def _resolve_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install the Debian package "
        "'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist, which puts the files in "
        f"{DEFAULT_DATA_DIR}), or pass the directory holding the idx files (data_dir=... / --data-dir, "
        f"or set ${DATA_DIR_ENV})."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload, the only kind Fashion-MNIST uses
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        data_dir: directory with the four idx files (gzipped or not). Defaults to
            ``$TOMEDIFF_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``images`` uint8 ``(N, 28, 28)`` with 0 = black background, and ``labels`` int64 ``(N,)``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    directory = _resolve_dir(data_dir)
    image_stem, label_stem = _FILES[split]
    images = _read_idx(_find(directory, image_stem))
    labels = _read_idx(_find(directory, label_stem)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels.")
    return images, labels


def to_model_space(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` → float ``(N, 1, size, size)`` in [-1, 1], zero-padded centrally.

    Padding with the background value (black = -1) keeps the garment centred and gives the UNet a
    power-of-two grid, which its three resolution levels need.
    """
    tensor = torch.from_numpy(np.array(images, dtype=np.float32, copy=True))
    pad = size - tensor.shape[-1]
    if pad < 0:
        raise ValueError(f"size={size} is smaller than the images ({tensor.shape[-1]}).")
    tensor = tensor / 127.5 - 1.0
    tensor = torch.nn.functional.pad(tensor, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return tensor.unsqueeze(1)


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """Model-space float ``(N, 1, H, W)`` in [-1, 1] → uint8 ``(N, H, W)``."""
    scaled = ((samples.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled[:, 0].cpu().numpy()
