"""Bundled-model plumbing: prompt encoder, UNet layout, sampler determinism, training resume, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tomediff
from tomediff.eval.model import DEMO_UNET_CONFIG, ClassPromptEncoder, build_demo_unet
from tomediff.eval.pipeline import load_demo_model
from tomediff.eval.testing import TINY_UNET_OVERRIDES, make_tiny_assets, write_fake_fashion_mnist
from tomediff.eval.train_demo import export_weights, train


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


def test_prompt_encoder_tokenizes_class_names_like_a_text_encoder() -> None:
    encoder = ClassPromptEncoder()
    ankle, boot = encoder.word_to_id["ankle"], encoder.word_to_id["boot"]
    assert encoder.tokenize(["Ankle boot"]).tolist() == [[encoder.BOS, ankle, boot, encoder.EOS]]
    assert encoder.tokenize([""]).tolist() == [[encoder.BOS, encoder.EOS, encoder.PAD, encoder.PAD]]
    tokens = encoder.tokenize_classes(range(10))
    assert len({tuple(row) for row in tokens.tolist()}) == 10  # every class has its own prompt
    assert encoder(tokens).shape == (10, 4, 64)
    with pytest.raises(KeyError):
        encoder.tokenize(["Jacket"])


def test_top_transformer_level_has_256_tokens_and_sd_block_types() -> None:
    unet = build_demo_unet()
    assert [type(b).__name__ for b in unet.down_blocks] == list(DEMO_UNET_CONFIG["down_block_types"])
    seen: list[int] = []
    first_block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert type(first_block).__name__ == "BasicTransformerBlock"
    assert first_block.attn2 is not None and first_block.ff is not None  # cross-attention and FF present
    handle = first_block.attn1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 4, 64))
    handle.remove()
    assert seen == [256]


def test_sampler_is_deterministic_per_seed_and_merging_is_removable(tiny_assets: Path) -> None:
    torch.manual_seed(123)  # the sampler must not depend on the global RNG
    pipe = load_demo_model(tiny_assets)
    first = pipe([0, 1, 2, 3], [10, 11, 12, 13], num_inference_steps=3)
    torch.manual_seed(999)
    again = pipe([0, 1, 2, 3], [10, 11, 12, 13], num_inference_steps=3)
    assert first.shape == (4, 28, 28) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    # A sample depends on its seed, not on its batch (up to float rounding of a different batch size).
    alone = pipe([2], [12], num_inference_steps=3)
    assert np.abs(alone[0].astype(int) - first[2].astype(int)).max() <= 1
    other = pipe([0, 1, 2, 3], [20, 21, 22, 23], num_inference_steps=3)
    assert not np.array_equal(other, first)
    handle = tomediff.apply_tome(pipe, ratio=0.5)
    merged = pipe([0, 1, 2, 3], [10, 11, 12, 13], num_inference_steps=3)
    handle.remove()
    assert not np.array_equal(merged, first)  # merging did act on the 256-token level
    np.testing.assert_array_equal(pipe([0, 1, 2, 3], [10, 11, 12, 13], num_inference_steps=3), first)


def test_training_resumes_to_the_same_weights_and_exports_a_loadable_model(tmp_path: Path) -> None:
    data = write_fake_fashion_mnist(tmp_path)
    common = {
        "batch_size": 8,
        "warmup": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "data_dir": str(data),
        "unet_overrides": TINY_UNET_OVERRIDES,
    }
    straight = train(tmp_path / "straight", steps=4, **common)
    train(tmp_path / "resumed", steps=2, **common)
    resumed = train(tmp_path / "resumed", steps=4, **common)
    a = torch.load(straight, weights_only=False)
    b = torch.load(resumed, weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and '"loss"' in log[-1]
    export_weights(resumed, tmp_path / "assets", unet_overrides=TINY_UNET_OVERRIDES)
    pipe = load_demo_model(tmp_path / "assets")
    assert pipe([5], [0], num_inference_steps=2).shape == (1, 28, 28)
