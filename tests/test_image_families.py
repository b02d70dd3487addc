"""Image diffusion transformers reduced at the attention call, added for issue 15 (tiny random-weight
configs of the real diffusers classes): the same checks for every family of :data:`IMAGE_FAMILIES`, then
family-specific ones (layouts that differ per sample, rising timesteps, refusals)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from family_support import (
    Inputs,
    call_shapes,
    check_pipeline_reduces_and_restores,
    cogview_inputs,
    family_run,
    flux2_layout_inputs,
    randomize_zeros,
)
from test_dit_models import image_ids, tome_hooks
from tiny_recent_families import (
    briafibo_inputs,
    ideogram4_inputs,
    joyimage_edit_inputs,
    joyimage_edit_plus_inputs,
    nucleusmoe_image_inputs,
    tiny_briafibo,
    tiny_ideogram4,
    tiny_joyimage_edit,
    tiny_joyimage_edit_plus,
    tiny_nucleusmoe_image,
)

diffusers = pytest.importorskip("diffusers")


def tiny_hunyuandit() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanDiT2DModel(
        sample_size=16,
        num_layers=4,  # a long skip into block 3
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=16,
        cross_attention_dim_t5=8,
        pooled_projection_dim=8,
        hidden_size=16,
        text_len=4,
        text_len_t5=4,
        activation_fn="gelu-approximate",
    ).eval()


def hunyuandit_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    model_rope = diffusers.models.embeddings.get_2d_rotary_pos_embed(
        8, ((0, 0), (height, width)), (height, width)
    )
    mask = torch.ones(batch, 4, dtype=torch.long)
    mask[0, -1] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 4, 16, generator=gen),
        "text_embedding_mask": mask,
        "encoder_hidden_states_t5": torch.randn(batch, 4, 8, generator=gen),
        "text_embedding_mask_t5": torch.ones(batch, 4, dtype=torch.long),
        "image_meta_size": torch.tensor([[32, 32, 32, 32, 0, 0]] * batch, dtype=torch.float32),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": model_rope,
        "return_dict": False,
    }


def tiny_hunyuanimage() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=16,
        rope_axes_dim=(4, 4),
    ).eval()


def hunyuanimage_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, -2:] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, height, width, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


def tiny_cogview3plus() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=2,
        pos_embed_max_size=8,
        sample_size=8,
    ).eval()


def tiny_zimage() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    ).eval()


def zimage_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    latents = [torch.randn(4, 1, 2 * height, 2 * width, generator=gen) for _ in range(batch)]
    # Captions of different lengths: the image tokens still come first in every sample.
    captions = [torch.randn(3 + 2 * i, 16, generator=gen) for i in range(batch)]
    return (latents, torch.full((batch,), 0.5), captions), {"return_dict": False}


def tiny_lumina2() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=4,
        cap_feat_dim=8,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(32, 16, 16),
    ).eval()


def lumina2_inputs(batch: int, grid: tuple[int, int, int], ragged: bool = False) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[:, -2:] = 0  # padded captions, of one length unless ragged
    if ragged:
        mask[0, -3] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": torch.randn(batch, 6, 8, generator=gen),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


def tiny_hidream() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[8, 4],
        text_emb_dim=8,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(16, 16),
        llama_layers=(0, 1),
    ).eval()


def hidream_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timesteps": torch.full((batch,), 500),
        "encoder_hidden_states_t5": torch.randn(batch, 3, 8, generator=gen),
        "encoder_hidden_states_llama3": torch.randn(2, batch, 4, 4, generator=gen),
        "pooled_embeds": torch.randn(batch, 8, generator=gen),
        "return_dict": False,
    }


def tiny_krea2() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.Krea2Transformer2DModel(
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        timestep_embed_dim=8,
        text_hidden_dim=8,
        num_text_layers=2,
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=16,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def krea2_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    text = 5
    ids = torch.cat([torch.zeros(text, 3), image_ids(height, width)])  # text at the origin
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[0, -2:] = False
    return (), {
        "hidden_states": torch.randn(batch, height * width, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, 2, 8, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "position_ids": ids,
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


def tiny_ernieimage() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.ErnieImageTransformer2DModel(
        hidden_size=16,
        num_attention_heads=2,
        num_layers=2,
        ffn_hidden_size=32,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        text_in_dim=8,
        rope_axes_dim=(2, 2, 4),
    )
    return randomize_zeros(model, seed=3)


def ernieimage_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "text_bth": torch.randn(batch, 5, 8, generator=gen),
        "text_lens": torch.tensor([5] + [3] * (batch - 1)),
        "return_dict": False,
    }


def tiny_prx() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.PRXTransformer2DModel(
        in_channels=4,
        patch_size=2,
        context_in_dim=8,
        hidden_size=16,
        mlp_ratio=2.0,
        num_heads=2,
        depth=2,
        axes_dim=[4, 4],
    )
    return randomize_zeros(model, seed=3)


def prx_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, -2:] = False
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": torch.randn(batch, 6, 8, generator=gen),
        "attention_mask": mask,
        "return_dict": False,
    }


def tiny_flux3() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.Flux3Transformer2DModel(
        in_channels=4,
        cond_in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8,
        timestep_channels=16,
        axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def flux3_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    return flux2_layout_inputs(batch, grid, text_dim=8)


def tiny_glmimage() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=4,
        prior_vq_quantizer_codebook_size=16,
    ).eval()


def glmimage_inputs(batch: int, grid: tuple[int, int, int], **extra: Any) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    size = torch.tensor([[2 * height * 8, 2 * width * 8]] * batch, dtype=torch.float32)
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 8, generator=gen),
        "prior_token_id": torch.randint(0, 16, (batch, height * width), generator=gen),
        "prior_token_drop": torch.zeros(batch, height * width, dtype=torch.bool),
        "timestep": torch.full((batch,), 500),
        "target_size": size,
        "crop_coords": torch.zeros(batch, 2),
        "return_dict": False,
        **extra,
    }


def tiny_luminanext() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.LuminaNextDiT2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=4,
        learn_sigma=False,
        cross_attention_dim=8,
    ).eval()
    # diffusers leaves pad_token as torch.empty: give it values so the model is the same in every process.
    with torch.no_grad():
        model.pad_token.normal_(std=0.02)
    return model


def luminanext_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    rope = diffusers.models.embeddings.get_2d_rotary_pos_embed_lumina(8, 32, 32)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[0, -2:] = 0
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=gen),
        "encoder_mask": mask,
        "image_rotary_emb": rope,
        "cross_attention_kwargs": {},
        "return_dict": False,
    }


def tiny_omnigen() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.OmniGenTransformer2DModel(
        hidden_size=16,
        rope_scaling={"long_factor": [1.0] * 4, "short_factor": [1.0] * 4, "type": "su"},
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        num_layers=2,
        pad_token_id=0,
        vocab_size=20,
        in_channels=4,
        time_step_dim=8,
        pos_embed_max_size=16,
        patch_size=2,
    ).eval()


def omnigen_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    text = 4
    seq = text + 1 + height * width
    mask = torch.tril(torch.ones(batch, seq, seq))  # causal over the instruction, full over the image
    mask[:, text:, text:] = 1
    return (), {
        "hidden_states": torch.randn(batch, 4, 2 * height, 2 * width, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "input_ids": torch.randint(1, 20, (batch, text), generator=gen),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask,
        "position_ids": torch.arange(seq).expand(batch, -1),
        "return_dict": False,
    }


@dataclass(frozen=True)
class ImageFamily:
    """A model class with a tiny config and its inputs for a batch and an image token grid ``(1, height,
    width)``."""

    model_class: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, tuple[int, int, int]], Inputs]


IMAGE_FAMILIES = {
    "hunyuandit": ImageFamily("HunyuanDiT2DModel", tiny_hunyuandit, hunyuandit_inputs),
    "hunyuanimage": ImageFamily("HunyuanImageTransformer2DModel", tiny_hunyuanimage, hunyuanimage_inputs),
    "cogview3plus": ImageFamily("CogView3PlusTransformer2DModel", tiny_cogview3plus, cogview_inputs),
    "zimage": ImageFamily("ZImageTransformer2DModel", tiny_zimage, zimage_inputs),
    "lumina2": ImageFamily("Lumina2Transformer2DModel", tiny_lumina2, lumina2_inputs),
    "hidream": ImageFamily("HiDreamImageTransformer2DModel", tiny_hidream, hidream_inputs),
    "krea2": ImageFamily("Krea2Transformer2DModel", tiny_krea2, krea2_inputs),
    "flux3": ImageFamily("Flux3Transformer2DModel", tiny_flux3, flux3_inputs),
    "glmimage": ImageFamily("GlmImageTransformer2DModel", tiny_glmimage, glmimage_inputs),
    "luminanext": ImageFamily("LuminaNextDiT2DModel", tiny_luminanext, luminanext_inputs),
    "omnigen": ImageFamily("OmniGenTransformer2DModel", tiny_omnigen, omnigen_inputs),
    "prx": ImageFamily("PRXTransformer2DModel", tiny_prx, prx_inputs),
    "ernieimage": ImageFamily("ErnieImageTransformer2DModel", tiny_ernieimage, ernieimage_inputs),
    "briafibo": ImageFamily("BriaFiboTransformer2DModel", tiny_briafibo, briafibo_inputs),
    "ideogram4": ImageFamily("Ideogram4Transformer2DModel", tiny_ideogram4, ideogram4_inputs),
    "joyimage_edit": ImageFamily("JoyImageEditTransformer3DModel", tiny_joyimage_edit, joyimage_edit_inputs),
    "joyimage_edit_plus": ImageFamily(
        "JoyImageEditPlusTransformer3DModel", tiny_joyimage_edit_plus, joyimage_edit_plus_inputs
    ),
    "nucleusmoe_image": ImageFamily(
        "NucleusMoEImageTransformer2DModel", tiny_nucleusmoe_image, nucleusmoe_image_inputs
    ),
}


@pytest.mark.parametrize("name", sorted(IMAGE_FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_image_family_ratio_zero_removal_and_token_counts_inside_attention(name: str, batch: int) -> None:
    family = IMAGE_FAMILIES[name]
    model = family.build()
    grid = (1, 5, 6)  # non-square, odd side
    num = math.prod(grid)
    inputs = family.inputs(batch, grid)
    reference, base = family_run(model, inputs)
    base_calls = call_shapes(base)
    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(family_run(model, inputs)[0], reference)
    kept = math.ceil(grid[1] / 2) * math.ceil(grid[2] / 2)
    settings: dict[str, tuple[dict[str, Any], int, int]] = {
        "merge": ({"ratio": 0.5}, num - int(num * 0.5), num - int(num * 0.5)),
        "downsample": ({"method": "downsample"}, num, kept),
        "kv_ratio": ({"ratio": 0.0, "kv_ratio": 0.5}, num, num - int(num * 0.5)),
        "asymmetric": ({"ratio": 0.25, "kv_ratio": 0.5}, num - int(num * 0.25), num - int(num * 0.5)),
    }
    for label, (options, queries, keys) in settings.items():
        handle = tomediff.apply_tome(model, use_rand=False, **options)
        blocks = len(handle.report().blocks)
        out, spy = family_run(model, inputs)
        assert out.shape == reference.shape and torch.isfinite(out).all(), label
        assert not torch.equal(out, reference), label
        # Each patched block's self/joint attention: the image queries/keys as configured, every other
        # token (text, padding) kept; every other attention call (text refiners) untouched.
        calls = call_shapes(spy)
        assert len(calls) == len(base_calls), label
        reduced = [(q, k) for (q, k), (q0, k0) in zip(calls, base_calls, strict=True) if (q, k) != (q0, k0)]
        expected = [
            (q0 - num + queries, k0 - num + keys)
            for (q, k), (q0, k0) in zip(calls, base_calls, strict=True)
            if (q, k) != (q0, k0)
        ]
        assert reduced == expected and len(reduced) == blocks > 0, label
        handle.remove()
        assert tome_hooks(model) == 0
        assert torch.equal(family_run(model, inputs)[0], reference), label


def test_every_image_family_is_matched_by_an_adapter_that_reduces_tokens() -> None:
    """The count of image transformer classes reduced at the attention call: those of
    :data:`IMAGE_FAMILIES` and the image families of ``test_dit_families.FAMILIES``."""
    from test_dit_families import FAMILIES
    from tomediff.adapters import find_adapter

    builds = {family.model_class: family.build for family in IMAGE_FAMILIES.values()}
    for family in FAMILIES.values():
        if not family.video:
            model = family.build()
            builds[type(model).__name__] = family.build
    for name, build in builds.items():
        model = build()
        assert type(model).__name__ == name
        adapter = find_adapter(model)
        specs = adapter.block_specs(model)
        assert specs and all(any(site.role == "call" for site in spec.sites) for spec in specs), name
    assert len(builds) == 27


def test_image_families_not_supported_yet_are_refused_with_their_reason() -> None:
    torch.manual_seed(0)
    model = diffusers.QwenImage21Transformer2DModel(
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        context_in_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(
        tomediff.UnsupportedModelError, match=r"QwenImage21Transformer2DModel.*one attention call per prefix"
    ):
        tomediff.apply_tome(model)
    assert tome_hooks(model) == 0


def test_lumina2_refuses_a_call_whose_captions_differ_in_length() -> None:
    model = tiny_lumina2()
    ragged = lumina2_inputs(2, (1, 3, 4), ragged=True)
    reference = family_run(model, ragged)[0]
    with tomediff.tome(model, ratio=0.5):
        with pytest.raises(tomediff.MergeCallError, match="captions have different lengths"):
            family_run(model, ragged)
        family_run(model, lumina2_inputs(2, (1, 3, 4)))  # one caption length: reduced
        # The refusal leaves nothing behind: the ragged call runs untouched without the patch.
    assert torch.equal(family_run(model, ragged)[0], reference)


def test_zimage_refuses_latents_of_different_shapes_in_one_call() -> None:
    model = tiny_zimage()
    (latents, t, captions), kwargs = zimage_inputs(2, (1, 3, 4))
    latents = [latents[0], torch.randn(4, 1, 6, 10)]
    with tomediff.tome(model, ratio=0.5), pytest.raises(tomediff.MergeCallError, match="different shapes"):
        family_run(model, ((latents, t, captions), kwargs))


def test_flux3_refuses_reference_images_its_ids_do_not_tell_apart() -> None:
    """Reference images whose ids share the generated image's last column ``l`` are no separate grid
    (``test_reference_tokens`` runs the pipeline's layout, ``l = -1, -2, ...``)."""
    model = tiny_flux3()
    args, kwargs = flux3_inputs(1, (1, 3, 4))
    one = torch.arange(1)
    kwargs = {
        **kwargs,
        "image_cond_hidden_states": torch.randn(1, 6, 4),
        "image_cond_ids": torch.cartesian_prod(one + 1, torch.arange(2), torch.arange(3), one),
    }
    with tomediff.tome(model, ratio=0.5), pytest.raises(tomediff.MergeCallError, match="token grid"):
        family_run(model, (args, kwargs))


def test_glmimage_reads_its_edit_kv_cache_with_the_cached_keys_whole() -> None:
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    model = tiny_glmimage()
    grid, num = (1, 3, 4), 12
    cache = GlmImageKVCache(num_layers=2)
    cache.set_mode("write")
    family_run(model, glmimage_inputs(1, grid, kv_caches=cache))  # the condition image (unpatched)
    cache.set_mode("read")
    reference, base = family_run(model, glmimage_inputs(1, grid, kv_caches=cache))
    cached = 6 + num  # the condition call's text and image keys
    assert call_shapes(base) == [(6 + num, cached + 6 + num)] * 2
    with tomediff.tome(model, ratio=0.5, use_rand=False):
        out, spy = family_run(model, glmimage_inputs(1, grid, kv_caches=cache))
    assert not torch.equal(out, reference)
    assert call_shapes(spy) == [(6 + num // 2, cached + 6 + num // 2)] * 2


def test_rising_timesteps_are_turned_back_for_start_and_stop() -> None:
    """Z-Image is called with ``1 - t / 1000``: early steps (mostly noise) come with a small timestep, and
    ``start=0.5`` must leave them alone."""
    model = tiny_zimage()
    (latents, _, captions), kwargs = zimage_inputs(1, (1, 3, 4))
    with tomediff.tome(model, ratio=0.5, start=0.5) as handle:
        for progress in (0.1, 0.9):
            family_run(model, ((latents, torch.tensor([progress]), captions), kwargs))
            merged = handle.report().blocks[0].last_call
            assert merged is not None
            assert (merged.tokens_after_merge < merged.tokens) == (progress >= 0.5), progress


@pytest.mark.parametrize("name", ["krea2", "hunyuanimage"])
def test_positional_calls_are_reduced_like_keyword_calls(name: str) -> None:
    family = IMAGE_FAMILIES[name]
    model = family.build()
    _, kwargs = family.inputs(2, (1, 3, 4))
    names = list(kwargs)[:4]
    positional = (tuple(kwargs[n] for n in names), {k: v for k, v in kwargs.items() if k not in names})
    with tomediff.tome(model, method="downsample"):
        by_keyword, spy = family_run(model, ((), kwargs))
        by_position, spy_positional = family_run(model, positional)
    assert torch.equal(by_keyword, by_position)
    assert call_shapes(spy) == call_shapes(spy_positional)


FIRST_FEED_FORWARD: dict[str, Callable[[Any], nn.Module]] = {
    "hunyuandit": lambda model: model.blocks[0].ff,
    "hunyuanimage": lambda model: model.transformer_blocks[0].ff,
    "flux3": lambda model: model.mode_blocks["image"][0].ff,
}


@pytest.mark.parametrize("name", sorted(FIRST_FEED_FORWARD))
def test_image_feed_forwards_merge_at_block_level(name: str) -> None:
    family = IMAGE_FAMILIES[name]
    model = family.build()
    inputs = family.inputs(2, (1, 3, 4))
    reference = family_run(model, inputs)[0]
    with tomediff.tome(model, ratio=0.0, merge_attn=False, merge_mlp=True):
        assert torch.equal(family_run(model, inputs)[0], reference)
    seen: list[int] = []
    with tomediff.tome(model, ratio=0.5, use_rand=False, merge_attn=False, merge_mlp=True):
        ff = FIRST_FEED_FORWARD[name](model)  # its hook runs after tomediff's: it sees the merged tokens
        hook = ff.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
        out, _ = family_run(model, inputs)
        hook.remove()
    assert seen == [6] and not torch.equal(out, reference) and torch.isfinite(out).all()
    assert tome_hooks(model) == 0 and torch.equal(family_run(model, inputs)[0], reference)


@pytest.mark.parametrize("settings", [{"ratio": 0.5}, {"method": "downsample"}])
def test_zimage_pipeline_generates_end_to_end_and_restores(settings: dict[str, Any]) -> None:
    """A whole ``ZImagePipeline`` (tiny transformer, prompt embeddings built here, latents out), with
    classifier-free guidance run as one batch whose two captions differ in length."""
    transformer = tiny_zimage()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.ZImagePipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer
    )
    gen = torch.Generator().manual_seed(0)
    prompt, negative = [torch.randn(5, 16, generator=gen)], [torch.randn(2, 16, generator=gen)]

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=48,
            width=80,  # 6 x 10 latent, 3 x 5 tokens
            num_inference_steps=2,
            guidance_scale=4.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images

    # Two steps, guidance as one batch of two.
    check_pipeline_reduces_and_restores(pipe, generate, settings, calls=2, tokens=15)


def test_random_partitions_draw_for_three_axis_grids() -> None:
    """``use_rand`` (the default) at an even batch draws one partition table per call from the grids the
    call recorded; a ``(frames, height, width)`` grid (Wan, Z-Image's latent list) is drawn for its
    frames stacked."""
    from test_dit_families import tiny_wan, wan_inputs

    for model, inputs in (
        (tiny_wan(), wan_inputs(batch=2)),
        (tiny_zimage(), zimage_inputs(2, (1, 3, 4))),
    ):
        reference = family_run(model, inputs)[0]
        with tomediff.tome(model, ratio=0.5) as handle:
            out = family_run(model, inputs)[0]
            assert handle.report().partition == "random"
        assert not torch.equal(out, reference) and torch.isfinite(out).all()
