"""Video and image diffusion transformers reduced at the attention call (tiny random-weight configs of
the real diffusers classes): the same checks for every family, then family-specific ones (Wan 2.1/2.2)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from conftest import assert_close
from family_support import (
    TINY_COGVIDEOX_CONFIG,
    call_shapes,
    check_pipeline_reduces_and_restores,
    cogvideox_inputs,
    cogview_inputs,
    family_run,
    flux2_layout_inputs,
    tiny_wan_shaped,
)
from test_attention_site import SdpaSpy, spy_run
from test_dit_models import flux_inputs, tiny_flux, tome_hooks

diffusers = pytest.importorskip("diffusers")

WAN_TEXT = 7


def tiny_wan(**overrides: Any) -> nn.Module:
    return tiny_wan_shaped("WanTransformer3DModel", **overrides)


def wan_inputs(
    batch: int = 2, frames: int = 3, height: int = 8, width: int = 6
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 4, frames, height, width, generator=gen)
    text = torch.randn(batch, WAN_TEXT, 16, generator=gen)
    return (video, torch.full((batch,), 500.0), text), {"return_dict": False}


def wan_run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)[0]


def self_attention_calls(spy: SdpaSpy) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [call for call in spy.calls if call[1].shape[2] != WAN_TEXT]


def tiny_flux2() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def flux2_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return flux2_layout_inputs(batch, grid, text_dim=32, guidance=torch.full((batch,), 3.5))


def flux1_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    x, kwargs = flux_inputs(batch=batch, height=grid[1], width=grid[2])
    return (x,), kwargs


def wan_case_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    return wan_inputs(batch=batch, frames=frames, height=2 * height, width=2 * width)


def tiny_qwenimage() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def qwenimage_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[0, -2:] = 0  # padded text: the processor's joint mask has text columns to keep
    return (), {
        "hidden_states": torch.randn(batch, height * width, 16, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=gen),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((batch,), 0.5),
        "img_shapes": [[(1, height, width)]] * batch,
        "return_dict": False,
    }


def tiny_hunyuanvideo() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()


def hunyuanvideo_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, -2:] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, *grid, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "guidance": torch.full((batch,), 3500.0),
        "return_dict": False,
    }


def tiny_cogvideox() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(**TINY_COGVIDEOX_CONFIG).eval()


def tiny_ltxvideo() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=16,
    ).eval()


def ltxvideo_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, frames * height * width, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "timestep": torch.full((batch,), 500),
        "encoder_attention_mask": torch.ones(batch, 6),
        "num_frames": frames,
        "height": height,
        "width": width,
        "return_dict": False,
    }


def tiny_chroma() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()


def chroma_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    x, kwargs = flux_inputs(batch=batch, height=grid[1], width=grid[2])
    del kwargs["pooled_projections"]
    return (x[..., :4],), kwargs


def tiny_skyreels() -> nn.Module:
    return tiny_wan_shaped("SkyReelsV2Transformer3DModel")


def tiny_wan_vace() -> nn.Module:
    return tiny_wan_shaped("WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=4)


def wan_vace_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = wan_case_inputs(batch, grid)
    gen = torch.Generator().manual_seed(2)
    control = torch.randn(args[0].shape, generator=gen)
    return args, {**kwargs, "control_hidden_states": control}


def tiny_cogview4() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=4,
    ).eval()


def tiny_auraflow() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    ).eval()


def auraflow_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "timestep": torch.full((batch,), 500),
        "return_dict": False,
    }


def tiny_allegro() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,
        sample_width=6,
        sample_height=10,
        sample_frames=12,
        caption_channels=24,
    ).eval()


def allegro_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 24, generator=gen),
        "timestep": torch.full((batch,), 500),
        "return_dict": False,
    }


def tiny_cosmos() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,  # True needs torchvision to resize the mask
        extra_pos_embed_type="learnable",
    ).eval()


def cosmos_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 500),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=gen),
        "fps": 30,
        "return_dict": False,
    }


def tiny_hunyuanvideo15() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        task_type="t2v",
    ).eval()


def hunyuanvideo15_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6)
    mask[0, -2:] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, *grid, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, 4, 8, generator=gen),
        "encoder_attention_mask_2": torch.ones(batch, 4),
        "image_embeds": torch.zeros(batch, 5, 12),
        "return_dict": False,
    }


def tiny_flux_shaped(name: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        config = dict(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
        return getattr(diffusers, name)(**config, **extra).eval()

    return build


def flux_shaped_inputs(
    *drop: str,
) -> Callable[[int, tuple[int, int, int]], tuple[tuple[Any, ...], dict[str, Any]]]:
    def inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x, kwargs = flux_inputs(batch=batch, height=grid[1], width=grid[2])
        kwargs["timestep"] = torch.full((batch,), 0.5)
        return (x[..., :4],), {k: v for k, v in kwargs.items() if k not in drop}

    return inputs


@dataclass(frozen=True)
class Family:
    """A model class with a tiny config, its inputs for a batch and an image/video token grid
    ``(frames, height, width)`` (in tokens), and whether it takes several frames."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int, tuple[int, int, int]], tuple[tuple[Any, ...], dict[str, Any]]]
    video: bool = False


