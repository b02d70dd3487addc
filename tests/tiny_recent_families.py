"""Tiny random-weight configs of diffusers' image transformers reduced at their attention call that
``test_image_families`` runs its family checks on (Bria FIBO, Ideogram 4, JoyImage-Edit and Edit-Plus,
NucleusMoE-Image), with their inputs for a batch and an image token grid ``(1, height, width)``."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from torch import nn

from family_support import Inputs, randomize_zeros
from test_dit_models import image_ids


def tiny_briafibo() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.BriaFiboTransformer2DModel(
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=8,
        axes_dims_rope=[2, 2, 4],
        text_encoder_dim=8,
    ).eval()


def briafibo_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, height * width, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=gen),
        "text_encoder_layers": [torch.randn(batch, 5, 8, generator=gen) for _ in range(3)],
        "timestep": torch.full((batch,), 500.0),
        "img_ids": image_ids(height, width),
        "txt_ids": torch.zeros(5, 3),
        "return_dict": False,
    }


def tiny_ideogram4() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.Ideogram4Transformer2DModel(
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        intermediate_size=32,
        adaln_dim=8,
        llm_features_dim=8,
        mrope_section=(4, 2, 2),
    )
    return randomize_zeros(model, seed=3)


def ideogram4_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    """The pipeline's packed conditional row: ``[left padding, text, image]``, text lengths differing per
    sample."""
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    num, text = height * width, 5
    seq = text + num
    image = (
        torch.cartesian_prod(torch.zeros(1, dtype=torch.long), torch.arange(height), torch.arange(width))
        + 65536
    )
    position_ids = torch.zeros(batch, seq, 3, dtype=torch.long)
    segment_ids = torch.full((batch, seq), -1, dtype=torch.long)
    indicator = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        length = text - b % 2  # one sample's text is padded on the left
        offset = text - length
        position_ids[b, offset:text] = torch.arange(length)[:, None]
        position_ids[b, text:] = image
        indicator[b, offset:text] = 3  # LLM_TOKEN_INDICATOR
        indicator[b, text:] = 2  # OUTPUT_IMAGE_INDICATOR
        segment_ids[b, offset:] = 1
    return (), {
        "hidden_states": torch.randn(batch, seq, 4, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": torch.randn(batch, seq, 8, generator=gen),
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "indicator": indicator,
        "return_dict": False,
    }


# JoyImage-Edit's tiny config, Edit-Plus's too (the same blocks; Plus takes patchified items).
TINY_JOYIMAGE_CONFIG: dict[str, Any] = dict(
    patch_size=[1, 2, 2],
    in_channels=4,
    hidden_size=16,
    num_attention_heads=2,
    text_dim=8,
    num_layers=2,
    rope_dim_list=[2, 2, 4],
)


def tiny_joyimage_edit() -> nn.Module:
    torch.manual_seed(0)
    return randomize_zeros(diffusers.JoyImageEditTransformer3DModel(**TINY_JOYIMAGE_CONFIG), seed=3)


def joyimage_edit_inputs(batch: int, grid: tuple[int, int, int], references: int = 0) -> Inputs:
    """A ``[B, C, 1, H, W]`` latent, or with ``references`` the pipeline's ``[B, items, C, 1, H, W]``
    (references first, the generated image last)."""
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    shape = (batch, 4, 1, 2 * height, 2 * width)
    if references:
        shape = (batch, references + 1, 4, 1, 2 * height, 2 * width)
    return (), {
        "hidden_states": torch.randn(shape, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=gen),
        "return_dict": False,
    }


def tiny_joyimage_edit_plus() -> nn.Module:
    torch.manual_seed(0)
    return randomize_zeros(diffusers.JoyImageEditPlusTransformer3DModel(**TINY_JOYIMAGE_CONFIG), seed=3)


def joyimage_edit_plus_inputs(
    batch: int,
    grid: tuple[int, int, int],
    references: tuple[tuple[int, int], ...] = (),
    every_sample: bool = False,
) -> Inputs:
    """The pipeline's patchified ``[B, patches, C, pt, ph, pw]`` input: the generated image's patches, then
    each sample's reference images' (``references``: their token grids, for sample 0 only, or with
    ``every_sample`` for every sample), zero-padded to one length; the text mask pads one sample's text."""
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    shape_list = [[(1, height, width)] for _ in range(batch)]
    for sample in shape_list[: batch if every_sample else 1]:
        sample += [(1, h, w) for h, w in references]
    lengths = [sum(t * h * w for t, h, w in shapes) for shapes in shape_list]
    hidden = torch.zeros(batch, max(lengths), 4, 1, 2, 2)
    for b, length in enumerate(lengths):
        hidden[b, :length] = torch.randn(length, 4, 1, 2, 2, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[0, -2:] = 0
    return (), {
        "hidden_states": hidden,
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=gen),
        "encoder_hidden_states_mask": mask,
        "shape_list": shape_list,
        "return_dict": False,
    }


def tiny_nucleusmoe_image() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        joint_attention_dim=8,
        axes_dims_rope=(2, 2, 4),
        moe_enabled=True,
        dense_moe_strategy="all_moe",  # a dense block this narrow would get a zero-width feed-forward
        num_experts=2,
        moe_intermediate_dim=16,
        capacity_factors=1.0,  # each expert takes at most half the tokens (top-k over the sequence)
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the packed experts' weights are left uninitialised (torch.empty) by diffusers
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=gen))
    return randomize_zeros(model, seed=3)


def nucleusmoe_image_inputs(batch: int, grid: tuple[int, int, int]) -> Inputs:
    _, height, width = grid
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, -2:] = False
    return (), {
        "hidden_states": torch.randn(batch, height * width, 16, generator=gen),
        "img_shapes": [(1, height, width)] * batch,
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=gen),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((batch,), 0.5),
        "return_dict": False,
    }
