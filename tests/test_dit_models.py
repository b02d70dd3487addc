"""SD3 (MMDiT) and Flux: only image tokens are reduced, rotary positions follow their tokens, and the
patch composes with diffusers' pipelines, caches and group offloading (tiny random configs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import tomediff
from tomediff.core import ToMeHook
from tomediff.errors import ConfigError, NothingToPatchError
from tomediff.ops import (
    MergePlan,
    SharedMergePlan,
    grid_partition,
    merge_trailing,
    plan_merge,
    reduce_rotary,
    shared_metric,
    slot_positions,
    unmerge_trailing,
)

diffusers = pytest.importorskip("diffusers")

TEXT = 5


def tiny_sd3(dual: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual else (),
    ).eval()


# The tiny Flux shape, shared by its ControlNet (whose residuals must fit this transformer).
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 8,
    "axes_dims_rope": (4, 6, 6),
}


def tiny_flux() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()


def sd3_inputs(batch: int = 2, height: int = 16, width: int = 12) -> tuple[torch.Tensor, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, height, width, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=gen),
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "return_dict": False,
    }
    return sample, kwargs


def image_ids(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(batch: int = 2, height: int = 6, width: int = 8) -> tuple[torch.Tensor, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    packed = torch.randn(batch, height * width, 16, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, TEXT, 32, generator=gen),
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": image_ids(height, width),
        "txt_ids": torch.zeros(TEXT, 3),
        "return_dict": False,
    }
    return packed, kwargs


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[..., tuple[torch.Tensor, dict[str, Any]]]]] = {
    "sd3": (tiny_sd3, sd3_inputs),
    "flux": (tiny_flux, flux_inputs),
}


def run(model: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)[0]


def tome_hooks(model: nn.Module) -> int:
    return sum(
        isinstance(hook, ToMeHook)
        for module in model.modules()
        for table in (module._forward_pre_hooks, module._forward_hooks)
        for hook in table.values()
    )


class Spy:
    """Forward pre-hook recording what a module receives (after tomediff's own pre-hooks)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        rotary = kwargs.get("image_rotary_emb")
        context = kwargs.get("encoder_hidden_states")
        self.calls.append(
            {
                "tokens": x.shape[1],
                "text": None if context is None else context.clone(),
                "rotary": None if rotary is None else tuple(t.clone() for t in rotary),
            }
        )


# ops ------------------------------------------------------------------------------------------------


def test_shared_metric_similarity_is_the_batch_mean_of_cosine_similarities() -> None:
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    shared = shared_metric(x)[0]
    got = torch.nn.functional.cosine_similarity(shared[:, None], shared[None], dim=-1)
    per_sample = torch.nn.functional.cosine_similarity(x[:, :, None], x[:, None], dim=-1)
    assert_close(got, per_sample.mean(0))


def test_slot_positions_are_the_dst_of_each_group_or_the_token_itself() -> None:
    height, width = 4, 6
    offsets = torch.randint(4, (2, 3), generator=torch.Generator().manual_seed(0))
    partition = grid_partition(height, width, 2, 2, offsets)
    metric = torch.randn(1, height * width, 8, generator=torch.Generator().manual_seed(1))
    plan = plan_merge(metric, partition, 10)
    assert isinstance(plan, MergePlan)
    slots = plan.local_slot[0]
    positions = slot_positions(slots, partition.dst_idx, plan.num_merged)
    dst = set(partition.dst_idx.tolist())
    for slot in range(plan.num_merged):
        members = [n for n in range(height * width) if slots[n] == slot]
        expected = [n for n in members if n in dst] if len(members) > 1 else members
        assert len(expected) == 1 and positions[slot] == expected[0]


def test_trailing_merge_and_rotary_reduction_equal_a_hand_reduction() -> None:
    batch, text, height, width, channels = 2, 3, 4, 4, 5
    partition = grid_partition(height, width, 2, 2, torch.zeros(2, 2, dtype=torch.int64))
    single = plan_merge(torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(2)), partition, 6)
    assert single is not None
    plan = SharedMergePlan.build(single, partition.dst_idx, batch)
    x = torch.randn(batch, text + 16, channels)
    slots = single.local_slot[0]
    hand = torch.stack([x[:, text:][:, slots == m].mean(1) for m in range(plan.num_merged)], dim=1)
    merged = merge_trailing(x, plan, text)
    assert_close(merged, torch.cat([x[:, :text], hand], dim=1))
    restored = unmerge_trailing(merged, plan, text)
    assert_close(restored[:, :text], x[:, :text])
    assert_close(restored[:, text:], hand[:, slots])
    cos, sin = torch.randn(text + 16, 6), torch.randn(text + 16, 6)
    got_cos, got_sin = reduce_rotary((cos, sin), plan.positions, 16)
    assert_close(got_cos, torch.cat([cos[:text], cos[text:][plan.positions]]))
    assert_close(got_sin, torch.cat([sin[:text], sin[text:][plan.positions]]))


