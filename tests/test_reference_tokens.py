"""Edit and in-context models: reference-image tokens as groups of their own (Flux Kontext, Flux.2 with
reference images, Qwen-Image-Edit, Bria FIBO-Edit, LongCat-Image-Edit, JoyImage-Edit and Edit-Plus, Flux 3),
each image reduced on its own grid, the references at ``reference_ratio``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import pytest
import torch
from torch import nn

import tomediff
from family_support import call_shapes, family_run
from test_attention_site import SdpaSpy
from test_dit_families import (
    flux_shaped_inputs,
    tiny_flux2,
    tiny_flux_shaped,
    tiny_qwenimage,
)
from test_dit_models import TEXT, TINY_FLUX_CONFIG, flux_inputs, image_ids, tiny_flux, tome_hooks
from test_image_families import flux3_inputs, tiny_flux3
from tiny_recent_families import (
    briafibo_inputs,
    joyimage_edit_inputs,
    joyimage_edit_plus_inputs,
    tiny_briafibo,
    tiny_joyimage_edit,
    tiny_joyimage_edit_plus,
)
from tomediff.core.spec import (
    ItemsVideoGrid,
    LeadingShapeListGrid,
    PositionIdsGrid,
    ShapeListGrid,
    TokenGroups,
)
from tomediff.eval.settings import METHOD_FIELDS, field_help, parse_setting
from tomediff.ops import (
    GridDownsample,
    GroupedDownsample,
    GroupedPlan,
    SharedMergePlan,
    grid_partition,
    plan_merge,
    shared_metric,
)

MAIN, REFERENCE = (4, 6), (4, 4)  # the predicted image's token grid, the reference image's
N1, N2 = math.prod(MAIN), math.prod(REFERENCE)
QWEN_TEXT, FLUX2_TEXT, FIBO_TEXT, JOY_TEXT, FLUX3_TEXT = 5, 4, 5, 5, 4  # text tokens per family


def kontext_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Flux Kontext's layout: the latent's tokens, then the reference's (ids with a first column of 1)."""
    latent, kwargs = flux_inputs(batch=batch, height=MAIN[0], width=MAIN[1])
    reference_ids = image_ids(*REFERENCE)
    reference_ids[:, 0] = 1
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([latent, torch.randn(batch, N2, 16, generator=gen)], dim=1)
    return (x,), {**kwargs, "img_ids": torch.cat([image_ids(*MAIN), reference_ids])}


def flux2_reference_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Flux.2's layout: ``(t, h, w, l)`` ids, the reference images at ``t = 10, 20, ...``, per sample."""
    gen = torch.Generator().manual_seed(1)
    zero = torch.arange(1)
    main = torch.cartesian_prod(zero, torch.arange(MAIN[0]), torch.arange(MAIN[1]), zero)
    reference = torch.cartesian_prod(zero + 10, torch.arange(REFERENCE[0]), torch.arange(REFERENCE[1]), zero)
    ids = torch.cat([main, reference]).unsqueeze(0).expand(batch, -1, -1)  # as the pipeline passes them
    return (), {
        "hidden_states": torch.randn(batch, N1 + N2, 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, FLUX2_TEXT, 32, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": ids,
        "txt_ids": torch.cartesian_prod(zero, zero, zero, torch.arange(FLUX2_TEXT)),
        "guidance": torch.full((batch,), 3.5),
        "return_dict": False,
    }


def qwen_edit_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Qwen-Image-Edit's layout: per sample, the predicted image's grid then the reference's."""
    gen = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(batch, N1 + N2, 16, generator=gen),
        "encoder_hidden_states": torch.randn(batch, QWEN_TEXT, 16, generator=gen),
        "encoder_hidden_states_mask": torch.ones(batch, QWEN_TEXT, dtype=torch.long),
        "timestep": torch.full((batch,), 0.5),
        "img_shapes": [[(1, *MAIN), (1, *REFERENCE)]] * batch,
        "return_dict": False,
    }


