"""Tiny random-weight stand-ins for the bundled assets, for fast tests (no training, no download)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tomediff.eval.model import (
    DEMO_DIT_CONFIG,
    DEMO_UNET_CONFIG,
    ClassPromptEncoder,
    build_demo_dit,
    build_demo_unet,
    build_flow_scheduler_config,
    build_scheduler_config,
)

__all__ = [
    "TINY_DIT_OVERRIDES",
    "TINY_UNET_OVERRIDES",
    "make_tiny_assets",
    "make_tiny_dit_assets",
    "write_fake_fashion_mnist",
]

# Same block types and 16×16 = 256-token top transformer level as the real model, far fewer channels.
TINY_UNET_OVERRIDES: dict[str, Any] = {
    "block_out_channels": (8, 16, 16),
    "cross_attention_dim": 16,
    "attention_head_dim": 1,
    "norm_num_groups": 4,
}

# Same block kinds (double- then single-stream) and 256 image tokens as the real DiT, far fewer weights.
TINY_DIT_OVERRIDES: dict[str, Any] = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "axes_dims_rope": (2, 2, 4),
}


def make_tiny_dit_assets(directory: Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a random-weight demo DiT in the shipped layout (``DIT_FILES``; with ``image_size`` 64 the
    high-resolution DiT's files)."""
    from safetensors.torch import save_file

    from tomediff.eval.pipeline import dit_files

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = build_demo_dit(**TINY_DIT_OVERRIDES)
    encoder = ClassPromptEncoder(dim=TINY_DIT_OVERRIDES["joint_attention_dim"])
    transformer_file, encoder_file, meta_file = dit_files(image_size)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, directory / transformer_file)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, directory / encoder_file)
    meta = {
        "transformer": {**DEMO_DIT_CONFIG, **TINY_DIT_OVERRIDES},
        "text_encoder": encoder.config(),
        "scheduler": build_flow_scheduler_config(),
        "trained_steps": 0,
        "image_size": image_size,
    }
    (directory / meta_file).write_text(json.dumps(meta, default=list) + "\n")
    return directory


def make_tiny_assets(directory: Path, seed: int = 0) -> Path:
    """Write random-weight demo model, classifier and reference stats in the shipped layout."""
    from safetensors.torch import save_file

    from tomediff.eval.classifier import CLASSIFIER_FILE, REFERENCE_STATS_FILE, FashionClassifier

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = build_demo_unet(**TINY_UNET_OVERRIDES)
    encoder = ClassPromptEncoder(dim=TINY_UNET_OVERRIDES["cross_attention_dim"])
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, directory / "demo_unet.safetensors")
    save_file(
        {k: v.contiguous() for k, v in encoder.state_dict().items()},
        directory / "demo_text_encoder.safetensors",
    )
    meta = {
        "unet": {**DEMO_UNET_CONFIG, **TINY_UNET_OVERRIDES},
        "text_encoder": encoder.config(),
        "scheduler": build_scheduler_config(),
        "trained_steps": 0,
    }
    (directory / "demo_model.json").write_text(json.dumps(meta, default=list) + "\n")
    classifier = FashionClassifier().eval()
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, directory / CLASSIFIER_FILE)
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(500, FashionClassifier.feature_dim))
    np.savez(
        directory / REFERENCE_STATS_FILE,
        mu=features.mean(0),
        sigma=np.cov(features, rowvar=False),
        count=np.array(500),
    )
    return directory


def write_fake_fashion_mnist(directory: Path, count: int = 128) -> Path:
    """Random images and labels as a gzipped idx training split in ``directory`` (for training tests)."""
    rng = np.random.default_rng(0)
    for stem, array in (
        ("train-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28))),
        ("train-labels-idx1-ubyte", rng.integers(0, 10, count)),
    ):
        array = np.asarray(array, dtype=np.uint8)
        header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
            d.to_bytes(4, "big") for d in array.shape
        )
        with gzip.open(directory / f"{stem}.gz", "wb") as handle:
            handle.write(header + array.tobytes())
    return directory