# what the attention sees ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_tokens_are_fewer_inside_attention_and_text_untouched(family: str) -> None:
    build, inputs = FAMILIES[family]
    model = build()
    x, kwargs = inputs()
    num_image = 48
    first = model.transformer_blocks[0].attn
    clean = Spy()
    spy_handle = first.register_forward_pre_hook(clean, with_kwargs=True)
    run(model, x, kwargs)
    spy_handle.remove()
    handle = tomediff.apply_tome(model, ratio=0.5, use_rand=False, merge_mlp=True)
    spies: dict[str, Spy] = {}
    for name, module in model.named_modules():
        if (
            name.endswith(".attn")
            or name.endswith(".ff")
            or name.endswith(".ff_context")
            or "proj_mlp" in name
        ):
            spies[name] = Spy()
            module.register_forward_pre_hook(spies[name], with_kwargs=True)
    run(model, x, kwargs)
    for name, spy in spies.items():
        (call,) = spy.calls
        if name.startswith("single_transformer_blocks"):  # [text, image] concatenated inside the block
            assert call["tokens"] == TEXT + num_image // 2, name
        elif name.endswith("ff_context"):
            assert call["tokens"] == TEXT, name
        else:
            assert call["tokens"] == num_image // 2, name
        if call["text"] is not None:
            assert call["text"].shape[1] == TEXT
    merged_first = spies["transformer_blocks.0.attn"].calls[0]
    # The first block's text stream is exactly what the unpatched model gives its attention.
    assert torch.equal(merged_first["text"], clean.calls[0]["text"])
    if family == "flux":
        for table, full in zip(merged_first["rotary"], clean.calls[0]["rotary"], strict=True):
            assert table.shape[0] == TEXT + num_image // 2
            assert torch.equal(table[:TEXT], full[:TEXT])  # the text part of the table stays intact
    assert handle.report().effective_ratio == 0.5