def fibo_edit_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Bria FIBO-Edit's layout: the predicted image's tokens, then the reference's (ids with a first column
    of 1); one sample's text padded, so the pipeline passes its key-padding mask over ``[text, images]``."""
    args, kwargs = briafibo_inputs(batch, (1, *MAIN))
    reference_ids = image_ids(*REFERENCE)
    reference_ids[:, 0] = 1
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, FIBO_TEXT + N1 + N2, dtype=torch.bool)
    mask[0, FIBO_TEXT - 2 : FIBO_TEXT] = False
    return args, {
        **kwargs,
        "hidden_states": torch.cat([kwargs["hidden_states"], torch.randn(batch, N2, 4, generator=gen)], 1),
        "img_ids": torch.cat([kwargs["img_ids"], reference_ids]),
        "joint_attention_kwargs": {"attention_mask": mask[:, None, None, :]},
    }


def longcat_edit_ids(first: int, grid: tuple[int, int], offset: int) -> torch.Tensor:
    """LongCat-Image-Edit's image ids: ``first`` in the first column (1: the predicted image, 2: the
    reference), rows and columns counted from the text's length ``offset``."""
    ids = image_ids(*grid)
    ids[:, 0] = first
    ids[:, 1:] += offset
    return ids


def longcat_edit_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    (latent,), kwargs = flux_shaped_inputs("pooled_projections")(batch, (1, *MAIN))
    gen = torch.Generator().manual_seed(3)
    ids = torch.cat([longcat_edit_ids(1, MAIN, TEXT), longcat_edit_ids(2, REFERENCE, TEXT)])
    return (torch.cat([latent, torch.randn(batch, N2, 4, generator=gen)], dim=1),), {**kwargs, "img_ids": ids}


def joyimage_edit_reference_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """JoyImage-Edit's ``[B, items, C, F, H, W]``: one reference image, of the predicted image's size."""
    return joyimage_edit_inputs(batch, (1, *MAIN), references=1)


def joyimage_edit_plus_reference_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """JoyImage-Edit-Plus's patches: every sample the predicted image then one reference image."""
    return joyimage_edit_plus_inputs(batch, (1, *MAIN), references=(REFERENCE,), every_sample=True)


def flux3_reference_inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Flux 3's modular pipeline's layout: ``(t, h, w, l)`` ids with rows and columns scaled by its
    ``image_rope_scale`` (0.5); the reference image's tokens and ids (``l = -1``) given apart."""
    args, kwargs = flux3_inputs(batch, (1, *MAIN))
    one = torch.arange(1)
    reference_ids = torch.cartesian_prod(one, torch.arange(REFERENCE[0]), torch.arange(REFERENCE[1]), one - 1)
    img_ids, reference_ids = kwargs["img_ids"].float(), reference_ids.float()
    img_ids[:, 1:3] *= 0.5
    reference_ids[:, 1:3] *= 0.5
    gen = torch.Generator().manual_seed(3)
    return args, {
        **kwargs,
        "img_ids": img_ids,
        "image_cond_hidden_states": torch.randn(batch, N2, 4, generator=gen),
        "image_cond_ids": reference_ids,
    }


@dataclass(frozen=True)
class EditFamily:
    """A tiny model, its inputs for a batch (the predicted image's grid :data:`MAIN` then one reference
    image), its text length, the reference's grid, and whether the attention sequence is ``[text,
    images]`` (else ``[images, text]``)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]
    text: int
    reference: tuple[int, int] = REFERENCE
    text_first: bool = True

    @property
    def sizes(self) -> tuple[int, int]:
        return N1, math.prod(self.reference)


FAMILIES = {
    "flux_kontext": EditFamily(tiny_flux, kontext_inputs, TEXT),
    "flux2": EditFamily(tiny_flux2, flux2_reference_inputs, FLUX2_TEXT),
    "qwen_edit": EditFamily(tiny_qwenimage, qwen_edit_inputs, QWEN_TEXT),
    "fibo_edit": EditFamily(tiny_briafibo, fibo_edit_inputs, FIBO_TEXT),
    "longcat_edit": EditFamily(
        tiny_flux_shaped("LongCatImageTransformer2DModel", pooled_projection_dim=8), longcat_edit_inputs, TEXT
    ),
    # JoyImage-Edit's items share one shape: its reference has the predicted image's grid.
    "joyimage_edit": EditFamily(
        tiny_joyimage_edit, joyimage_edit_reference_inputs, JOY_TEXT, reference=MAIN, text_first=False
    ),
    "joyimage_edit_plus": EditFamily(
        tiny_joyimage_edit_plus, joyimage_edit_plus_reference_inputs, JOY_TEXT, text_first=False
    ),
}


def kept(num: int, ratio: float) -> int:
    return num - int(num * ratio)


def joint_calls(spy: SdpaSpy) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The attention calls over the joint [text, image] sequence (every call of these models)."""
    return [call for call in spy.calls if call[0].shape[2] == call[1].shape[2]]


