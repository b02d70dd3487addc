"""More video diffusion transformers reduced at the attention call (tiny random-weight configs of the real
diffusers classes): LTX-2 (audio and video), Kandinsky 5, Mochi, EasyAnimate, ConsisID, ChronoEdit and
Wan-Animate, with the checks every family gets, then family-specific ones; and the video, audio and 1-D
models tomediff refuses, each with its reason."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from family_support import (
    TINY_COGVIDEOX_CONFIG,
    call_shapes,
    check_pipeline_reduces_and_restores,
    cogvideox_inputs,
    family_run,
    randomize_zeros,
    tiny_wan_shaped,
)
from test_attention_site import SdpaSpy
from test_dit_families import Family
from test_dit_models import tome_hooks
from tomediff.adapters import find_adapter

diffusers = pytest.importorskip("diffusers")


def tiny_ltx2() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        caption_channels=16,
    ).eval()


LTX2_AUDIO = 5


def ltx2_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, frames * height * width, 4, generator=gen),
        "audio_hidden_states": torch.randn(batch, LTX2_AUDIO, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "audio_encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "num_frames": frames,
        "height": height,
        "width": width,
        "audio_num_frames": LTX2_AUDIO,
        "return_dict": False,
    }


# Kandinsky 5's tiny config; Kandinsky 6 adds its audio stream to it.
TINY_KANDINSKY_CONFIG: dict[str, Any] = dict(
    in_visual_dim=4,
    in_text_dim=16,
    in_text_dim2=8,
    time_dim=16,
    out_visual_dim=4,
    patch_size=(1, 2, 2),
    model_dim=32,
    ff_dim=32,
    num_text_blocks=1,
    num_visual_blocks=2,
    axes_dims=(4, 6, 6),
)


def tiny_kandinsky5() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.Kandinsky5Transformer3DModel(**TINY_KANDINSKY_CONFIG)
    return randomize_zeros(model, seed=2, skip_scalars=True)


def kandinsky5_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, frames, 2 * height, 2 * width, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "visual_rope_pos": (torch.arange(frames), torch.arange(height), torch.arange(width)),
        "text_rope_pos": torch.arange(6),
        "return_dict": True,  # with False it returns the bare tensor, not a tuple
    }


def tiny_mochi() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()


def mochi_inputs(
    batch: int, grid: tuple[int, int, int], text: tuple[int, ...] = (4, 6, 5)
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``text``: each sample's prompt length (of 6, the rest padding); Mochi attends to it unpadded."""
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, 6, dtype=torch.long)
    for index in range(batch):
        mask[index, : text[index % len(text)]] = 1
    return (), {
        "hidden_states": torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "timestep": torch.full((batch,), 500),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


def tiny_easyanimate() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=6,
        sample_height=10,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=2,
        mmdit_layers=1,  # one MMDiT block (text feed-forward of its own), one shared-weight block
    ).eval()


def easyanimate_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 500),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "return_dict": False,
    }


def tiny_consisid() -> nn.Module:
    torch.manual_seed(0)
    config = {**TINY_COGVIDEOX_CONFIG, "attention_head_dim": 16, "use_rotary_positional_embeddings": True}
    return diffusers.ConsisIDTransformer3DModel(**config).eval()


