"""The bundled demo DiT (a small ``FluxTransformer2DModel``): layout, flow-matching conventions shared by
training and sampling, token merging through the Flux adapter, training resume and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tomediff
from tomediff.eval.model import (
    DEMO_DIT_CONFIG,
    ClassPromptEncoder,
    build_demo_dit,
    dit_position_ids,
    latents_to_tokens,
    tokens_to_latents,
)
from tomediff.eval.pipeline import ASSETS_DIR, DIT_FILES, DIT_HIRES_FILES, DemoDiTPipeline, load_demo_dit
from tomediff.eval.testing import TINY_DIT_OVERRIDES, make_tiny_dit_assets, write_fake_fashion_mnist
from tomediff.eval.train_dit import export_dit_weights, flow_matching_loss, train_dit

BUNDLED = all((ASSETS_DIR / name).is_file() for name in DIT_FILES)


@pytest.fixture(scope="module")
def tiny_dit_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dit_assets(tmp_path_factory.mktemp("dit_assets"))


def test_demo_dit_is_flux_with_joint_attention_over_256_image_tokens() -> None:
    dit = build_demo_dit()
    assert type(dit).__name__ == "FluxTransformer2DModel"
    assert dit.config.guidance_embeds is False and dit.config.patch_size == 1
    assert sum(DEMO_DIT_CONFIG["axes_dims_rope"]) == DEMO_DIT_CONFIG["attention_head_dim"]
    kinds = {type(b).__name__ for b in [*dit.transformer_blocks, *dit.single_transformer_blocks]}
    assert kinds == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    seen: list[tuple[int, int]] = []
    hook = dit.transformer_blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            (kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1])
        ),
        with_kwargs=True,
    )
    img_ids, txt_ids = dit_position_ids(16, 16, 4)
    with torch.no_grad():
        out = dit(
            torch.zeros(1, 256, 4),
            encoder_hidden_states=torch.zeros(1, 4, 64),
            pooled_projections=torch.zeros(1, 64),
            timestep=torch.tensor([0.5]),
            img_ids=img_ids,
            txt_ids=txt_ids,
        ).sample
    hook.remove()
    assert seen == [(256, 4)]  # 256 image tokens attend jointly with the 4 prompt tokens
    assert out.shape == (1, 256, 4)
    # Row-major tokens: img_ids carry (0, row, column) of each token, and the packing round-trips.
    assert img_ids[17].tolist() == [0.0, 1.0, 1.0] and txt_ids.abs().sum() == 0
    latents = torch.randn(2, 4, 16, 16)
    assert torch.equal(latents_to_tokens(latents)[:, 17], latents[:, :, 1, 1])
    assert torch.equal(tokens_to_latents(latents_to_tokens(latents), 16, 16), latents)


def test_pooled_prompt_ignores_padding() -> None:
    encoder = ClassPromptEncoder(dim=8)
    ids = encoder.tokenize(["Bag", ""])
    hidden = encoder(ids)
    pooled = encoder.pool(hidden, ids)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))  # <bos> bag <eos>, not the padding
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))


class _VelocityOracle(nn.Module):
    """Stands in for the transformer when every sample starts from ``x0``: the exact flow-matching
    velocity ``(x_t - x0) / sigma`` at the sigma it is given as ``timestep``."""

    def __init__(self, x0_tokens: torch.Tensor) -> None:
        super().__init__()
        self.x0_tokens = x0_tokens
        self.anchor = nn.Parameter(torch.zeros(1))  # device/dtype for the pipeline

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **_: object) -> object:
        sigma = timestep.view(-1, 1, 1)
        x0 = self.x0_tokens.repeat(hidden_states.shape[0] // self.x0_tokens.shape[0], 1, 1)
        return type("Output", (), {"sample": (hidden_states - x0) / sigma})()


def test_training_target_and_sampler_agree_on_the_flow_matching_convention() -> None:
    """The loss is zero for the exact velocity at the sigma the transformer receives, and the Euler
    sampler, handed that same velocity, lands exactly on x0: training and sampling use one
    convention (x_t = (1 - sigma) x0 + sigma noise, v = noise - x0, timestep = sigma)."""
    x0 = torch.rand(2, 4, 16, 16) * 2 - 1
    encoder = ClassPromptEncoder()
    model = nn.Module()
    model.transformer = _VelocityOracle(latents_to_tokens(x0))
    model.text_encoder = encoder
    loss = flow_matching_loss(model, x0, encoder.tokenize_classes([1, 2]), torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    pipe = DemoDiTPipeline(model.transformer, encoder)
    latents = pipe.generate_latents([1, 2], [3, 4], num_inference_steps=4, guidance_scale=2.0)
    torch.testing.assert_close(latents, x0, rtol=0, atol=1e-4)


def test_dit_sampler_is_deterministic_and_merging_reduces_every_block_and_is_removable(
    tiny_dit_assets: Path,
) -> None:
    torch.manual_seed(123)  # the sampler must not depend on the global RNG
    pipe = load_demo_dit(tiny_dit_assets)
    first = pipe([0, 7], [10, 11], num_inference_steps=2)
    torch.manual_seed(999)
    assert first.shape == (2, 28, 28) and first.dtype == np.uint8
    np.testing.assert_array_equal(pipe([0, 7], [10, 11], num_inference_steps=2), first)
    assert not np.array_equal(pipe([0, 7], [20, 21], num_inference_steps=2), first)
    handle = tomediff.apply_tome(pipe, ratio=0.5)  # the pipeline's .transformer, via the Flux adapter
    merged = pipe([0, 7], [10, 11], num_inference_steps=2)
    report = handle.report()
    handle.remove()
    assert report.adapter == "diffusers-flux"
    assert [b.name for b in report.blocks] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert [(b.last_call.tokens, b.last_call.tokens_after_merge) for b in report.blocks] == [(256, 128)] * 2
    assert not np.array_equal(merged, first)
    np.testing.assert_array_equal(pipe([0, 7], [10, 11], num_inference_steps=2), first)


def test_dit_pipeline_refuses_unet_schedulers_and_missing_assets(
    tmp_path: Path, tiny_dit_assets: Path
) -> None:
    pipe = load_demo_dit(tiny_dit_assets)
    with pytest.raises(ValueError, match=r"'dpm'.*use 'euler'"):
        pipe([0], [0], num_inference_steps=2, scheduler="dpm")
    with pytest.raises(FileNotFoundError, match=r"demo_dit\.json.*train_dit"):
        load_demo_dit(tmp_path)


def test_dit_training_resumes_to_the_same_weights_and_exports_a_loadable_model(tmp_path: Path) -> None:
    data = write_fake_fashion_mnist(tmp_path)
    common = {
        "batch_size": 4,
        "warmup": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "data_dir": str(data),
        "dit_overrides": TINY_DIT_OVERRIDES,
    }
    straight = train_dit(tmp_path / "straight", steps=4, **common)
    train_dit(tmp_path / "resumed", steps=2, **common)
    resumed = train_dit(tmp_path / "resumed", steps=4, **common)
    a = torch.load(straight, weights_only=False)
    b = torch.load(resumed, weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and '"loss"' in log[-1]
    export_dit_weights(resumed, tmp_path / "assets", dit_overrides=TINY_DIT_OVERRIDES)
    pipe = load_demo_dit(tmp_path / "assets")
    exported = {
        k.removeprefix("transformer."): v for k, v in b["ema"].items() if k.startswith("transformer.")
    }
    torch.testing.assert_close(pipe.transformer.state_dict(), exported, rtol=0, atol=0)  # the EMA weights
    assert pipe([5], [0], num_inference_steps=2).shape == (1, 28, 28)


@pytest.mark.skipif(not BUNDLED, reason="the trained demo DiT is not bundled in this checkout")
def test_bundled_dit_generates_and_merges_removably() -> None:
    pipe = load_demo_dit()
    assert pipe.transformer.config.num_layers == DEMO_DIT_CONFIG["num_layers"]
    first = pipe([0, 7], [1, 2], num_inference_steps=2)
    with tomediff.tome(pipe, ratio=0.5) as handle:
        merged = pipe([0, 7], [1, 2], num_inference_steps=2)
        report = handle.report()
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert len(report.blocks) == blocks
    assert all(b.last_call.tokens == 256 and b.last_call.tokens_after_merge == 128 for b in report.blocks)
    assert not np.array_equal(merged, first)
    np.testing.assert_array_equal(pipe([0, 7], [1, 2], num_inference_steps=2), first)


def test_quality_eval_runs_on_the_dit_with_its_own_sampler(tmp_path: Path) -> None:
    import json

    from tomediff.eval.quality import QualityOptions, run_quality_eval
    from tomediff.eval.testing import make_tiny_assets

    assets = make_tiny_dit_assets(make_tiny_assets(tmp_path / "assets"))  # + classifier and reference stats
    options = QualityOptions(
        out_dir=tmp_path / "eval",
        model="dit",
        samples_per_class=1,
        batch_size=10,
        steps=2,
        ratios=(0.0, 0.5),
        variants=(),
        different_seed=False,
        assets_dir=assets,
        progress=False,
        bootstrap=10,
    )
    rows = run_quality_eval(options)
    assert rows is not None and len(rows) == 2
    meta = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]
    assert (meta["model"], meta["scheduler"]) == ("dit", "euler")
    assert rows[0]["psnr"] is None  # the unmerged row is the reference
    assert rows[1]["psnr"]["value"] < 100  # merging changed the DiT's images (identical images give inf)


def test_quality_eval_refuses_tomesd_unet_samplers_and_unknown_models_for_the_dit() -> None:
    from tomediff.errors import ConfigError
    from tomediff.eval.quality import QualityOptions, run_quality_eval

    with pytest.raises(ConfigError, match="tomesd patches only UNets"):
        run_quality_eval(QualityOptions(model="dit", compare=("tomesd",)))
    with pytest.raises(ConfigError, match="for model='dit-hires'"):
        run_quality_eval(QualityOptions(model="dit-hires", compare=("tomesd",)))
    with pytest.raises(
        ConfigError, match=r"model='vit' is not a bundled model; use one of \['dit', 'dit-hires', 'unet'\]"
    ):
        run_quality_eval(QualityOptions(model="vit"))


def test_high_resolution_latents_are_upsampled_images_and_decode_back_to_32() -> None:
    from torch.nn import functional as F

    from tomediff.eval.model import images_to_latents, latents_to_images

    images = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(latents_to_images(images_to_latents(images)), images)  # 32: lossless as before
    latents = images_to_latents(images, 64)
    assert latents.shape == (2, 4, 32, 32)
    upsampled = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(F.pixel_shuffle(latents, 2), upsampled)
    # Decoding averages each 2×2 block of the 64×64 image: back on the classifier's 32×32 grid.
    torch.testing.assert_close(latents_to_images(latents), F.avg_pool2d(upsampled, 2))


def test_high_resolution_dit_fine_tunes_from_the_32_model_and_merges_its_1024_tokens(
    tmp_path: Path, tiny_dit_assets: Path
) -> None:
    from safetensors.torch import load_file

    data = write_fake_fashion_mnist(tmp_path)
    checkpoint = train_dit(
        tmp_path / "run",
        steps=2,
        batch_size=4,
        lr=1e-12,  # too small to move the weights: what is exported is what was loaded
        warmup=1,
        data_dir=str(data),
        dit_overrides=TINY_DIT_OVERRIDES,
        image_size=64,
        init_from=tiny_dit_assets,
    )
    export_dit_weights(
        checkpoint, tmp_path / "assets", TINY_DIT_OVERRIDES, image_size=64, init_from=tiny_dit_assets
    )
    assert all((tmp_path / "assets" / name).is_file() for name in DIT_HIRES_FILES)
    with pytest.raises(FileNotFoundError, match=r"demo_dit_hires\.json.*--image-size 64"):
        load_demo_dit(tiny_dit_assets, image_size=64)
    pipe = load_demo_dit(tmp_path / "assets", image_size=64)
    assert pipe.image_size == 64
    torch.testing.assert_close(
        pipe.transformer.state_dict(), load_file(tiny_dit_assets / DIT_FILES[0]), rtol=0, atol=1e-6
    )
    first = pipe([3, 8], [0, 1], num_inference_steps=2)
    assert first.shape == (2, 28, 28)
    with tomediff.tome(pipe, ratio=0.5) as handle:
        merged = pipe([3, 8], [0, 1], num_inference_steps=2)
        counts = {(b.last_call.tokens, b.last_call.tokens_after_merge) for b in handle.report().blocks}
    assert counts == {(1024, 512)}  # 32×32 latent positions, one token each
    assert not np.array_equal(merged, first)
    np.testing.assert_array_equal(pipe([3, 8], [0, 1], num_inference_steps=2), first)
    with pytest.raises(ValueError, match=r"image_size=48; use one of \[32, 64\]"):
        load_demo_dit(tmp_path / "assets", image_size=48)


@pytest.mark.skipif(
    not all((ASSETS_DIR / name).is_file() for name in DIT_HIRES_FILES),
    reason="the high-resolution demo DiT is not bundled in this checkout",
)
def test_bundled_high_resolution_dit_is_the_same_architecture_over_1024_tokens() -> None:
    small, large = load_demo_dit(), load_demo_dit(image_size=64)
    assert large.image_size == 64 and large.transformer.config == small.transformer.config
    with tomediff.tome(large, ratio=0.5) as handle:
        images = large([0, 7], [1, 2], num_inference_steps=2)
        counts = {(b.last_call.tokens, b.last_call.tokens_after_merge) for b in handle.report().blocks}
    assert images.shape == (2, 28, 28) and counts == {(1024, 512)}