def capture_plans(handle: tomediff.ToMeHandle) -> list[tuple[Any, Any]]:
    """Records (request, plan) of every block call the patch's reducer plans."""
    reducer = handle.state.method.reducer
    original = reducer.plan
    seen: list[tuple[Any, Any]] = []

    def plan(state: Any, request: Any) -> Any:
        made = original(state, request)
        seen.append((request, made))
        return made

    reducer.plan = plan  # type: ignore[method-assign]
    return seen


# grid sources ---------------------------------------------------------------------------------------


def test_grid_sources_read_one_group_per_image() -> None:
    model = nn.Linear(1, 1)
    kontext = PositionIdsGrid(model, group_axis=0)
    _, kwargs = kontext_inputs(1)
    assert kontext.read((), kwargs) == TokenGroups((MAIN, REFERENCE))
    assert kontext.read((), {"img_ids": image_ids(*MAIN)}) == MAIN  # one image: its plain grid
    assert PositionIdsGrid(model).read((), kwargs) is None  # without group_axis: not one grid
    broken = kwargs["img_ids"].clone()
    broken[-3:, 0] = 2  # the reference's last tokens as a third "image" that is no grid
    assert kontext.read((), {"img_ids": broken}) is None
    _, kwargs = flux2_reference_inputs(2)
    assert PositionIdsGrid(model, position=3, group_axis=0).read((), kwargs) == TokenGroups((MAIN, REFERENCE))

    shapes = ShapeListGrid(model)
    edit = [[(1, 4, 6), (1, 4, 4), (1, 2, 2)]] * 2
    assert shapes.read((), {"img_shapes": edit}) == TokenGroups(((1, 4, 6), (1, 4, 4), (1, 2, 2)), outputs=1)
    layered = ShapeListGrid(model, references=1).read((), {"img_shapes": edit})
    assert layered == TokenGroups(((1, 4, 6), (1, 4, 4), (1, 2, 2)), outputs=2)
    assert shapes.read((), {"img_shapes": [[(1, 4, 6)]] * 2}) == (1, 4, 6)
    assert shapes.read((), {"img_shapes": [[(1, 4, 6), (1, 4, 4)], [(1, 4, 6), (1, 2, 8)]]}) is None


def test_grid_sources_of_the_other_edit_families() -> None:
    model = nn.Linear(1, 1)
    groups = TokenGroups((MAIN, REFERENCE))
    _, kwargs = longcat_edit_inputs(1)  # ids counted from the text's length
    assert PositionIdsGrid(model, position=3, group_axis=0).read((), kwargs) == groups
    _, kwargs = fibo_edit_inputs(1)
    assert PositionIdsGrid(model, position=5, group_axis=0).read((), kwargs) == groups

    # Flux 3: ids scaled by 0.5, the references' ids given apart and told apart by their last column.
    _, kwargs = flux3_reference_inputs(2)
    generated = PositionIdsGrid(model, position=3)
    with_references = PositionIdsGrid(model, position=3, group_axis=3, appended_ids=(("image_cond_ids", 6),))
    assert generated.read((), kwargs) == MAIN
    assert with_references.read((), kwargs) == groups
    assert with_references.read((), {**kwargs, "image_cond_ids": None}) == MAIN
    off_step = kwargs["img_ids"].clone()
    off_step[-1, 2] += 0.25  # the last id off the grid's 0.5 step
    assert generated.read((), {"img_ids": off_step}) is None
    same_column = kwargs["image_cond_ids"].clone()
    same_column[:, 3] = 0  # the reference not told apart from the generated image
    assert with_references.read((), {**kwargs, "image_cond_ids": same_column}) is None
    with pytest.raises(ValueError, match="give it a group_axis"):
        PositionIdsGrid(model, appended_ids=(("image_cond_ids", 6),))

    items = ItemsVideoGrid(model, video_patch=(1, 2, 2))
    _, kwargs = joyimage_edit_reference_inputs(2)
    assert items.read((), kwargs) == TokenGroups(((1, *MAIN), (1, *MAIN)))
    _, kwargs = joyimage_edit_inputs(2, (1, *MAIN))
    assert items.read((), kwargs) == (1, *MAIN)  # no references: the plain grid

    shapes = LeadingShapeListGrid(model)
    _, kwargs = joyimage_edit_plus_reference_inputs(2)
    assert shapes.read((), kwargs) == TokenGroups(((1, *MAIN), (1, *REFERENCE)))
    _, kwargs = joyimage_edit_plus_inputs(2, (1, *MAIN), references=(REFERENCE,))  # sample 0's only
    assert shapes.read((), kwargs) is None


