"""Tiny random-weight stand-ins for the bundled assets, for fast tests (no training, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tomediff.eval.model import DEMO_UNET_CONFIG, ClassPromptEncoder, build_demo_unet, build_scheduler_config

__all__ = ["TINY_UNET_OVERRIDES", "make_tiny_assets"]

# Same block types and 16×16 = 256-token top transformer level as the real model, far fewer channels.
TINY_UNET_OVERRIDES = {
    "block_out_channels": (8, 16, 16),
    "cross_attention_dim": 16,
    "attention_head_dim": 1,
    "norm_num_groups": 4,
}


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