def consisid_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """CogVideoX's call, with the rotary table of the grid (ConsisID's pipeline computes it)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    frames, height, width = grid
    args, kwargs = cogvideox_inputs(batch, grid)
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (height, width)), (height, width), frames)
    return args, {**kwargs, "image_rotary_emb": rotary}


def tiny_chronoedit() -> nn.Module:
    return tiny_wan_shaped("ChronoEditTransformer3DModel")


def chronoedit_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=gen)
    return (video, torch.full((batch,), 500.0), torch.randn(batch, 7, 16, generator=gen)), {
        "return_dict": False
    }


def tiny_wan_animate() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,
        latent_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        image_dim=8,
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 8, "8": 8},
        motion_encoder_size=8,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
        motion_encoder_batch_size=8,
    ).eval()


def wan_animate_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    # The face encoder turns 5 face frames into 2, plus one padding frame: one per latent frame.
    assert frames == 3
    face_frames = 5
    return (), {
        "hidden_states": torch.randn(batch, 12, frames, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
        "encoder_hidden_states_image": torch.randn(batch, 3, 8, generator=gen),
        "pose_hidden_states": torch.randn(batch, 4, frames - 1, 2 * height, 2 * width, generator=gen),
        "face_pixel_values": torch.randn(batch, 3, face_frames, 8, 8, generator=gen),
        "return_dict": False,
    }


def tiny_motifvideo() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.MotifVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=2,
        num_decoder_layers=1,  # the last single block attends over [video, the encoder's video output]
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=16,
        image_embed_dim=8,
        rope_axes_dim=(2, 2, 4),
        enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    )
    return randomize_zeros(model, seed=2, skip_scalars=True)


def motifvideo_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6)
    mask[0, -2:] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


def tiny_anyflow() -> nn.Module:
    return tiny_wan_shaped("AnyFlowTransformer3DModel")


def anyflow_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, frames, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch, frames), 500.0),  # per frame
        "r_timestep": torch.full((batch, frames), 400.0),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
        "return_dict": False,
    }


def tiny_kandinsky6() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.Kandinsky6Transformer3DModel(
        **TINY_KANDINSKY_CONFIG,
        visual_cond=False,
        in_audio_dim=4,
        out_audio_dim=4,
        model_dim_a=16,
        ff_dim_a=16,
        axes_dims_a=(4, 6, 6),
    )
    return randomize_zeros(model, seed=2, skip_scalars=True)


def kandinsky6_inputs(batch: int, grid: tuple[int, int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    frames, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, frames, 2 * height, 2 * width, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "audio_hidden_states": torch.randn(batch, 5, 4, generator=gen),  # video with audio
        "return_dict": False,
    }


# Every video model class added here, with its tiny config and inputs.
VIDEO_FAMILIES = {
    "LTX2VideoTransformer3DModel": Family(tiny_ltx2, ltx2_inputs, video=True),
    "Kandinsky5Transformer3DModel": Family(tiny_kandinsky5, kandinsky5_inputs, video=True),
    "MochiTransformer3DModel": Family(tiny_mochi, mochi_inputs, video=True),
    "EasyAnimateTransformer3DModel": Family(tiny_easyanimate, easyanimate_inputs, video=True),
    "ConsisIDTransformer3DModel": Family(tiny_consisid, consisid_inputs, video=True),
    "ChronoEditTransformer3DModel": Family(tiny_chronoedit, chronoedit_inputs, video=True),
    "WanAnimateTransformer3DModel": Family(tiny_wan_animate, wan_animate_inputs, video=True),
    "MotifVideoTransformer3DModel": Family(tiny_motifvideo, motifvideo_inputs, video=True),
    "AnyFlowTransformer3DModel": Family(tiny_anyflow, anyflow_inputs, video=True),
    "Kandinsky6Transformer3DModel": Family(tiny_kandinsky6, kandinsky6_inputs, video=True),
}

_BUILT: dict[str, nn.Module] = {}


def built(name: str) -> nn.Module:
    """One tiny model per family for the whole module (each test removes what it applies)."""
    if name not in _BUILT:
        _BUILT[name] = VIDEO_FAMILIES[name].build()
    return _BUILT[name]


GRID = (3, 5, 3)  # odd frame count; non-square, odd sides
NUM = math.prod(GRID)


def test_every_video_family_is_matched_by_an_adapter_that_reduces_its_tokens() -> None:
    for name in VIDEO_FAMILIES:
        model = built(name)
        assert type(model).__name__ == name
        adapter = find_adapter(model)
        specs = adapter.block_specs(model)
        assert adapter.name != "diffusers-refused" and len(specs) >= 2, name
        assert all(any(site.role == "call" for site in spec.sites) for spec in specs), name


@pytest.mark.parametrize("name", sorted(VIDEO_FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_video_family_ratio_zero_removal_and_token_counts_inside_attention(name: str, batch: int) -> None:
    model = built(name)
    inputs = VIDEO_FAMILIES[name].inputs(batch, GRID)
    reference, base = family_run(model, inputs)
    base_calls = call_shapes(base)
    # One self/joint attention per block (Mochi: per sample).
    blocks = len(find_adapter(model).block_specs(model))
    assert sum(q == k >= NUM for q, k in base_calls) == (blocks * batch if "Mochi" in name else blocks)
    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(family_run(model, inputs)[0], reference)
    kept = GRID[0] * math.ceil(GRID[1] / 2) * math.ceil(GRID[2] / 2)
    kept_in_time = math.ceil(GRID[0] / 2) * math.ceil(GRID[1] / 2) * math.ceil(GRID[2] / 2)
    settings: dict[str, tuple[dict[str, Any], int, int]] = {
        "downsample": ({"method": "downsample"}, NUM, kept),
        "downsample_time": ({"method": "downsample", "downsample_factor_time": 2}, NUM, kept_in_time),
        "kv_ratio": ({"ratio": 0.0, "kv_ratio": 0.5}, NUM, NUM - int(NUM * 0.5)),
        "asymmetric": ({"ratio": 0.25, "kv_ratio": 0.5}, NUM - int(NUM * 0.25), NUM - int(NUM * 0.5)),
    }
    for label, (options, queries, keys) in settings.items():
        handle = tomediff.apply_tome(model, use_rand=False, **options)
        out, spy = family_run(model, inputs)
        assert out.shape == reference.shape and torch.isfinite(out).all(), label
        assert not torch.equal(out, reference), label
        # Self/joint attention: the video queries/keys as configured, every other token (text, audio)
        # kept; the cross-attentions (text, audio, face keys) untouched.
        expected = [(q - NUM + queries, k - NUM + keys) if q == k >= NUM else (q, k) for q, k in base_calls]
        assert call_shapes(spy) == expected, label
        handle.remove()
        assert tome_hooks(model) == 0
        assert torch.equal(family_run(model, inputs)[0], reference), label


@pytest.mark.parametrize(
    "name",
    [
        "LTX2VideoTransformer3DModel",
        "Kandinsky5Transformer3DModel",
        "Kandinsky6Transformer3DModel",
        "MochiTransformer3DModel",
    ],
)
def test_block_level_sites_merge_the_video_tokens(name: str) -> None:
    """Merging with the cross-attention / feed-forward sites the family declares (LTX-2, Kandinsky 5/6:
    video cross-attention queries and feed-forward; Mochi: video feed-forward)."""
    model = built(name)
    inputs = VIDEO_FAMILIES[name].inputs(2, GRID)
    reference, base = family_run(model, inputs)
    with tomediff.tome(model, ratio=0.5, use_rand=False, merge_crossattn=True, merge_mlp=True):
        out, spy = family_run(model, inputs)
    assert out.shape == reference.shape and not torch.equal(out, reference)
    merged = NUM - NUM // 2
    for (q, k), (q0, k0) in zip(call_shapes(spy), call_shapes(base), strict=True):
        # Self/joint attention and the prompt cross-attention (6 keys; Mochi has none) get merged video
        # queries; LTX-2's and Kandinsky 6's audio-to-video cross-attention (5 audio keys) is no site and
        # keeps them all.
        reduced = q0 == k0 >= NUM or (q0 == NUM and k0 == 6)
        assert q == (q0 - NUM + merged if reduced else q0), (q, k, q0, k0)
    assert torch.equal(family_run(model, inputs)[0], reference)


def test_ltx2_audio_stream_is_untouched() -> None:
    """LTX-2: only the video tokens are reduced; the audio self-attention sees exactly the tokens it
    sees unpatched (in the first block, before any audio-video exchange)."""
    model = built("LTX2VideoTransformer3DModel")
    inputs = ltx2_inputs(2, GRID)

    def audio_self_attention(spy: SdpaSpy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return next(c for c in spy.calls if c[0].shape[2] == c[1].shape[2] == LTX2_AUDIO)

    _, base = family_run(model, inputs)
    for options in ({"method": "downsample"}, {"ratio": 0.5, "merge_crossattn": True, "merge_mlp": True}):
        with tomediff.tome(model, use_rand=False, **options):
            _, spy = family_run(model, inputs)
        for ours, theirs in zip(audio_self_attention(spy), audio_self_attention(base), strict=True):
            assert torch.equal(ours, theirs), options


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "downsample"},
        {"ratio": 0.5, "use_rand": False},
        {"ratio": 0.0, "kv_ratio": 0.5, "use_rand": False},
    ],
)
def test_mochi_per_sample_attention_gets_each_samples_plan(settings: dict[str, Any]) -> None:
    """Mochi attends per sample over ``[video, the sample's unpadded text]``: a batch with prompts of
    different lengths gives each sample what it gives alone."""
    model = built("MochiTransformer3DModel")
    inputs = mochi_inputs(2, GRID, text=(3, 6))
    alone = [mochi_inputs(1, GRID, text=(length,)) for length in (3, 6)]
    for index, (_, kwargs) in enumerate(alone):  # the same latents and prompts as the batch's
        for key in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask"):
            kwargs[key] = inputs[1][key][index : index + 1]
    with tomediff.tome(model, **settings):
        batched, spy = family_run(model, inputs)
        singles = [family_run(model, pair)[0] for pair in alone]
    # Two blocks, one joint attention call per sample: [video, 3 or 6 prompt tokens].
    video = NUM - NUM // 2 if settings.get("ratio") else NUM
    assert [q for q, _ in call_shapes(spy) if q > 1] == [video + 3, video + 6] * 2
    for index, single in enumerate(singles):
        torch.testing.assert_close(batched[index : index + 1], single, atol=1e-5, rtol=1e-5)


def test_kandinsky5_sparse_attention_calls_are_refused() -> None:
    """With ``sparse_params`` Kandinsky 5 orders its tokens in 8 × 8 tiles: no row-major grid."""
    model = built("Kandinsky5Transformer3DModel")
    _, kwargs = kandinsky5_inputs(1, (1, 8, 8))  # tiles of 8 x 8 tokens
    with (
        tomediff.tome(model, method="downsample"),
        pytest.raises(tomediff.MergeCallError, match="cannot tell the token grid"),
        torch.no_grad(),
    ):
        model(**{**kwargs, "sparse_params": {"to_fractal": True}})
    assert tome_hooks(model) == 0


# Models without an image/video grid tomediff can reduce: refused with their reason. Built without
# running their __init__ (matching is by class, and refusal happens before any block is touched).
REFUSED = {
    "StableAudioDiTModel": "audio",
    "StableAudio3DiTModel": "audio",
    "AceStepTransformer1DModel": "audio",
    "MiniMaxMusic3Transformer1DModel": "audio",
    "LongCatAudioDiTTransformer": "audio",
    "SanaVideoTransformer3DModel": "linear self-attention",
    "HeliosTransformer3DModel": "history",
    "HunyuanVideoFramepackTransformer3DModel": "history",
    "AnyFlowFARTransformer3DModel": "causal attention",
    "WanAnimate2Transformer3DModel": "flex-attention block mask",
    "MiniMaxH3Transformer3DModel": "packs video, text and audio",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_audio_and_unsupported_video_models_are_refused_with_their_reason(name: str) -> None:
    cls = getattr(diffusers, name)
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    with pytest.raises(tomediff.UnsupportedModelError, match=rf"{name}.*{REFUSED[name]}"):
        tomediff.apply_tome(model)
    assert tome_hooks(model) == 0


def test_random_partition_on_a_video_grid_at_an_even_batch() -> None:
    """use_rand (the default) draws one partition table per call from the grids the call recorded; a
    video grid (frames, height, width) counts as its frames stacked."""
    model = built("ChronoEditTransformer3DModel")
    inputs = chronoedit_inputs(2, GRID)
    reference, _ = family_run(model, inputs)
    with tomediff.tome(model, ratio=0.5, kv_ratio=0.25) as handle:
        out, spy = family_run(model, inputs)
        assert handle.report().partition == "random"
    assert not torch.equal(out, reference)
    assert [(q, k) for q, k in call_shapes(spy) if k != 7] == [(NUM - NUM // 2, NUM - NUM // 4)] * 2


def test_plans_split_by_sample_act_like_the_batch_plan_on_that_sample() -> None:
    """``sample(i)`` (used for per-sample attention calls) gives sample ``i``'s rows of every plan."""
    from tomediff.ops import GridDownsample, KeepPlan, SharedMergePlan, grid_partition, plan_merge

    gen = torch.Generator().manual_seed(3)
    height, width, batch = 6, 4, 3
    x = torch.randn(batch, height * width, 8, generator=gen)
    partition = grid_partition(height, width, 2, 2, torch.zeros(height // 2, width // 2, dtype=torch.int64))
    merge = plan_merge(x, partition, 9)
    shared_one = plan_merge(x[:1], partition, 9)
    assert merge is not None and shared_one is not None
    shared = SharedMergePlan.build(shared_one, partition.dst_idx, batch)
    keep = KeepPlan.build(batch, height * width, 10, x.device)
    for plan in (merge, shared, keep):
        merged = plan.merge(x)
        for index in range(batch):
            one = plan.sample(index)
            assert one.batch == 1 and one.num_merged == plan.num_merged
            assert torch.equal(one.merge(x[index : index + 1]), merged[index : index + 1])
            assert torch.equal(
                one.unmerge(merged[index : index + 1]), plan.unmerge(merged)[index : index + 1]
            )
    grid = GridDownsample.build(batch, 3 * 2, width, 2, "avg", frames=3, time_factor=2)
    reduced = grid.reduce(x)
    assert torch.equal(grid.sample(1).reduce(x[1:2]), reduced[1:2])


@pytest.mark.parametrize("settings", [{"method": "downsample"}, {"ratio": 0.5}])
def test_mochi_pipeline_with_guidance_generates_end_to_end_and_restores(settings: dict[str, Any]) -> None:
    """A whole ``MochiPipeline`` (tiny transformer, prompt embeddings built here, latents out): guidance
    runs the unconditional and conditional halves as one batch of 2 whose prompts differ in length, so
    every joint attention is called per sample."""
    transformer = built("MochiTransformer3DModel")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = diffusers.MochiPipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer
    )
    gen = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 6, 16, generator=gen), torch.randn(1, 6, 16, generator=gen)
    mask, negative_mask = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    negative_mask[:, :2] = 1

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt,
            prompt_attention_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask,
            height=48,
            width=32,
            num_frames=13,  # 3 latent frames of 6 x 4, i.e. 3 x 3 x 2 tokens
            num_inference_steps=2,
            guidance_scale=4.5,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames

    # Two steps, guidance as one batch of 2.
    check_pipeline_reduces_and_restores(pipe, generate, settings, calls=2, tokens=18)