# the grouped plan against the per-image plans --------------------------------------------------------


def _merge_plan(metric: torch.Tensor, grid: tuple[int, int], ratio: float) -> Any:
    partition = grid_partition(*grid, 2, 2, torch.zeros(math.prod(grid) // 4, dtype=torch.int64))
    return plan_merge(metric, partition, int(metric.shape[1] * ratio)), partition


def test_grouped_plan_equals_the_groups_plans_applied_apart() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = 3
    metric = torch.randn(batch, N1 + N2, 8, generator=gen)
    first, _ = _merge_plan(metric[:, :N1], MAIN, 0.5)
    second, _ = _merge_plan(metric[:, N1:], REFERENCE, 0.75)
    grouped = GroupedPlan.build((first, second), (N1, N2), batch)
    assert grouped.num_tokens == N1 + N2 and grouped.num_merged == first.num_merged + second.num_merged
    x = torch.randn(batch, N1 + N2, 5, generator=gen)
    merged = grouped.merge(x)
    assert torch.equal(merged, torch.cat([first.merge(x[:, :N1]), second.merge(x[:, N1:])], dim=1))
    m1 = first.num_merged
    unmerged = grouped.unmerge(merged)
    assert torch.equal(
        unmerged, torch.cat([first.unmerge(merged[:, :m1]), second.unmerge(merged[:, m1:])], 1)
    )
    mask = torch.randn(batch, 2, N1 + N2, N1 + N2, generator=gen)
    expected = torch.cat([first.merge_mask(mask[..., :N1], -1), second.merge_mask(mask[..., N1:], -1)], -1)
    assert torch.equal(grouped.merge_mask(mask, -1), expected)
    assert grouped.positions is None  # per-sample plans keep no shared positions
    assert torch.equal(grouped.local_slot, torch.cat([first.local_slot, second.local_slot + m1], dim=1))
    one = grouped.sample(1)
    assert one.batch == 1 and torch.equal(one.merge(x[1:2]), merged[1:2])

    # A group kept whole, and batch-shared plans: positions index the whole span.
    shared_plan, partition = _merge_plan(shared_metric(metric[:, N1:]), REFERENCE, 0.5)
    shared = SharedMergePlan.build(shared_plan, partition.dst_idx, batch)
    grouped = GroupedPlan.build((None, shared), (N1, N2), batch)
    assert torch.equal(grouped.merge(x), torch.cat([x[:, :N1], shared.merge(x[:, N1:])], dim=1))
    assert grouped.positions is not None
    assert torch.equal(grouped.positions, torch.cat([torch.arange(N1), shared.positions + N1]))

    down = (
        GridDownsample.build(batch, *MAIN, 2, "nearest"),
        GridDownsample.build(batch, *REFERENCE, 4, "avg"),
    )
    grouped_down = GroupedDownsample(down, (N1, N2), batch)
    hand = torch.cat([down[0].reduce(x[:, :N1]), down[1].reduce(x[:, N1:])], dim=1)
    assert torch.equal(grouped_down.reduce(x), hand) and grouped_down.num_merged == hand.shape[1]
    assert grouped_down.kept_index(x.device) is None  # "avg" is no selection
    nearest = GroupedDownsample((down[0], None), (N1, N2), batch)
    index = nearest.kept_index(x.device)
    assert index is not None and torch.equal(x[:, index], nearest.reduce(x))

    with pytest.raises(ValueError, match="plan of group 1 is for"):
        GroupedPlan.build((first, first), (N1, N2), batch)


def test_the_models_plan_is_each_images_own_matching() -> None:
    model = tiny_qwenimage()
    args, kwargs = qwen_edit_inputs(2)
    handle = tomediff.apply_tome(model, ratio=0.5, reference_ratio=0.75, use_rand=False)
    seen = capture_plans(handle)
    family_run(model, (args, kwargs))
    request, plan = seen[0]
    assert request.groups == TokenGroups(((1, *MAIN), (1, *REFERENCE)))
    assert isinstance(plan, GroupedPlan) and plan.sizes == (N1, N2)
    for index, (grid, start, ratio) in enumerate([(MAIN, 0, 0.5), (REFERENCE, N1, 0.75)]):
        size = math.prod(grid)
        hand, _ = _merge_plan(request.metric[:, start : start + size], grid, ratio)
        assert torch.equal(plan.plans[index].flat_slot, hand.flat_slot)
        assert torch.equal(plan.plans[index].counts, hand.counts)


# whole models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_ratio_zero_removal_and_token_counts_per_image(name: str, batch: int) -> None:
    family = FAMILIES[name]
    text, (n1, n2) = family.text, family.sizes
    model = family.build()
    inputs = family.inputs(batch)
    reference, base = family_run(model, inputs)
    base_calls = call_shapes(base)
    assert base_calls and all(q == k == text + n1 + n2 for q, k in base_calls)
    with tomediff.tome(model, ratio=0.0, reference_ratio=0.0):
        assert torch.equal(family_run(model, inputs)[0], reference)
    settings = {  # (options, tokens of the predicted image kept, of the reference kept)
        "both": ({"ratio": 0.5, "reference_ratio": 0.75}, kept(n1, 0.5), kept(n2, 0.75)),
        "image only": ({"ratio": 0.5, "reference_ratio": 0.0}, kept(n1, 0.5), n2),
        "reference only": ({"ratio": 0.0, "reference_ratio": 0.75}, n1, kept(n2, 0.75)),
        "as the image": ({"ratio": 0.5}, kept(n1, 0.5), kept(n2, 0.5)),
    }
    # Where the text and each image sit in the attention sequence.
    text_slice = slice(0, text) if family.text_first else slice(n1 + n2, None)
    start = text if family.text_first else 0
    main_slice, reference_slice = slice(start, start + n1), slice(start + n1, start + n1 + n2)
    for label, (options, main_kept, reference_kept) in settings.items():
        handle = tomediff.apply_tome(model, **options)
        out, spy = family_run(model, inputs)
        assert out.shape == reference.shape and not torch.equal(out, reference), label
        total = text + main_kept + reference_kept  # text tokens are never reduced
        assert call_shapes(spy) == [(total, total)] * len(base_calls), label
        # The first block sees the unpatched inputs: an image left whole keeps its exact queries and
        # keys (and so its rotary positions); the text's are untouched.
        query, key, _ = spy.calls[0]
        base_query, base_key, _ = base.calls[0]
        text_kept = text_slice if family.text_first else slice(main_kept + reference_kept, None)
        if main_kept == n1:
            assert torch.equal(query[:, :, main_slice], base_query[:, :, main_slice]), label
        if reference_kept == n2:
            kept_reference = slice(start + main_kept, start + main_kept + n2)
            assert torch.equal(key[:, :, kept_reference], base_key[:, :, reference_slice]), label
        assert torch.equal(key[:, :, text_kept], base_key[:, :, text_slice]), label
        last = handle.report().blocks[-1].last_call
        assert (
            last is not None
            and last.tokens == n1 + n2
            and last.tokens_after_merge == main_kept + reference_kept
        )
        handle.remove()
        assert tome_hooks(model) == 0
        assert torch.equal(family_run(model, inputs)[0], reference), label


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_key_value_ratio_and_downsampling_act_per_image(name: str) -> None:
    family = FAMILIES[name]
    text, (n1, n2) = family.text, family.sizes
    model = family.build()
    inputs = family.inputs(2)
    reference, _ = family_run(model, inputs)
    handle = tomediff.apply_tome(model, ratio=0.25, kv_ratio=0.5, reference_ratio=0.75, use_rand=False)
    out, spy = family_run(model, inputs)
    queries = text + kept(n1, 0.25) + kept(n2, 0.75)
    keys = text + kept(n1, 0.5) + kept(n2, 0.75)
    assert set(call_shapes(spy)) == {(queries, keys)} and not torch.equal(out, reference)
    handle.remove()
    handle = tomediff.apply_tome(model, method="downsample")
    out, spy = family_run(model, inputs)
    halves = [math.ceil(grid[0] / 2) * math.ceil(grid[1] / 2) for grid in (MAIN, family.reference)]
    assert set(call_shapes(spy)) == {(text + n1 + n2, text + sum(halves))} and not torch.equal(out, reference)
    handle.remove()
    assert torch.equal(family_run(model, inputs)[0], reference)


@pytest.mark.parametrize("batch", [1, 3])
def test_flux3_reduces_its_reference_images_in_the_single_stream_blocks(batch: int) -> None:
    """Flux 3's attention calls: the text's own blocks, the generated image's (``N1`` tokens), the
    references' (``N2``, left whole), then the single-stream blocks over ``[text, image, references]``."""
    model = tiny_flux3()
    inputs = flux3_reference_inputs(batch)
    reference, base = family_run(model, inputs)
    joint = FLUX3_TEXT + N1 + N2
    assert call_shapes(base) == [(FLUX3_TEXT,) * 2, (N1, N1), (N2, N2), (joint, joint), (joint, joint)]
    with tomediff.tome(model, ratio=0.0, reference_ratio=0.0):
        assert torch.equal(family_run(model, inputs)[0], reference)
    settings = {
        "both": ({"ratio": 0.5, "reference_ratio": 0.75}, kept(N1, 0.5), kept(N2, 0.75)),
        "reference only": ({"ratio": 0.0, "reference_ratio": 0.5}, N1, kept(N2, 0.5)),
        "as the image": ({"ratio": 0.5}, kept(N1, 0.5), kept(N2, 0.5)),
    }
    for label, (options, main_kept, reference_kept) in settings.items():
        handle = tomediff.apply_tome(model, **options)
        out, spy = family_run(model, inputs)
        assert out.shape == reference.shape and not torch.equal(out, reference), label
        total = FLUX3_TEXT + main_kept + reference_kept
        expected = [(FLUX3_TEXT,) * 2, (main_kept,) * 2, (N2, N2), (total, total), (total, total)]
        assert call_shapes(spy) == expected, label
        key, base_key = spy.calls[3][1], base.calls[3][1]
        assert torch.equal(key[:, :, :FLUX3_TEXT], base_key[:, :, :FLUX3_TEXT]), label  # the text's keys
        assert torch.equal(spy.calls[2][1], base.calls[2][1]), label  # the references' own blocks: whole
        blocks = handle.report().blocks
        assert [b.last_call.tokens_after_merge for b in blocks if b.last_call is not None] == [
            main_kept,
            main_kept + reference_kept,
            main_kept + reference_kept,
        ], label
        handle.remove()
        assert tome_hooks(model) == 0
        assert torch.equal(family_run(model, inputs)[0], reference), label


def test_kontext_rotary_rows_follow_their_tokens() -> None:
    """Flux.1 merges at block level: the rotary table's image rows are reduced with the tokens, the
    reference's rows taken from the reference's own part of the table."""
    model = tiny_flux()
    args, kwargs = kontext_inputs(2)
    tables: list[tuple[torch.Tensor, ...]] = []

    def record(module: nn.Module, args: Any, kwargs: Any) -> None:
        tables.append(tuple(t.clone() for t in kwargs["image_rotary_emb"]))

    attn = model.transformer_blocks[0].attn
    hook = attn.register_forward_pre_hook(record, with_kwargs=True)
    family_run(model, (args, kwargs))
    full = tables.pop()
    hook.remove()
    handle = tomediff.apply_tome(model, ratio=0.5, reference_ratio=0.75)
    seen = capture_plans(handle)
    attn.register_forward_pre_hook(record, with_kwargs=True)  # after tomediff's: sees what attn gets
    family_run(model, (args, kwargs))
    plan = seen[0][1]
    positions = plan.positions
    merged_main = plan.plans[0].num_merged
    assert bool((positions[:merged_main] < N1).all()) and bool((positions[merged_main:] >= N1).all())
    for reduced, table in zip(tables.pop(), full, strict=True):
        assert torch.equal(reduced, torch.cat([table[:TEXT], table[TEXT:][positions]]))


def test_inconsistent_groups_are_refused_naming_them() -> None:
    model = tiny_qwenimage()
    args, kwargs = qwen_edit_inputs(2)
    short = {**kwargs, "hidden_states": kwargs["hidden_states"][:, : N1 + N2 - 4]}
    with tomediff.tome(model, ratio=0.5):
        with pytest.raises(
            tomediff.MergeCallError, match=r"describes 2 images of \(24, 16\) tokens.*received 36"
        ):
            family_run(model, (args, short))
        mixed = {**kwargs, "img_shapes": [[(1, *MAIN), (1, *REFERENCE)], [(1, *MAIN), (1, 2, 8)]]}
        with pytest.raises(
            tomediff.MergeCallError, match="img_shapes in this call do not describe one image grid"
        ):
            family_run(model, (args, mixed))


def test_token_caching_refuses_reference_images() -> None:
    model = tiny_flux()
    args, kwargs = kontext_inputs(1)
    refused = r"receives the tokens of 2 images \(grids \[\(4, 6\), \(4, 4\)\]"
    with tomediff.tome(model, method="cache"), pytest.raises(tomediff.MergeCallError, match=refused):
        family_run(model, (args, kwargs))


def test_reused_plans_are_kept_per_image_layout() -> None:
    """reuse_steps keys its plans by the images of a call: a plan made for one image never serves a
    call with a reference image whose first image has the same grid."""
    model = tiny_flux()
    args, kwargs = kontext_inputs(1)
    single, single_kwargs = flux_inputs(batch=1, height=MAIN[0], width=MAIN[1])
    handle = tomediff.apply_tome(model, ratio=0.5, reuse_steps=3, use_rand=False)
    family_run(model, ((single,), single_kwargs))
    out = family_run(model, (args, {**kwargs, "timestep": torch.full((1,), 0.4)}))[0]
    handle.remove()
    with tomediff.tome(model, ratio=0.5, use_rand=False):
        fresh = family_run(model, (args, {**kwargs, "timestep": torch.full((1,), 0.4)}))[0]
    assert torch.equal(out, fresh)


def test_reference_ratio_is_validated_reported_and_a_setting() -> None:
    with pytest.raises(tomediff.ConfigError, match=r"reference_ratio=0\.9 is outside \[0, 0\.75\]"):
        tomediff.ToMeConfig(reference_ratio=0.9)
    with pytest.raises(tomediff.ConfigError, match="reference_ratio applies to method='merge'"):
        tomediff.ToMeConfig(method="downsample", reference_ratio=0.5)
    with pytest.raises(tomediff.ConfigError, match="reference_ratio must be a number"):
        tomediff.ToMeConfig(reference_ratio="0.5")  # type: ignore[arg-type]
    assert tomediff.ToMeConfig(ratio=0, kv_ratio=0, reference_ratio=0.5).reference_ratio == 0.5
    model = tiny_flux()
    handle = tomediff.apply_tome(model, reference_ratio=0.7)
    assert "reference_ratio=0.7" in str(handle.report())
    handle.remove()
    assert "reference_ratio" in METHOD_FIELDS and "reference image" in field_help("reference_ratio")
    assert parse_setting("edit:reference_ratio=0.7").config().reference_ratio == 0.7


# a whole edit pipeline ------------------------------------------------------------------------------


def test_flux_kontext_pipeline_end_to_end() -> None:
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        # 16 latent channels packed 2x2: the latent size the pipeline assumes without a VAE
        **{**TINY_FLUX_CONFIG, "in_channels": 64, "num_layers": 1, "num_single_layers": 1}
    ).eval()
    pipe = diffusers.FluxKontextPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(2)
    embeds, pooled = torch.randn(1, TEXT, 32, generator=gen), torch.randn(1, 8, generator=gen)
    image = torch.randn(1, 16, 8, 12, generator=gen)  # the reference image's latent (no VAE here)

    def generate() -> torch.Tensor:
        return pipe(
            image=image,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            height=64,
            width=96,
            max_area=64 * 96,  # else the pipeline scales the output to about 1024x1024 pixels
            num_inference_steps=3,
            output_type="latent",
            _auto_resize=False,
            generator=torch.Generator().manual_seed(1),
        ).images

    with torch.no_grad():
        reference = generate()
        handle = tomediff.apply_tome(pipe, ratio=0.5, reference_ratio=0.75)
        seen = capture_plans(handle)
        out = generate()
        report = handle.report()
        handle.remove()
        restored = generate()
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)
    assert torch.equal(restored, reference)
    # 64x96 pixels with the pipeline's VAE factor 8: a 4x6 token grid; the reference latent: 4x6 too.
    request = seen[0][0]
    assert request.groups == TokenGroups(((4, 6), (4, 6)))
    last = report.blocks[0].last_call
    assert (
        last is not None and last.tokens == 48 and last.tokens_after_merge == kept(24, 0.5) + kept(24, 0.75)
    )
    assert "4x6+4x6" in str(report)
