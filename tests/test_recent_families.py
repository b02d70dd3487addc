"""The diffusers 0.42 classes tomediff says something specific about beyond :data:`IMAGE_FAMILIES`'s
shared checks (issue 15): JoyImage-Edit's items each on its own grid and Edit-Plus's refusal of samples
with different reference images, Ideogram 4's packed rows, DreamLite's
UNet and transformer, and the families refused with their reason (tiny real models where their
constructor allows, else the registry entry by class name)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from family_support import call_shapes, family_run
from test_dit_models import tome_hooks
from tiny_recent_families import (
    ideogram4_inputs,
    joyimage_edit_inputs,
    joyimage_edit_plus_inputs,
    tiny_ideogram4,
    tiny_joyimage_edit,
    tiny_joyimage_edit_plus,
)

diffusers = pytest.importorskip("diffusers")


def _reduced_then_restored(model: nn.Module, inputs: Any, options: dict[str, Any]) -> list[tuple[int, int]]:
    """(queries, keys) of each attention call with tomediff applied; checks ratio 0 and removal are
    bit-exact and the output changes."""
    reference = family_run(model, inputs)[0]
    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(family_run(model, inputs)[0], reference)
    with tomediff.tome(model, use_rand=False, **options):
        out, spy = family_run(model, inputs)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert tome_hooks(model) == 0 and torch.equal(family_run(model, inputs)[0], reference)
    return call_shapes(spy)


@pytest.mark.parametrize("options", [{"ratio": 0.5, "reference_ratio": 0.0}, {"method": "downsample"}])
def test_joyimage_edit_reduces_each_item_on_its_own_grid(options: dict[str, Any]) -> None:
    """Two reference images and the generated one, 5 x 6 tokens each (``test_reference_tokens`` checks the
    per-image ratios): ``reference_ratio=0`` merges the generated image alone; ``method="downsample"``
    downsamples the keys/values of every item on its own grid."""
    model = tiny_joyimage_edit()
    num, text = 5 * 6, 5
    inputs = joyimage_edit_inputs(2, (1, 5, 6), references=2)
    assert call_shapes(family_run(model, inputs)[1]) == [(3 * num + text, 3 * num + text)] * 2
    shapes = _reduced_then_restored(model, inputs, options)
    if "ratio" in options:
        kept = num - int(num * 0.5)
        assert shapes == [(kept + 2 * num + text,) * 2] * 2
    else:
        kept = math.ceil(5 / 2) * math.ceil(6 / 2)
        assert shapes == [(3 * num + text, 3 * kept + text)] * 2


def test_joyimage_edit_plus_refuses_samples_with_different_reference_images_in_one_call() -> None:
    """Sample 0 has two reference images (4 x 3 and 2 x 2 tokens), sample 1 none: no one layout of images
    for the batch, so the call is refused, naming ``shape_list`` and the fix."""
    model = tiny_joyimage_edit_plus()
    inputs = joyimage_edit_plus_inputs(2, (1, 5, 6), references=((4, 3), (2, 2)))
    reference = family_run(model, inputs)[0]
    with (
        tomediff.tome(model, ratio=0.5),
        pytest.raises(tomediff.MergeCallError, match=r"shape_list.*same images' sizes"),
    ):
        family_run(model, inputs)
    assert tome_hooks(model) == 0 and torch.equal(family_run(model, inputs)[0], reference)


def test_joyimage_edit_plus_refuses_generated_images_of_different_shapes_in_one_call() -> None:
    model = tiny_joyimage_edit_plus()
    args, kwargs = joyimage_edit_plus_inputs(2, (1, 2, 3))
    kwargs["shape_list"] = [[(1, 2, 3)], [(1, 3, 2)]]
    with tomediff.tome(model, ratio=0.5), pytest.raises(tomediff.MergeCallError, match="token grid"):
        family_run(model, (args, kwargs))
    assert tome_hooks(model) == 0


def test_ideogram4_reduces_its_unconditional_image_only_call() -> None:
    """The pipeline's unconditional call passes the image region alone (no text, no padding)."""
    model = tiny_ideogram4()
    _, kwargs = ideogram4_inputs(2, (1, 5, 6))
    image_only = {
        k: v[:, 5:]
        if k in {"hidden_states", "encoder_hidden_states", "position_ids", "segment_ids", "indicator"}
        else v
        for k, v in kwargs.items()
    }
    shapes = _reduced_then_restored(model, ((), image_only), {"ratio": 0.5})
    assert shapes == [(15, 15)] * 2


def test_ideogram4_refuses_a_row_packing_several_samples() -> None:
    model = tiny_ideogram4()
    _, kwargs = ideogram4_inputs(1, (1, 2, 3))
    packed = {
        k: torch.cat([v, v], dim=1) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v
        for k, v in kwargs.items()
    }
    packed["segment_ids"] = torch.cat([kwargs["segment_ids"], kwargs["segment_ids"] + 1], dim=1)
    family_run(model, ((), packed))  # the model itself takes it
    with tomediff.tome(model, ratio=0.5), pytest.raises(tomediff.MergeCallError, match="packing several"):
        family_run(model, ((), packed))
    assert tome_hooks(model) == 0