def _hand_merge(x: torch.Tensor, slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    return torch.stack([x[:, slots == m].mean(1) for m in range(num_slots)], dim=1)


def _top_left_positions(slots: torch.Tensor, num_slots: int, width: int) -> torch.Tensor:
    """Position each group takes, told independently of the library: with use_rand=False the dst of
    a window is its top-left token (even row, even column); a lone token keeps its own."""
    positions = []
    for m in range(num_slots):
        members = (slots == m).nonzero().flatten().tolist()
        top_left = [n for n in members if (n // width) % 2 == 0 and (n % width) % 2 == 0]
        positions.append(top_left[0] if len(members) > 1 else members[0])
    return torch.tensor(positions)


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_rotary_positions_stay_with_their_tokens(block: str) -> None:
    """The patched attention equals the unpatched one run on hand-merged tokens with each group's
    rotary row (its dst's), unmerged by hand; truncating the table instead gives another result."""
    model = tiny_flux()
    height, width = 6, 8
    x, kwargs = flux_inputs(batch=2, height=height, width=width)
    attn = model.get_submodule(f"{block}.attn")
    seen: dict[str, Any] = {}

    def record_input(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen.setdefault("kwargs", dict(kw))

    def record_output(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
        seen["output"] = out[0] if isinstance(out, tuple) else out

    handle = tomediff.apply_tome(model, ratio=0.5, use_rand=False)
    plans: dict[str, Any] = {}
    handle.watch(lambda event: plans.setdefault(event.block, event.plan))
    # The attention's input before tomediff merges it (prepended) and its output once unmerged.
    in_hook = attn.register_forward_pre_hook(record_input, with_kwargs=True, prepend=True)
    out_hook = attn.register_forward_hook(record_output, with_kwargs=True)
    run(model, x, kwargs)
    in_hook.remove()
    out_hook.remove()
    clean_kwargs = seen.pop("kwargs")
    handle.remove()  # the references below run the plain attention
    plan = plans[block]
    slots = plan.local_slot[0]
    assert torch.equal(plan.local_slot[1], slots)  # one grouping for the batch
    num_slots = plan.num_merged
    tokens = clean_kwargs["hidden_states"]
    text = tokens.shape[1] - height * width
    cos, sin = clean_kwargs["image_rotary_emb"]
    positions = _top_left_positions(slots, num_slots, width)
    assert torch.equal(positions, plan.positions)

    def reference(rows: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([tokens[:, :text], _hand_merge(tokens[:, text:], slots, num_slots)], dim=1)
        prefix = cos.shape[0] - height * width
        table = tuple(torch.cat([t[:prefix], t[prefix:][rows]]) for t in (cos, sin))
        call = {**clean_kwargs, "hidden_states": merged, "image_rotary_emb": table}
        with torch.no_grad():
            out = attn(**call)
        out = out[0] if isinstance(out, tuple) else out
        return torch.cat([out[:, :text], out[:, text:][:, slots]], dim=1)

    assert_close(seen["output"], reference(positions), atol=1e-5, rtol=1e-5)
    truncated = reference(torch.arange(num_slots))
    assert not torch.allclose(seen["output"], truncated, atol=1e-3)


# exactness, calls, shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ratio_zero_and_removal_are_bit_exact(family: str) -> None:
    build, inputs = FAMILIES[family]
    model = build()
    x, kwargs = inputs()
    reference = run(model, x, kwargs)
    with tomediff.tome(model, ratio=0.0):
        assert torch.equal(run(model, x, kwargs), reference)
    handle = tomediff.apply_tome(model, ratio=0.5, merge_mlp=True)
    merged = run(model, x, kwargs)
    assert merged.shape == reference.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, reference)
    handle.remove()
    assert tome_hooks(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(run(model, x, kwargs), reference)


def test_keyword_and_positional_calls_agree() -> None:
    for family in ("sd3", "flux"):
        build, inputs = FAMILIES[family]
        model = build()
        x, kwargs = inputs()
        tomediff.apply_tome(model, ratio=0.5, use_rand=False)
        with torch.no_grad():
            by_keyword = model(hidden_states=x, **kwargs)[0]
            names = ["encoder_hidden_states", "pooled_projections", "timestep"]
            if family == "flux":
                names += ["img_ids", "txt_ids"]
            positional = model(x, *(kwargs[n] for n in names), return_dict=False)[0]
        assert torch.equal(by_keyword, positional), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_non_square_grids_and_odd_batches(family: str, batch: int) -> None:
    build, inputs = FAMILIES[family]
    model = build()
    if family == "sd3":
        x, kwargs = inputs(batch=batch, height=12, width=20)
        grid = (6, 10)
    else:
        x, kwargs = inputs(batch=batch, height=5, width=9)
        grid = (5, 9)
    reference = run(model, x, kwargs)
    handle = tomediff.apply_tome(model, ratio=0.5)
    out = run(model, x, kwargs)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    stats = [b.last_call for b in handle.report().blocks]
    assert all(s is not None and (s.height, s.width) == grid for s in stats)
    assert all(s.tokens_after_merge < s.tokens for s in stats if s is not None)


def test_flux_grid_comes_from_img_ids_and_unexplained_ids_are_refused() -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs(height=6, width=8)
    handle = tomediff.apply_tome(model, ratio=0.5)
    transposed = image_ids(8, 6)  # the same 48 tokens read as an 8x6 grid
    with torch.no_grad():
        model(x, **{**kwargs, "img_ids": transposed})
    assert {(b.last_call.height, b.last_call.width) for b in handle.report().blocks if b.last_call} == {
        (8, 6)
    }
    with torch.no_grad():
        model(x, **kwargs)
    assert {(b.last_call.height, b.last_call.width) for b in handle.report().blocks if b.last_call} == {
        (6, 8)
    }
    extra = torch.cat([image_ids(6, 8)[:-4], torch.ones(4, 3)])  # not one full row-major grid
    with pytest.raises(tomediff.MergeCallError, match="cannot tell the token grid"), torch.no_grad():
        model(x, **{**kwargs, "img_ids": extra})


def test_flux_kontext_reference_tokens_are_their_own_grid_not_one_square_grid() -> None:
    # Kontext's layout in tiny form: a 4x8 latent and a same-size reference image (ids with a first
    # coordinate of 1), 64 tokens that a square-root guess would merge as one 8x8 image. Each image is
    # merged on its own grid (tests/test_reference_tokens.py).
    model = tiny_flux()
    latent, kwargs = flux_inputs(height=4, width=8)
    reference = image_ids(4, 8)
    reference[:, 0] = 1
    x = torch.cat([latent, torch.randn_like(latent)], dim=1)
    ids = torch.cat([image_ids(4, 8), reference])
    handle = tomediff.apply_tome(model, ratio=0.5)
    run(model, x, {**kwargs, "img_ids": ids})
    stats = [block.last_call for block in handle.report().blocks]
    assert all(s is not None and (s.height, s.width, s.other_grids) == (4, 8, ((4, 8),)) for s in stats)
    assert all(s is not None and s.tokens == 64 and s.tokens_after_merge == 32 for s in stats)


def test_sd3_five_dual_attention_and_downsample_keys_only() -> None:
    model = tiny_sd3(dual=True)
    x, kwargs = sd3_inputs()
    reference = run(model, x, kwargs)
    handle = tomediff.apply_tome(model, method="downsample", downsample_factor=2)
    attn = model.transformer_blocks[0].attn
    seen: dict[str, int] = {}
    attn.to_q.register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0].shape[1]))
    attn.to_k.register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0].shape[1]))
    attn.add_k_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("text_k", a[0].shape[1]))
    out = run(model, x, kwargs)
    assert seen == {"q": 48, "k": 12, "text_k": TEXT}  # every query, image keys from the 4x3 grid
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert handle.report().blocks[0].sites == ("attn",)
    handle.remove()
    assert torch.equal(run(model, x, kwargs), reference)


