"""DiT ControlNets reduced as their main transformers are (issue 15): tiny random-weight configs of the
real diffusers classes, their residuals checked bit-exact at ratio 0 and after removal, changed when
reduced, and the token counts inside their attention; one ControlNet and its transformer patched
together; the wrappers of several ControlNets and the ControlNets tomediff does not reduce refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from family_support import randomize_zeros
from test_attention_site import SdpaSpy
from test_dit_families import TINY_SANA_CONFIG, qwenimage_inputs
from test_dit_models import TEXT, TINY_FLUX_CONFIG, flux_inputs, sd3_inputs, tiny_flux, tome_hooks
from test_image_families import hunyuandit_inputs

diffusers = pytest.importorskip("diffusers")

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
HEIGHT, WIDTH = 6, 8  # the token grid of every case (non-square)
NUM_IMAGE = HEIGHT * WIDTH
RATIO = 0.5
REMOVED = int(NUM_IMAGE * RATIO)


def tiny_flux_controlnet() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.FluxControlNetModel(**TINY_FLUX_CONFIG)  # residuals that fit tiny_flux
    return randomize_zeros(model, seed=3)  # its zero-initialised projections would hide every change


def flux_controlnet_inputs(batch: int) -> Inputs:
    packed, kwargs = flux_inputs(batch, HEIGHT, WIDTH)
    cond = torch.randn(packed.shape, generator=torch.Generator().manual_seed(2))
    return (packed, cond), kwargs  # img_ids by keyword; the positional layout is tested apart


def tiny_sd3_controlnet(**overrides: Any) -> nn.Module:
    torch.manual_seed(0)
    config: dict[str, Any] = {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 8,
        "out_channels": 4,
        "pos_embed_max_size": 32,
    }
    return randomize_zeros(diffusers.SD3ControlNetModel(**{**config, **overrides}), seed=3)


def sd3_controlnet_inputs(batch: int) -> Inputs:
    sample, kwargs = sd3_inputs(batch, 2 * HEIGHT, 2 * WIDTH)
    cond = torch.randn(sample.shape, generator=torch.Generator().manual_seed(2))
    return (sample, cond), kwargs


def tiny_qwenimage_controlnet() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.QwenImageControlNetModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    return randomize_zeros(model, seed=3)


def qwenimage_controlnet_inputs(batch: int) -> Inputs:
    _, kwargs = qwenimage_inputs(batch, (1, HEIGHT, WIDTH))
    cond = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    return (), {**kwargs, "controlnet_cond": cond}


def tiny_sana_controlnet() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.SanaControlNetModel(**TINY_SANA_CONFIG)
    return randomize_zeros(model, seed=3)


def sana_controlnet_inputs(batch: int) -> Inputs:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, HEIGHT, WIDTH, generator=gen),), {
        "encoder_hidden_states": torch.randn(batch, TEXT, 8, generator=gen),
        "timestep": torch.full((batch,), 500),
        "controlnet_cond": torch.randn(batch, 4, HEIGHT, WIDTH, generator=gen),
        "return_dict": False,
    }


def tiny_hunyuandit_controlnet() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.HunyuanDiT2DControlNetModel(
        sample_size=16,
        transformer_num_layers=6,  # its blocks are the first half of the transformer's, less one: 2
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
    )
    return randomize_zeros(model, seed=3)


def hunyuandit_controlnet_inputs(batch: int) -> Inputs:
    _, kwargs = hunyuandit_inputs(batch, (1, HEIGHT, WIDTH))
    cond = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    return (), {**kwargs, "controlnet_cond": cond}


@dataclass(frozen=True)
class ControlNetCase:
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Inputs]
    adapter: str
    blocks: int
    # Where the text sits in its joint attention's keys ("first", "last"), or None: image-only
    # self-attention (cross-attention to the text apart) or, for Sana, linear self-attention.
    text: str | None
    text_tokens: int = TEXT


CASES = {
    "flux": ControlNetCase(
        tiny_flux_controlnet, flux_controlnet_inputs, "diffusers-flux-controlnet", 4, "first"
    ),
    "sd3": ControlNetCase(tiny_sd3_controlnet, sd3_controlnet_inputs, "diffusers-sd3-controlnet", 2, "last"),
    "qwenimage": ControlNetCase(
        tiny_qwenimage_controlnet, qwenimage_controlnet_inputs, "diffusers-qwenimage-controlnet", 2, "first"
    ),
    "sana": ControlNetCase(
        tiny_sana_controlnet, sana_controlnet_inputs, "diffusers-sana-controlnet", 2, None
    ),
    "hunyuandit": ControlNetCase(
        tiny_hunyuandit_controlnet, hunyuandit_controlnet_inputs, "diffusers-hunyuandit-controlnet", 2, None
    ),
}


def residuals(model: nn.Module, inputs: Inputs, spy: SdpaSpy | None = None) -> list[torch.Tensor]:
    """Every residual tensor a ControlNet returns, in order (its outputs are tuples of lists)."""
    with torch.no_grad():
        if spy is None:
            out = model(*inputs[0], **inputs[1])
        else:
            with spy:
                out = model(*inputs[0], **inputs[1])
    flat: list[torch.Tensor] = []
    pending: list[Any] = [out]
    while pending:
        item = pending.pop(0)
        if isinstance(item, torch.Tensor):
            flat.append(item)
        elif isinstance(item, (tuple, list)):
            pending[:0] = list(item)
    return flat


@pytest.mark.parametrize("name", sorted(CASES))
def test_controlnet_ratio_zero_and_removal_are_bit_exact_and_reduction_changes_its_residuals(
    name: str,
) -> None:
    case = CASES[name]
    model = case.build()
    inputs = case.inputs(2)
    reference = residuals(model, inputs)
    assert reference and all(r.shape[1] == NUM_IMAGE for r in reference)  # one residual per image token
    with tomediff.tome(model, ratio=0.0):
        assert all(map(torch.equal, residuals(model, inputs), reference))
    handle = tomediff.apply_tome(model, ratio=RATIO, merge_mlp=True)
    report = handle.report()
    assert (report.adapter, len(report.blocks)) == (case.adapter, case.blocks)
    reduced = residuals(model, inputs)
    assert [r.shape for r in reduced] == [r.shape for r in reference]  # unmerged back to every token
    assert all(torch.isfinite(r).all() for r in reduced)
    assert not all(map(torch.equal, reduced, reference))
    handle.remove()
    assert tome_hooks(model) == 0
    assert all(map(torch.equal, residuals(model, inputs), reference))


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case.text is not None))
def test_controlnet_joint_attention_sees_fewer_image_tokens_and_the_whole_text(name: str) -> None:
    case = CASES[name]
    model = case.build()
    inputs = case.inputs(2)
    base = SdpaSpy()
    residuals(model, inputs, base)
    tomediff.apply_tome(model, ratio=RATIO, use_rand=False)
    spy = SdpaSpy()
    residuals(model, inputs, spy)
    assert len(spy.calls) == len(base.calls) == case.blocks
    for (query, key, _), (base_query, base_key, _) in zip(spy.calls, base.calls, strict=True):
        assert base_query.shape[2] == base_key.shape[2] == NUM_IMAGE + case.text_tokens
        assert query.shape[2] == key.shape[2] == NUM_IMAGE - REMOVED + case.text_tokens
    # The first block's text keys are exactly the unpatched ones: the text is never reduced.
    text = slice(0, case.text_tokens) if case.text == "first" else slice(-case.text_tokens, None)
    assert torch.equal(spy.calls[0][1][:, :, text], base.calls[0][1][:, :, text])


def test_hunyuandit_controlnet_self_attention_is_reduced_and_cross_attention_keeps_its_text() -> None:
    case = CASES["hunyuandit"]
    model = case.build()
    inputs = case.inputs(2)
    tomediff.apply_tome(model, ratio=RATIO, use_rand=False)
    spy = SdpaSpy()
    residuals(model, inputs, spy)
    shapes = [(query.shape[2], key.shape[2]) for query, key, _ in spy.calls]
    kept = NUM_IMAGE - REMOVED
    # Per block: attn1 over the reduced image tokens, then attn2 (image queries, whole, over the text).
    assert shapes == [(kept, kept), (NUM_IMAGE, 4 + 4)] * case.blocks


def test_sana_controlnet_linear_attention_gets_fewer_tokens_and_the_whole_text() -> None:
    case = CASES["sana"]
    model = case.build()
    inputs = case.inputs(2)
    tomediff.apply_tome(model, ratio=RATIO, use_rand=False)
    seen: list[tuple[str, int, int]] = []

    def spy(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            seen.append((name, x.shape[1], -1 if context is None else context.shape[1]))

        return record

    for block in model.transformer_blocks:
        block.attn1.register_forward_pre_hook(spy("attn1"), with_kwargs=True)
        block.attn2.register_forward_pre_hook(spy("attn2"), with_kwargs=True)
    residuals(model, inputs)
    assert seen == [("attn1", NUM_IMAGE - REMOVED, -1), ("attn2", NUM_IMAGE, TEXT)] * case.blocks


def test_flux_controlnet_reads_img_ids_at_their_place_in_its_forward() -> None:
    """Positional ``img_ids`` sit eighth in FluxControlNetModel.forward (fourth in the transformer's)."""
    model = tiny_flux_controlnet()
    (packed, cond), kwargs = flux_controlnet_inputs(2)
    order = ("encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    positional = (packed, cond, None, 1.0, *(kwargs[name] for name in order))
    tomediff.apply_tome(model, ratio=RATIO, use_rand=False)
    by_keyword = residuals(model, ((packed, cond), kwargs))
    by_position = residuals(model, (positional, {"return_dict": False}))
    assert all(map(torch.equal, by_position, by_keyword))
    spy = SdpaSpy()
    residuals(model, (positional, {"return_dict": False}), spy)
    assert {q.shape[2] for q, _, _ in spy.calls} == {TEXT + NUM_IMAGE - REMOVED}


def test_flux_controlnet_and_its_transformer_patched_together_and_removed_one_by_one() -> None:
    controlnet = tiny_flux_controlnet()
    transformer = tiny_flux()
    (packed, cond), kwargs = flux_controlnet_inputs(2)

    def denoise() -> torch.Tensor:
        with torch.no_grad():
            blocks, single_blocks = controlnet(packed, cond, **kwargs)
            return transformer(
                packed,
                controlnet_block_samples=blocks,
                controlnet_single_block_samples=single_blocks,
                **kwargs,
            )[0]

    reference = denoise()
    transformer_handle = tomediff.apply_tome(transformer, ratio=RATIO, use_rand=False)
    transformer_only = denoise()
    controlnet_handle = tomediff.apply_tome(controlnet, ratio=RATIO, use_rand=False)
    both = denoise()
    assert both.shape == reference.shape and torch.isfinite(both).all()
    assert not torch.equal(both, transformer_only)  # the ControlNet's reduced residuals reach the output
    assert controlnet_handle.report().effective_ratio == transformer_handle.report().effective_ratio == RATIO
    controlnet_handle.remove()
    assert tome_hooks(controlnet) == 0
    assert torch.equal(denoise(), transformer_only)
    transformer_handle.remove()
    assert tome_hooks(transformer) == 0
    assert torch.equal(denoise(), reference)


@pytest.mark.parametrize(
    ("wrapper", "build"),
    [
        ("FluxMultiControlNetModel", tiny_flux_controlnet),
        ("SD3MultiControlNetModel", tiny_sd3_controlnet),
        ("QwenImageMultiControlNetModel", tiny_qwenimage_controlnet),
        ("HunyuanDiT2DMultiControlNetModel", tiny_hunyuandit_controlnet),
    ],
)
def test_several_controlnets_are_refused_as_one_and_patched_each_on_its_own(
    wrapper: str, build: Callable[[], nn.Module]
) -> None:
    multi = getattr(diffusers, wrapper)([build(), build()])
    with pytest.raises(
        tomediff.UnsupportedModelError, match=rf"{wrapper}.*for net in pipe\.controlnet\.nets"
    ):
        tomediff.apply_tome(multi)
    assert tome_hooks(multi) == 0
    handles = [tomediff.apply_tome(net, ratio=RATIO) for net in multi.nets]
    assert all(handle.num_blocks > 0 for handle in handles)


def test_sd3_controlnet_without_pos_embed_is_refused_with_its_reason() -> None:
    """SD3.5's 8B ControlNets take patchified tokens: no grid in their call."""
    model = tiny_sd3_controlnet(
        use_pos_embed=False, joint_attention_dim=None, force_zeros_for_pooled_projection=False
    )
    assert model.pos_embed is None
    with pytest.raises(tomediff.UnsupportedModelError, match=r"SD3ControlNetModel.*without pos_embed"):
        tomediff.apply_tome(model)
    assert tome_hooks(model) == 0


def test_flux_union_controlnet_mode_token_joins_the_untouched_text() -> None:
    torch.manual_seed(0)
    model = diffusers.FluxControlNetModel(
        **{**TINY_FLUX_CONFIG, "num_layers": 1, "num_single_layers": 1, "num_mode": 3}
    )
    model = randomize_zeros(model, seed=3)
    (packed, cond), kwargs = flux_controlnet_inputs(2)
    inputs = ((packed, cond), {**kwargs, "controlnet_mode": torch.tensor([[1], [2]])})
    reference = residuals(model, inputs)
    with tomediff.tome(model, ratio=0.0):
        assert all(map(torch.equal, residuals(model, inputs), reference))
    tomediff.apply_tome(model, ratio=RATIO, use_rand=False)
    spy = SdpaSpy()
    reduced = residuals(model, inputs, spy)
    assert [r.shape for r in reduced] == [r.shape for r in reference]
    # The mode token is one more text token: [mode, text, image], only the image reduced.
    assert [(q.shape[2], k.shape[2]) for q, k, _ in spy.calls] == [(1 + TEXT + NUM_IMAGE - REMOVED,) * 2] * 2