def tiny_dreamlite_unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.DreamLiteUNetModel(
        sample_size=16,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
        ff_mult=2,
    ).eval()


def test_dreamlite_unet_reduces_the_self_attention_of_its_low_resolution_levels() -> None:
    """DreamLite's UNet (a ``UNet2DConditionModel`` subclass) drops self-attention at its two
    high-resolution levels: the default (highest level only) finds no ``attn1`` and says where they are;
    ``max_downsample=4`` merges the four blocks that have one, on their 4 x 3 grid."""
    from tomediff.adapters import find_adapter

    model = tiny_dreamlite_unet()
    assert find_adapter(model).name == "diffusers-unet"
    gen = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 16, 12, generator=gen), torch.randn(2, 5, 16, generator=gen)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(sample, 500, context).sample

    with pytest.raises(tomediff.NothingToPatchError, match=r"attn.*max_downsample=4"):
        tomediff.apply_tome(model)
    assert tome_hooks(model) == 0
    reference = forward()
    with tomediff.tome(model, ratio=0.5, max_downsample=4, use_rand=False) as handle:
        out = forward()
        report = handle.report()
    merged = [b for b in report.blocks if b.last_call is not None]
    assert [b.name.split(".")[0] for b in merged] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    assert all(b.last_call.tokens == 12 and b.last_call.tokens_after_merge == 6 for b in merged)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert tome_hooks(model) == 0 and torch.equal(forward(), reference)


def test_dreamlite_transformer_on_its_own_is_reduced_like_a_transformer2d() -> None:
    model = tiny_dreamlite_unet().down_blocks[2].attentions[0]
    assert type(model).__name__ == "DreamLiteTransformer2DModel"
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 32, 4, 3, generator=gen), torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        reference = model(x, context).sample
        with tomediff.tome(model, ratio=0.5, use_rand=False) as handle:
            out = model(x, context).sample
            (block,) = handle.report().blocks
        assert block.last_call is not None and block.last_call.tokens_after_merge == 6
        assert not torch.equal(out, reference)
        assert tome_hooks(model) == 0 and torch.equal(model(x, context).sample, reference)


def _tiny_refused() -> dict[str, nn.Module]:
    """Refused classes whose constructors take a tiny config."""
    torch.manual_seed(0)
    flux = diffusers.FluxControlNetModel(
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        axes_dims_rope=[2, 2, 4],
    )
    return {
        "FluxMultiControlNetModel": diffusers.FluxMultiControlNetModel([flux]),
        "Kandinsky6SRTransformer3DModel": diffusers.Kandinsky6SRTransformer3DModel(
            in_visual_dim=4,
            out_visual_dim=4,
            time_dim=8,
            model_dim=16,
            ff_dim=32,
            num_visual_blocks=1,
            axes_dims=(2, 2, 4),
        ),
        "BriaFibo2Transformer2DModel": diffusers.BriaFibo2Transformer2DModel(
            in_channels=4,
            dim=16,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            cap_feat_dim=8,
            injection_layer_ids=(0,),
            perceiver_num_layers=1,
            min_num_gist_tokens=2,
            max_num_gist_tokens=4,
            gist_step=2,
            gist_min_text_len=2,
            gist_max_text_len=8,
            axes_dims=(2, 2, 4),
            axes_lens=(16, 8, 8),
        ),
    }


REFUSED_REASONS = {
    "BriaFibo2Transformer2DModel": "gist tokens",
    "Kandinsky6SRTransformer3DModel": "NABLA sparse attention",
    "LTX2VideoDiffusionDecoderModel": "VAE decoder",
    "SanaWMTransformer3DModel": "gated delta-net",
    "SanaWMLTX2RefinerTransformer3DModel": "chunk-causal",
    **{
        name: r"several .* ControlNets .* for net in pipe\.controlnet\.nets"
        for name in (
            "FluxMultiControlNetModel",
            "SD3MultiControlNetModel",
            "QwenImageMultiControlNetModel",
            "HunyuanDiT2DMultiControlNetModel",
        )
    },
    "ZImageControlNetModel": "ZImageControlTransformerBlocks are a block class of their own",
    "CosmosControlNetModel": "called with the base model's latent tokens",
}


@pytest.mark.parametrize("name", sorted(REFUSED_REASONS))
def test_recent_families_tomediff_cannot_reduce_are_refused_with_their_reason(name: str) -> None:
    """Each class is a real diffusers class; built tiny where its constructor allows, else an empty
    module of its name (the refusal is by class name, before anything is read from the model)."""
    assert hasattr(diffusers, name)
    model = _tiny_refused().get(name)
    if model is None:
        model = type(name, (nn.Module,), {})()
    with pytest.raises(tomediff.UnsupportedModelError, match=rf"{name}.*{REFUSED_REASONS[name]}"):
        tomediff.apply_tome(model)
    assert tome_hooks(model) == 0