def test_flux_downsample_replaces_a_merge_patch_at_the_attention_call() -> None:
    # Flux's downsampling acts at the attention call, after rotary (tests/test_attention_site.py).
    model = tiny_flux()
    x, kwargs = flux_inputs()
    handle = tomediff.apply_tome(model, ratio=0.5, use_rand=False)
    merged = run(model, x, kwargs)
    downsampled = tomediff.apply_tome(model, method="downsample")
    assert not handle.active and downsampled.active
    assert not torch.equal(run(model, x, kwargs), merged)


def test_skip_blocks_chooses_the_blocks_and_is_validated() -> None:
    model = tiny_flux()
    handle = tomediff.apply_tome(model, skip_blocks=(1, 1))
    assert [b.name for b in handle.report().blocks] == ["transformer_blocks.1", "single_transformer_blocks.0"]
    assert "skip_blocks=(1, 1)" in str(handle.report())
    with pytest.raises(NothingToPatchError, match="skip_blocks"):
        tomediff.apply_tome(model, skip_blocks=(2, 2))
    for bad in [(-1, 0), (1,), "ab", (1.5, 0)]:
        with pytest.raises(ConfigError, match="skip_blocks"):
            tomediff.ToMeConfig(skip_blocks=bad)  # type: ignore[arg-type]
    assert tomediff.ToMeConfig(skip_blocks=[2, 0]).skip_blocks == (2, 0)