FAMILIES = {
    "flux": Family(tiny_flux, flux1_inputs),
    "flux2": Family(tiny_flux2, flux2_inputs),
    "qwenimage": Family(tiny_qwenimage, qwenimage_inputs),
    "chroma": Family(tiny_chroma, chroma_inputs),
    "bria": Family(tiny_flux_shaped("BriaTransformer2DModel", pooled_projection_dim=8), flux_shaped_inputs()),
    "longcat_image": Family(
        tiny_flux_shaped("LongCatImageTransformer2DModel", pooled_projection_dim=8),
        flux_shaped_inputs("pooled_projections"),
    ),
    "ovis_image": Family(
        tiny_flux_shaped("OvisImageTransformer2DModel", out_channels=4),
        flux_shaped_inputs("pooled_projections"),
    ),
    "cogview4": Family(tiny_cogview4, cogview_inputs),
    "auraflow": Family(tiny_auraflow, auraflow_inputs),
    "hunyuanvideo": Family(tiny_hunyuanvideo, hunyuanvideo_inputs, video=True),
    "hunyuanvideo15": Family(tiny_hunyuanvideo15, hunyuanvideo15_inputs, video=True),
    "cogvideox": Family(tiny_cogvideox, cogvideox_inputs, video=True),
    "ltxvideo": Family(tiny_ltxvideo, ltxvideo_inputs, video=True),
    "allegro": Family(tiny_allegro, allegro_inputs, video=True),
    "cosmos": Family(tiny_cosmos, cosmos_inputs, video=True),
    "wan": Family(tiny_wan, wan_case_inputs, video=True),
    "skyreels_v2": Family(tiny_skyreels, wan_case_inputs, video=True),
    "wan_vace": Family(tiny_wan_vace, wan_vace_inputs, video=True),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_family_ratio_zero_removal_and_token_counts_inside_attention(name: str, batch: int) -> None:
    family = FAMILIES[name]
    model = family.build()
    grid = (3, 5, 3) if family.video else (1, 5, 6)  # odd frames; non-square, odd sides
    num = math.prod(grid)
    inputs = family.inputs(batch, grid)
    reference, base = family_run(model, inputs)
    base_calls = call_shapes(base)
    assert any(q == k >= num for q, k in base_calls)
    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(family_run(model, inputs)[0], reference)
    kept = math.ceil(grid[0] / 1) * math.ceil(grid[1] / 2) * math.ceil(grid[2] / 2)
    settings: dict[str, tuple[dict[str, Any], int, int]] = {
        "downsample": ({"method": "downsample"}, num, kept),
        "kv_ratio": ({"ratio": 0.0, "kv_ratio": 0.5}, num, num - int(num * 0.5)),
        "asymmetric": ({"ratio": 0.25, "kv_ratio": 0.5}, num - int(num * 0.25), num - int(num * 0.5)),
    }
    for label, (options, queries, keys) in settings.items():
        handle = tomediff.apply_tome(model, use_rand=False, **options)
        out, spy = family_run(model, inputs)
        assert out.shape == reference.shape and not torch.equal(out, reference), label
        # Self/joint attention: the image queries/keys as configured, every other token kept;
        # cross-attention (text keys) untouched.
        expected = [(q - num + queries, k - num + keys) if q == k >= num else (q, k) for q, k in base_calls]
        assert call_shapes(spy) == expected, label
        handle.remove()
        assert tome_hooks(model) == 0
        assert torch.equal(family_run(model, inputs)[0], reference), label


@pytest.mark.parametrize("batch", [1, 3])
def test_wan_ratio_zero_and_removal_are_bit_exact_and_reduction_changes_the_output(batch: int) -> None:
    model = tiny_wan()
    args, kwargs = wan_inputs(batch=batch)
    reference = wan_run(model, args, kwargs)
    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(wan_run(model, args, kwargs), reference)
    for settings in ({}, {"method": "downsample"}, {"ratio": 0.0, "kv_ratio": 0.5}, {"merge_mlp": True}):
        handle = tomediff.apply_tome(model, **settings)
        out = wan_run(model, args, kwargs)
        assert out.shape == reference.shape and torch.isfinite(out).all()
        assert not torch.equal(out, reference), settings
        handle.remove()
        assert tome_hooks(model) == 0
        assert torch.equal(wan_run(model, args, kwargs), reference)


@pytest.mark.parametrize("time_factor", [1, 2])
def test_wan_downsample_keys_come_from_the_3d_grid_after_rotary(time_factor: int) -> None:
    model = tiny_wan()
    frames, height, width = 3, 10, 6  # odd frame count; 5 x 3 tokens per frame (non-square, odd)
    args, kwargs = wan_inputs(batch=2, frames=frames, height=height, width=width)
    _, base = spy_run(model, *args, **kwargs)
    handle = tomediff.apply_tome(model, method="downsample", downsample_factor_time=time_factor)
    _, spy = spy_run(model, *args, **kwargs)
    f, h, w = frames, height // 2, width // 2
    kept = math.ceil(f / time_factor) * math.ceil(h / 2) * math.ceil(w / 2)
    calls, base_calls = self_attention_calls(spy), self_attention_calls(base)
    assert len(calls) == len(base_calls) == 2
    for (q, k, v), (q0, _, _) in zip(calls, base_calls, strict=True):
        assert q.shape == q0.shape and k.shape[2] == v.shape[2] == kept
    index = tomediff.ops.video_window_index(f, h, w, time_factor, 2, 2)
    (q, k, v), (q0, k0, v0) = calls[0], base_calls[0]
    assert torch.equal(q, q0) and torch.equal(k, k0[:, :, index]) and torch.equal(v, v0[:, :, index])
    # The cross-attention (text keys/values) is left as it is.
    cross = [c for c in spy.calls if c[1].shape[2] == WAN_TEXT]
    assert len(cross) == 2 and all(c[0].shape[2] == f * h * w for c in cross)
    report = handle.report()
    assert report.blocks[0].last_call is not None and report.blocks[0].last_call.tokens_after_merge == kept
    handle.remove()


def test_wan_merging_reduces_queries_and_keys_and_copies_outputs_back() -> None:
    model = tiny_wan()
    args, kwargs = wan_inputs(batch=2, frames=2)
    handle = tomediff.apply_tome(model, ratio=0.5, kv_ratio=0.25, use_rand=False)
    _, spy = spy_run(model, *args, **kwargs)
    num = 2 * 4 * 3
    for q, k, _ in self_attention_calls(spy):
        assert q.shape[2] == num - int(num * 0.5) and k.shape[2] == num - int(num * 0.25)
    handle.remove()
    with tomediff.tome(model, ratio=0.5, use_rand=False, merge_crossattn=True):
        _, spy = spy_run(model, *args, **kwargs)
    assert [c[0].shape[2] for c in spy.calls] == [num // 2] * 4  # self- and cross-attention queries


def test_wan_image_to_video_with_image_context() -> None:
    model = tiny_wan(image_dim=8, added_kv_proj_dim=24)
    args, kwargs = wan_inputs(batch=1)
    kwargs = {**kwargs, "encoder_hidden_states_image": torch.randn(1, 3, 8)}
    # diffusers' I2V processor takes all but the last 512 context tokens as image context.
    args = (args[0], args[1], torch.randn(1, 512, 16))
    reference = wan_run(model, args, kwargs)
    with tomediff.tome(model, method="downsample"):
        out = wan_run(model, args, kwargs)
    assert not torch.equal(out, reference)
    assert torch.equal(wan_run(model, args, kwargs), reference)


def test_wan_threads_keep_their_own_plans() -> None:
    model = tiny_wan()
    inputs = [wan_inputs(batch=1, frames=frames) for frames in (1, 3)]
    tomediff.apply_tome(model, method="downsample")
    expected = [wan_run(model, *pair) for pair in inputs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(index: int) -> None:
        for _ in range(3):
            results[index].append(wan_run(model, *inputs[index]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert len(results[index]) == 3
        for out in results[index]:
            assert torch.equal(out, expected[index])


def test_wan_compiled_matches_eager() -> None:
    from torch._dynamo.utils import counters

    model = tiny_wan()
    args, kwargs = wan_inputs(batch=1)
    tomediff.apply_tome(model, method="downsample")
    eager = wan_run(model, args, kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    assert_close(wan_run(compiled, args, kwargs), eager, atol=1e-5, rtol=1e-5)
    # No graph break anywhere: the attention call's torch-function mode is traced through (Tensor.unflatten
    # included), and so are the block hooks.
    breaks = [reason for reason, count in counters["graph_break"].items() for _ in range(count)]
    assert breaks == []


# Sana: linear attention, reduced at block level --------------------------------------------------------


# The tiny Sana shape, shared by its ControlNet.
TINY_SANA_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 4,
    "num_attention_heads": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 4,
    "cross_attention_dim": 8,
    "caption_channels": 8,
    "sample_size": 32,
}


def tiny_sana() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.SanaTransformer2DModel(**TINY_SANA_CONFIG).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_sana_merges_and_downsamples_its_linear_attention_at_block_level(batch: int) -> None:
    model = tiny_sana()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 6, 10, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=gen),
        "timestep": torch.full((batch,), 500),
        "return_dict": False,
    }
    reference = wan_run(model, (x,), kwargs)
    seen: list[tuple[int, int]] = []

    def spy(module: nn.Module, args: Any, kw: Any) -> None:
        context = kw.get("encoder_hidden_states")
        seen.append((args[0].shape[1], -1 if context is None else context.shape[1]))

    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(wan_run(model, (x,), kwargs), reference)
    attn1 = model.transformer_blocks[0].attn1
    for options, expected in (({"ratio": 0.5}, (30, -1)), ({"method": "downsample"}, (60, 15))):
        seen.clear()
        with tomediff.tome(model, use_rand=False, **options):
            hook = attn1.register_forward_pre_hook(spy, with_kwargs=True)  # after tomediff's hooks
            out = wan_run(model, (x,), kwargs)
            hook.remove()
        assert not torch.equal(out, reference) and seen == [expected]
        assert torch.equal(wan_run(model, (x,), kwargs), reference)
    with pytest.raises(tomediff.NothingToPatchError, match="kv_ratio"):
        tomediff.apply_tome(model, kv_ratio=0.5)


@pytest.mark.parametrize(
    "settings", [{"method": "downsample"}, {"ratio": 0.5}, {"ratio": 0.0, "kv_ratio": 0.5}]
)
def test_wan_pipeline_generates_end_to_end_and_restores(settings: dict[str, Any]) -> None:
    """A whole ``WanPipeline`` (tiny transformer, prompt embeddings built here, latents out: the UMT5
    tokenizer and the VAE would have to be downloaded or are not needed)."""
    transformer = tiny_wan(in_channels=16, out_channels=16)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer
    )
    gen = torch.Generator().manual_seed(0)
    prompt, negative = (
        torch.randn(1, WAN_TEXT, 16, generator=gen),
        torch.randn(1, WAN_TEXT, 16, generator=gen),
    )

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=32,
            width=48,
            num_frames=9,  # 3 latent frames of 4 x 6, i.e. 3 x 2 x 3 tokens
            num_inference_steps=2,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames

    # Two steps, guidance as two calls each.
    check_pipeline_reduces_and_restores(pipe, generate, settings, calls=4, tokens=18)
