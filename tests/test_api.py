"""Configuration, errors, persistence and determinism of the public API."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import tomediff
from conftest import tiny_sd_unet, unet_inputs
from tomediff import ToMeConfig


@torch.no_grad()
def run_unet(unet: nn.Module) -> torch.Tensor:
    sample, timestep, context = unet_inputs()
    return unet(sample, timestep, context).sample


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(ratio=0.8), r"ratio=0.8 is outside \[0, 0.75\].*1 - 1/\(sx\*sy\) = 0.75"),
        (dict(ratio=-0.1), r"ratio=-0.1 is outside \[0, 0.75\]"),
        (dict(ratio=0.6, sx=2, sy=1), r"ratio=0.6 is outside \[0, 0.5\]"),
        (dict(ratio=float("nan")), "ratio must be a number"),
        (dict(ratio="0.5"), "ratio must be a number"),
        (dict(sx=0), "sx must be a positive integer window size, got 0"),
        (dict(sy=-2), "sy must be a positive integer window size, got -2"),
        (dict(sx=1.5), "sx must be a positive integer"),
        (dict(sx=1, sy=1), "sx\\*sy must be at least 2"),
        (dict(max_downsample=0), "max_downsample must be a power of two .* got 0"),
        (dict(max_downsample=3), "max_downsample must be a power of two .* got 3. Use 2"),
        (dict(max_downsample=2.0), "max_downsample must be a power of two"),
        (dict(seed=2**64), r"seed=18446744073709551616 is outside .*manual_seed"),
        (dict(seed=-(2**63) - 1), "is outside the range"),
        (dict(use_rand=1), "use_rand must be True or False"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(use_rand="yes"), "use_rand must be True or False"),
        (dict(merge_attn=False), "all False, so nothing would be merged"),
        (dict(generator=42), "generator must be a torch.Generator"),
    ],
)
def test_bad_config_values_are_named_in_the_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToMeConfig(**options)  # type: ignore[arg-type]


def test_ratio_at_the_limit_is_allowed() -> None:
    assert ToMeConfig(ratio=0.75).ratio == 0.75
    assert ToMeConfig(ratio=8 / 9, sx=3, sy=3).max_ratio == pytest.approx(8 / 9)


def test_config_is_frozen_and_replace_validates() -> None:
    config = ToMeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ratio = 0.3  # type: ignore[misc]
    assert config.replace(ratio=0.3).ratio == 0.3 and config.ratio == 0.5
    with pytest.raises(ValueError, match=r"ratio=0.9"):
        config.replace(ratio=0.9)
    with pytest.raises(TypeError, match=r"Unknown ToMeConfig option.*rato"):
        config.replace(rato=0.3)


def test_apply_does_not_mutate_the_callers_config() -> None:
    config = ToMeConfig(ratio=0.4)
    handle = tomediff.apply_tome(tiny_sd_unet(), config, ratio=0.6)
    assert config.ratio == 0.4 and handle.config.ratio == 0.6


def test_unknown_keyword_is_rejected() -> None:
    with pytest.raises(TypeError, match="Valid options: ratio"):
        tomediff.apply_tome(tiny_sd_unet(), rato=0.5)


def test_unknown_model_types_are_rejected_clearly() -> None:
    with pytest.raises(TypeError, match="no adapter for Sequential"):
        tomediff.apply_tome(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="cannot patch a str"):
        tomediff.apply_tome("runwayml/stable-diffusion-v1-5")
    with pytest.raises(TypeError, match="config must be a ToMeConfig"):
        tomediff.apply_tome(tiny_sd_unet(), {"ratio": 0.5})  # type: ignore[arg-type]


def test_sites_that_do_not_exist_are_an_error() -> None:
    from diffusers.models.attention import BasicTransformerBlock

    from conftest import BlockStack

    no_cross = BlockStack([BasicTransformerBlock(16, 2, 8)])  # attn2 is None without cross_attention_dim
    with pytest.raises(ValueError, match=r"enabled merge sites \['crossattn'\] do not exist"):
        tomediff.apply_tome(no_cross, merge_attn=False, merge_crossattn=True)


def test_unexplained_token_counts_raise() -> None:
    from diffusers.models.attention import BasicTransformerBlock

    from conftest import BlockStack

    class Tokens(nn.Module):  # called with [B, N, C] tokens: no image size to read
        def __init__(self) -> None:
            super().__init__()
            self.stack = BlockStack([BasicTransformerBlock(16, 2, 8)])

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.stack.blocks[0](tokens)

    model = Tokens().eval()
    tomediff.apply_tome(model)
    with torch.no_grad():
        # A square count is no grid either: 36 tokens may be 6x6, 4x9 or two 3x6 images.
        for count in (35, 36):
            with pytest.raises(
                tomediff.MergeCallError, match=rf"cannot tell the token grid .* received {count} tokens"
            ):
                model(torch.randn(2, count, 16))


def test_patched_model_pickles_copies_and_keeps_its_state_dict(tmp_path: Path) -> None:
    unet = tiny_sd_unet()
    keys = list(unet.state_dict())
    tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    patched = run_unet(unet)
    assert list(unet.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(unet))
    assert torch.equal(run_unet(clone), patched)
    deep = copy.deepcopy(unet)
    assert torch.equal(run_unet(deep), patched)
    tomediff.remove_tome(clone)  # removal works from the hook tables, also on a copy
    tomediff.remove_tome(unet)
    assert torch.equal(run_unet(clone), run_unet(unet))
    tomediff.apply_tome(unet, ratio=0.5)
    unet.save_pretrained(tmp_path / "unet")
    reloaded = type(unet).from_pretrained(tmp_path / "unet").eval()
    tomediff.remove_tome(unet)
    assert torch.equal(run_unet(reloaded), run_unet(unet))


def test_report_lists_blocks_levels_and_token_counts() -> None:
    unet = tiny_sd_unet()
    handle = tomediff.apply_tome(unet, ratio=0.5, merge_crossattn=True)
    report = handle.report()
    assert report.calls == 0 and all(b.last_call is None for b in report.blocks)
    assert report.effective_ratio is None
    run_unet(unet)
    report = handle.report()
    assert [b.name for b in report.blocks] == [
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
    ]
    assert all(b.sites == ("attn", "crossattn") and b.downsample == 1 for b in report.blocks)
    assert report.effective_ratio == 0.5 and report.calls == 1
    text = str(report)
    assert "32x32" in text and "1024" in text and "512" in text and "diffusers-unet" in text
    assert "ToMeHandle(UNet2DConditionModel, 3 blocks, active" in repr(handle)


def test_same_seed_gives_identical_outputs_in_another_process() -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, {tests!r})
        import tomediff
        from conftest import tiny_sd_unet, unet_inputs
        unet = tiny_sd_unet()
        tomediff.apply_tome(unet, ratio=0.5, seed=11)
        sample, t, context = unet_inputs()
        with torch.no_grad():
            torch.save(unet(sample, t, context).sample, sys.argv[1])
        """
    ).format(tests=str(Path(__file__).parent))
    unet = tiny_sd_unet()
    tomediff.apply_tome(unet, ratio=0.5, seed=11)
    here = run_unet(unet)
    out = Path(pytest.importorskip("tempfile").mkdtemp()) / "out.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300)
    assert torch.equal(torch.load(out), here)


def test_tomesd_compatible_signature() -> None:
    import inspect

    tomesd = pytest.importorskip("tomesd")
    ours = inspect.signature(tomediff.apply_patch).parameters
    theirs = inspect.signature(tomesd.apply_patch).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]
    assert list(inspect.signature(tomediff.remove_patch).parameters) == ["model"]