def test_flux_schedule_reads_the_pipeline_timestep_scale() -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs()
    handle = tomediff.apply_tome(model, ratio=0.5, start=0.4, stop=0.6)
    for t, merges in [(0.9, False), (0.5, True), (0.1, False)]:
        run(model, x, {**kwargs, "timestep": torch.full((2,), t)})
        stats = handle.report().blocks[0].last_call
        assert stats is not None and (stats.tokens_after_merge < stats.tokens) == merges, t


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_schedule_reads_a_positional_timestep_at_its_place_in_forward(family: str) -> None:
    """SD3/Flux take the timestep fourth (after text and pooled embeddings), not second as a UNet."""
    build, inputs = FAMILIES[family]
    model = build()
    x, kwargs = inputs()
    scale = 1.0 if family == "flux" else 1000.0
    handle = tomediff.apply_tome(model, ratio=0.5, start=0.4, stop=0.6, use_rand=False)
    names = ["encoder_hidden_states", "pooled_projections", "timestep"]
    if family == "flux":
        names += ["img_ids", "txt_ids"]
    for progress, merges in [(0.1, False), (0.5, True), (0.9, False)]:
        timestep = torch.full((x.shape[0],), (1 - progress) * scale)
        values = {**kwargs, "timestep": timestep}
        with torch.no_grad():
            model(x, *(values[n] for n in names), return_dict=False)
        stats = handle.report().blocks[0].last_call
        assert stats is not None and (stats.tokens_after_merge < stats.tokens) == merges, progress


# random partitions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "batch", "draws"), [("flux", 2, 1), ("flux", 1, 1), ("sd3", 2, 1), ("sd3", 1, 0)]
)
def test_one_partition_draw_per_call_for_every_input_layout(
    family: str, batch: int, draws: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flux takes packed [B, N, C] tokens: its draw waits for the grid (img_ids), then serves every
    block of the call. FLUX.1 keeps random partitions at batch 1; SD3 keeps tomesd's odd-batch rule."""
    build, inputs = FAMILIES[family]
    model = build()
    x, kwargs = inputs(batch=batch)
    handle = tomediff.apply_tome(model, ratio=0.5, use_rand=True)
    generator, randint = handle.state.generator, torch.randint
    drawn: list[tuple[int, ...]] = []

    def counting_randint(*args: Any, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is generator:
            drawn.append(tuple(args[1]))
        return randint(*args, **kw)

    monkeypatch.setattr(torch, "randint", counting_randint)
    for _ in range(3):
        run(model, x, kwargs)
    assert len(drawn) == 3 * draws
    assert all(shape[0] == handle.num_blocks for shape in drawn)  # a row per block
    partition = "random" if draws else f"top-left (odd batch of {batch})"
    assert f"use_rand=True (last call: {partition} partition" in str(handle.report())


def test_batch_one_flux_merges_with_a_random_partition() -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs(batch=1)
    outputs = []
    for use_rand, seed in [(True, 0), (True, 1), (False, 0)]:
        tomediff.apply_tome(model, ratio=0.5, use_rand=use_rand, seed=seed)
        outputs.append(run(model, x, kwargs))
    assert not torch.equal(outputs[0], outputs[1])  # the seed chooses the partition
    assert not torch.equal(outputs[0], outputs[2]) and not torch.equal(outputs[1], outputs[2])


# torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiles_without_graph_breaks_inside_patched_blocks(family: str) -> None:
    from torch._dynamo.utils import counters

    build, inputs = FAMILIES[family]
    model = build()
    x, kwargs = inputs()
    tomediff.apply_tome(model, ratio=0.5, use_rand=False, merge_mlp=True)
    eager = run(model, x, kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    out = run(compiled, x, kwargs)
    unique = counters["stats"]["unique_graphs"]
    run(compiled, x, kwargs)
    breaks = [reason for reason, count in counters["graph_break"].items() for _ in range(count)]
    if family == "sd3":
        assert breaks == []
    else:  # Flux's grid is read from img_ids once per call, eagerly, before any block
        assert breaks and all("PositionIdsGrid.read" in reason for reason in breaks), breaks
    assert counters["stats"]["unique_graphs"] == unique
    assert_close(out, eager, atol=1e-5, rtol=1e-5)


# pipelines, caches, offloading --------------------------------------------------------------------------
# The pipelines run without tokenizers or text encoders (diffusers' tiny test checkpoints would have to
# be downloaded): they get prompt embeddings built here, and return latents (no VAE).


def flux_pipeline() -> tuple[Any, Callable[[], torch.Tensor]]:
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux(),
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(2)
    embeds, pooled = torch.randn(1, TEXT, 32, generator=gen), torch.randn(1, 8, generator=gen)

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            height=96,
            width=128,
            num_inference_steps=4,
            output_type="latent",
            generator=torch.Generator().manual_seed(1),
        ).images

    return pipe, generate


def sd3_pipeline() -> tuple[Any, Callable[[], torch.Tensor]]:
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        transformer=tiny_sd3(),
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(2)
    embeds, pooled = torch.randn(1, TEXT, 16, generator=gen), torch.randn(1, 8, generator=gen)

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.zeros_like(embeds),
            negative_pooled_prompt_embeds=torch.zeros_like(pooled),
            height=128,
            width=96,
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(1),
        ).images

    return pipe, generate


@pytest.mark.parametrize("make", [sd3_pipeline, flux_pipeline], ids=["sd3", "flux"])
def test_patched_pipelines_generate_and_restore(make: Callable[[], tuple[Any, Any]]) -> None:
    pipe, generate = make()
    with torch.no_grad():
        reference = generate()
        handle = tomediff.apply_tome(pipe, ratio=0.5)
        merged = generate()
        report = handle.report()
        handle.remove()
        restored = generate()
    assert torch.isfinite(merged).all() and not torch.equal(merged, reference)
    steps = 3 if type(pipe.transformer).__name__.startswith("SD3") else 4
    assert report.calls == steps  # one transformer call per step (SD3's CFG halves share a call)
    assert report.effective_ratio == 0.5
    assert torch.equal(restored, reference)


def _calls_of(module: nn.Module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count


def test_blocks_that_first_block_cache_skips_are_never_planned() -> None:
    """The cache runs a skipped block's pre-hooks, then returns its cached output: one matching per
    block that actually ran, none for the skipped ones."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, generate = flux_pipeline()  # in diffusers 0.42 the SD3 model has no enable_cache
    model = pipe.transformer
    handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
    model.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # every step after the first is cached
    reducer = handle.state.method.reducer
    matchings = [0]
    plan = reducer.plan

    def counting_plan(*args: Any, **kwargs: Any) -> Any:
        matchings[0] += 1
        return plan(*args, **kwargs)

    reducer.plan = counting_plan  # type: ignore[method-assign]
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", ())]
    ran = [_calls_of(block.attn) for block in blocks]
    events: list[str] = []
    handle.watch(lambda e: events.append(e.block))
    with torch.no_grad():
        generate()
    steps = handle.report().calls
    assert [count[0] for count in ran] == [steps] + [1] * (len(blocks) - 1)  # the cache skipped the rest
    assert matchings[0] == len(events) == sum(count[0] for count in ran) == steps + len(blocks) - 1
