"""The method seam and its controls: ToDo downsampling, plan reuse, step schedule, per-level ratios,
minimum token counts — on SD-, SDXL-, PixArt- and LDM-shaped tiny models and inside a pipeline."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import diffusers
import pytest
import torch
from torch import nn

import tomediff
from conftest import (
    sdxl_added_cond,
    tiny_pixart,
    tiny_sd_unet,
    tiny_sd_unet_3level,
    tiny_sdxl_unet,
    unet_inputs,
)
from test_models import LatentDiffusion
from tomediff.core import PlanEvent, ToMeHook
from tomediff.ops import downsample_grid, grid_partition, plan_merge

# ---------------------------------------------------------------------------------------------------
# Models and how to call them


def _call_unet(model: nn.Module, timestep: int = 500, batch: int = 2) -> torch.Tensor:
    sample, _, context = unet_inputs(batch)
    return model(sample, torch.tensor(timestep), context).sample


def _call_sdxl(model: nn.Module, timestep: int = 500, batch: int = 2) -> torch.Tensor:
    sample, _, context = unet_inputs(batch)
    return model(sample, torch.tensor(timestep), context, added_cond_kwargs=sdxl_added_cond(batch)).sample


def _call_pixart(model: nn.Module, timestep: int = 500, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 16, 12, generator=gen)
    caption = torch.randn(batch, 5, 24, generator=gen)
    return model(sample, encoder_hidden_states=caption, timestep=torch.full((batch,), timestep)).sample


def _call_ldm(model: nn.Module, timestep: int = 500, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 8, 16, 16, generator=gen)
    context = torch.randn(batch, 3, 6, generator=gen)
    return model.model.diffusion_model(x, torch.tensor(timestep), context)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., torch.Tensor]]] = {
    "sd": (tiny_sd_unet, _call_unet),
    "sdxl": (tiny_sdxl_unet, _call_sdxl),
    "pixart": (tiny_pixart, _call_pixart),
    "ldm": (lambda: _seeded_ldm(), _call_ldm),
}


def _seeded_ldm() -> nn.Module:
    torch.manual_seed(0)
    return LatentDiffusion().eval()


METHODS: dict[str, dict[str, Any]] = {
    "merge": {},
    "downsample": {"method": "downsample"},
    "downsample-avg": {"method": "downsample", "downsample_mode": "avg"},
    "merge+reuse_level": {"reuse_level": True},
    "merge+reuse_steps": {"reuse_steps": 2},
    "merge+reuse_cfg": {"reuse_cfg": True, "cfg_layout": "uncond_cond"},
    "merge+schedule": {"start": 0.25, "stop": 1.0},
}


def _hook_count(model: nn.Module) -> int:
    return sum(
        isinstance(hook, ToMeHook)
        for module in model.modules()
        for table in (module._forward_pre_hooks, module._forward_hooks)
        for hook in table.values()
    )


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(MODELS))
@torch.no_grad()
def test_every_method_runs_changes_the_output_and_removes_cleanly(family: str, method: str) -> None:
    build, call = MODELS[family]
    model = build()
    base = call(model)
    handle = tomediff.apply_tome(model, **METHODS[method])
    first, second = call(model), call(model, timestep=400)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, base)
    report = handle.report()
    assert any(
        b.last_call is not None and b.last_call.tokens_after_merge < b.last_call.tokens for b in report.blocks
    )
    handle.remove()
    assert _hook_count(model) == 0
    assert torch.equal(call(model), base)


# ---------------------------------------------------------------------------------------------------
# Settings that reduce nothing are bit-identical


@pytest.mark.parametrize(
    "settings",
    [
        {"ratio": 0.0},
        {"start": 0.3, "stop": 0.3},
        {"method": "downsample", "downsample_factor": 1},
        {"level_ratios": {1: 0.0}},
        {"min_tokens": 10_000},
        {"start": 0.9},  # timestep 500 is progress 0.5: before the schedule starts
    ],
)
@torch.no_grad()
def test_settings_that_reduce_nothing_are_bit_identical(settings: dict[str, Any]) -> None:
    model = tiny_sd_unet()
    base = _call_unet(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reducing nothing on purpose is not warned about
        with tomediff.tome(model, **settings):
            assert torch.equal(_call_unet(model), base)


# ---------------------------------------------------------------------------------------------------
# Downsampling (ToDo)


def test_downsample_grid_modes_against_hand_references() -> None:
    x = torch.arange(2 * 5 * 3 * 4, dtype=torch.float32).view(2, 15, 4)  # a 5x3 grid
    grid = x.view(2, 5, 3, 4)
    nearest = downsample_grid(x, 5, 3, 2, "nearest")
    assert torch.equal(nearest, grid[:, ::2, ::2].reshape(2, 6, 4))
    avg = downsample_grid(x, 5, 3, 2, "avg").view(2, 3, 2, 4)
    for i in range(3):
        for j in range(2):
            window = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # border windows are partial
            torch.testing.assert_close(avg[:, i, j], window.mean(dim=(1, 2)))
    assert downsample_grid(x, 5, 3, 2, "bilinear").shape == (2, 6, 4)
    assert downsample_grid(x, 5, 3, 1, "avg") is x


@torch.no_grad()
def test_downsample_keeps_every_query_and_never_unmerges() -> None:
    model = tiny_sd_unet()
    attn1 = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    handle = tomediff.apply_tome(model, method="downsample", downsample_factor=2)
    # no post-hook: nothing is unmerged
    assert not any(isinstance(h, ToMeHook) for h in attn1._forward_hooks.values())
    seen: list[tuple[int, int, int]] = []

    def spy(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
        queries = (args[0] if args else kwargs["hidden_states"]).shape[1]
        seen.append((queries, kwargs["encoder_hidden_states"].shape[1], output.shape[1]))

    attn1.register_forward_hook(spy, with_kwargs=True)
    _call_unet(model)
    assert seen == [(1024, 256, 1024)]  # 32x32 queries and outputs, 16x16 keys/values
    stats = handle.report().blocks[0].last_call
    assert stats is not None and (stats.tokens, stats.tokens_after_merge) == (1024, 256)


@pytest.mark.parametrize("mode", ["nearest", "avg", "bilinear"])
@torch.no_grad()
def test_downsample_equals_attention_over_a_downsampled_grid_by_hand(mode: str) -> None:
    model = tiny_sd_unet()
    blocks = [
        model.down_blocks[0].attentions[0].transformer_blocks[0],
        *(a.transformer_blocks[0] for a in model.up_blocks[1].attentions),
    ]

    def by_hand(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return (x,), {**kwargs, "encoder_hidden_states": downsample_grid(x, 32, 32, 2, mode)}  # type: ignore[arg-type]

    handles = [b.attn1.register_forward_pre_hook(by_hand, with_kwargs=True) for b in blocks]
    reference = _call_unet(model)
    for h in handles:
        h.remove()
    with tomediff.tome(model, method="downsample", downsample_mode=mode):
        assert torch.equal(_call_unet(model), reference)


@torch.no_grad()
def test_downsample_second_factor_reaches_the_next_level() -> None:
    model = tiny_sd_unet_3level()
    handle = tomediff.apply_tome(model, method="downsample", downsample_factor=2, downsample_factor_next=2)
    _call_unet(model)
    counts = {
        (b.downsample, b.last_call.tokens, b.last_call.tokens_after_merge)
        for b in handle.report().blocks
        if b.last_call is not None
    }
    assert counts == {(1, 1024, 256), (2, 256, 64)}
    assert handle.state.max_downsample == 2


def test_downsample_on_ldm_passes_context_keyword() -> None:
    model = _seeded_ldm()
    attn1 = model.model.diffusion_model.input_blocks[0][0].transformer_blocks[0].attn1
    tomediff.apply_tome(model, method="downsample")
    seen: list[int] = []  # registered after the patch: sees what the attention receives
    attn1.register_forward_pre_hook(lambda m, a, k: seen.append(k["context"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        _call_ldm(model)
    assert seen == [64]


# ---------------------------------------------------------------------------------------------------
# Plan reuse


def _count_matchings(handle: tomediff.ToMeHandle) -> list[int]:
    """Wraps the matching reducer under the reuse wrapper; returns the per-call list it appends to."""
    reducer = handle.state.method.reducer
    inner = getattr(reducer, "inner", reducer)
    made: list[int] = []
    original = inner.plan

    def counting(state: Any, request: Any) -> Any:
        made.append(state.calls)
        return original(state, request)

    inner.plan = counting  # type: ignore[method-assign]
    return made


@torch.no_grad()
def test_reuse_steps_recomputes_exactly_every_k_calls_within_a_generation() -> None:
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, reuse_steps=3)
    made = _count_matchings(handle)
    events: list[PlanEvent] = []
    handle.watch(events.append)
    for t in (900, 800, 700, 600, 500, 400, 300):
        _call_unet(model, timestep=t)
    blocks = 3  # one level-1 block going down, two coming up
    assert made == [c for c in (1, 4, 7) for _ in range(blocks)]
    by_block = {}
    for e in events:
        by_block.setdefault(e.block, []).append(e.plan)
    for plans in by_block.values():
        assert plans[0] is plans[1] is plans[2] and plans[3] is not plans[2] and plans[6] is not plans[5]
    # a new generation (the timestep goes up) never reuses the previous one's plans
    _call_unet(model, timestep=900)
    assert made[-blocks:] == [8] * blocks


@torch.no_grad()
def test_reuse_level_shares_one_plan_across_a_levels_blocks() -> None:
    model = tiny_sd_unet_3level()
    handle = tomediff.apply_tome(model, reuse_level=True, level_ratios={1: 0.5, 2: 0.5})
    made = _count_matchings(handle)
    events: list[PlanEvent] = []
    handle.watch(events.append)
    _call_unet(model)
    assert made == [1, 1]  # one matching per level
    plans_by_grid: dict[tuple[int, int], set[int]] = {}
    for e in events:
        plans_by_grid.setdefault((e.height, e.width), set()).add(id(e.plan))
    assert set(plans_by_grid) == {(32, 32), (16, 16)} and all(len(ids) == 1 for ids in plans_by_grid.values())


@torch.no_grad()
def test_reuse_cfg_plans_on_the_conditional_half_for_both() -> None:
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, reuse_cfg=True, cfg_layout="uncond_cond", use_rand=False)
    events: list[PlanEvent] = []
    handle.watch(events.append)
    inputs: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[..., None]:
        return lambda module, args: inputs.setdefault(name, args[0].detach().clone())

    captures = [
        model.get_submodule(block.name).register_forward_pre_hook(capture(block.name))
        for block in handle.report().blocks
    ]
    _call_unet(model, batch=4)
    for hook in captures:
        hook.remove()
    event = events[0]
    slots = event.plan.local_slot
    assert torch.equal(slots[:2], slots[2:])
    # ... and that grouping is the conditional half's own matching (planned here on the same block
    # input; a separate batch-2 model call would round the input differently and move near-ties).
    offsets = torch.zeros(event.height // 2, event.width // 2, dtype=torch.long)  # use_rand off: top-left
    partition = grid_partition(event.height, event.width, 2, 2, offsets)
    alone = plan_merge(inputs[event.block][2:], partition, event.plan.num_tokens - event.plan.num_merged)
    assert alone is not None and torch.equal(alone.local_slot, slots[2:])


def test_reuse_steps_under_compile_says_why_not() -> None:
    model = tiny_sd_unet()
    tomediff.apply_tome(model, reuse_steps=2, use_rand=False)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with pytest.raises(Exception, match="reuse_steps=2 keeps plans between model calls"), torch.no_grad():
        _call_unet(compiled)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# Step schedule inside a real pipeline call


def _tiny_pipeline(unet: nn.Module) -> diffusers.StableDiffusionPipeline:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: diffusers.StableDiffusionPipeline, steps: int = 10) -> torch.Tensor:
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    return pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        num_inference_steps=steps,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize(
    ("start", "stop", "active"), [(0.0, 0.5, [1, 2, 3, 4, 5]), (0.5, 1.0, [6, 7, 8, 9, 10])]
)
def test_schedule_switches_at_the_right_steps_inside_a_pipeline_call(
    start: float, stop: float, active: list[int]
) -> None:
    pipe = _tiny_pipeline(tiny_sd_unet())
    handle = tomediff.apply_tome(pipe, start=start, stop=stop)
    calls: list[int] = []
    handle.watch(lambda e: calls.append(e.call))
    _generate(pipe)  # DDIM, 10 steps: timesteps 901, 801, ..., 1, progress 1 - t/1000
    assert sorted(set(calls)) == active
    assert handle.state.calls == 10


@pytest.mark.parametrize(("start", "stop", "merges"), [(0.0, 1.0, True), (0.2, 1.0, True), (0.0, 0.5, False)])
def test_a_schedule_that_stops_at_one_merges_the_final_step(start: float, stop: float, merges: bool) -> None:
    """DDIM without a step offset ends at t = 0 (progress 1): ``stop=1`` closes the range, so (0.2, 1)
    merges that step exactly as the unscheduled (0, 1) does; a stop below 1 stays open."""
    pipe = _tiny_pipeline(tiny_sd_unet())
    pipe.scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=0, clip_sample=False)
    handle = tomediff.apply_tome(pipe, start=start, stop=stop, use_rand=False)
    calls: list[int] = []
    handle.watch(lambda e: calls.append(e.call))
    timesteps: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: timesteps.append(int(a[1])))
    _generate(pipe, steps=5)  # timesteps 800, 600, 400, 200, 0
    assert timesteps[-1] == 0
    assert (5 in calls) == merges
    assert handle.state.selection.active_at(1.0) == merges


def test_schedule_without_a_timestep_says_so() -> None:
    model = tiny_sd_unet()
    tomediff.apply_tome(model, stop=0.5)
    sample, _, context = unet_inputs()
    with pytest.raises(tomediff.MergeCallError, match="need the timestep"):
        model(sample, None, context)


def test_reuse_steps_inside_a_pipeline_call() -> None:
    pipe = _tiny_pipeline(tiny_sd_unet())
    handle = tomediff.apply_tome(pipe, reuse_steps=4)
    made = _count_matchings(handle)
    _generate(pipe, steps=10)
    assert sorted(set(made)) == [1, 5, 9]
    _generate(pipe, steps=10)  # the second generation plans afresh at its first step
    assert sorted(set(made))[3:] == [11, 15, 19]


# ---------------------------------------------------------------------------------------------------
# Per-level ratios and the minimum token count


@torch.no_grad()
def test_level_ratios_give_each_level_its_token_count_in_the_report() -> None:
    model = tiny_sd_unet_3level()
    handle = tomediff.apply_tome(model, level_ratios={1: 0.5, 2: 0.25})
    _call_unet(model)
    report = handle.report()
    rows = {(b.downsample, b.last_call.tokens, b.last_call.tokens_after_merge) for b in report.blocks}
    assert rows == {(1, 1024, 512), (2, 256, 192)}
    assert "level_ratios={1: 0.5, 2: 0.25}" in str(report)
    assert all(b.downsample in (1, 2) for b in report.blocks)  # level 4 (mid block) is not patched


@torch.no_grad()
def test_min_tokens_leaves_small_grids_alone() -> None:
    model = tiny_sd_unet_3level()
    handle = tomediff.apply_tome(model, max_downsample=2, min_tokens=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call_unet(model)
    rows = {
        (b.downsample, b.last_call.tokens, b.last_call.tokens_after_merge) for b in handle.report().blocks
    }
    assert rows == {(1, 1024, 512), (2, 256, 256)}
    assert "min_tokens=300" in str(handle.report())


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "todo"}, "method must be one of 'merge', 'downsample', 'cache', got 'todo'"),
        ({"method": "downsample", "downsample_mode": "cubic"}, "downsample_mode must be one of"),
        ({"method": "downsample", "merge_mlp": True}, "reduces the keys and values of self-attention only"),
        ({"method": "downsample", "reuse_steps": 2}, "reuse_steps apply to method='merge' only"),
        ({"downsample_factor": 0}, "downsample_factor must be a positive integer, got 0"),
        ({"level_ratios": {3: 0.5}}, "level_ratios key 3 must be a power of two"),
        ({"level_ratios": {1: 0.9}}, r"level_ratios\[1\]=0.9 is outside \[0, 0.75\]"),
        ({"level_ratios": {1: 0.5}, "max_downsample": 2}, "leave max_downsample=None"),
        ({"level_ratios": {1: 0.5}, "ratio": 0.3}, "leave ratio at its default"),
        ({"level_ratios": {}}, "level_ratios is empty"),
        ({"level_ratios": [1, 2]}, "level_ratios must map levels to ratios"),
        ({"min_tokens": -1}, "min_tokens must be 0"),
        ({"reuse_steps": 0}, "reuse_steps must be a positive integer, got 0"),
        ({"reuse_cfg": "yes"}, "reuse_cfg must be True or False"),
        ({"start": 0.6, "stop": 0.4}, "start=0.6 and stop=0.4 must satisfy 0 <= start <= stop <= 1"),
        ({"stop": float("nan")}, "must satisfy 0 <= start <= stop <= 1"),
    ],
)
def test_bad_method_settings_name_the_value_and_the_fix(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(tomediff.ConfigError, match=message):
        tomediff.ToMeConfig(**settings)


def test_level_ratios_select_levels_the_model_has() -> None:
    with pytest.raises(tomediff.NothingToPatchError, match=r"level_ratios=\{8: 0.5\} selects none"):
        tomediff.apply_tome(tiny_sd_unet(), level_ratios={8: 0.5})


def test_apply_reducer_refuses_a_non_reducer() -> None:
    with pytest.raises(
        tomediff.UnknownOptionError, match=r"reducer must be a tomediff\.core\.reducers\.Reducer"
    ):
        tomediff.apply_reducer(tiny_sd_unet(), object())  # type: ignore[arg-type]


def test_config_round_trips_new_fields() -> None:
    cfg = tomediff.ToMeConfig(level_ratios={2: 0.3, 1: 0.6}, reuse_steps=2, start=0.1)
    assert cfg.level_ratios == ((1, 0.6), (2, 0.3))
    assert cfg.replace(min_tokens=5).level_ratios == cfg.level_ratios
    assert hash(cfg) == hash(tomediff.ToMeConfig(level_ratios={1: 0.6, 2: 0.3}, reuse_steps=2, start=0.1))


# ---------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "downsample"},
        {"reuse_level": True, "use_rand": False},
        {"reuse_cfg": True, "cfg_layout": "uncond_cond", "use_rand": False},
    ],
)
def test_methods_compile_without_graph_breaks(settings: dict[str, Any]) -> None:
    from torch._dynamo.utils import counters

    model = tiny_sd_unet()
    with torch.no_grad():
        eager_base = _call_unet(model)
        tomediff.apply_tome(model, **settings)
        eager = _call_unet(model)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager")
        out = _call_unet(compiled)
        out_again = _call_unet(compiled, timestep=300)
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    assert not breaks, breaks
    assert torch.equal(out, eager) and not torch.equal(out, eager_base) and torch.isfinite(out_again).all()


def test_schedule_compiles_with_one_break_before_the_blocks() -> None:
    """The timestep is read eagerly before the first block (like the random draw); the compiled model
    switches on and off with the schedule exactly as the eager one does."""
    from torch._dynamo.utils import counters

    model = tiny_sd_unet()
    timesteps = (900, 300, 800)
    with torch.no_grad():
        unpatched = [_call_unet(model, timestep=t) for t in timesteps]
        tomediff.apply_tome(model, start=0.0, stop=0.5, use_rand=False)
        eager = [_call_unet(model, timestep=t) for t in timesteps]
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager")
        outs = [_call_unet(compiled, timestep=t) for t in timesteps]
    breaks = list(counters["graph_break"])
    torch._dynamo.reset()
    assert breaks and all("ToMeState._begin" in reason for reason in breaks)
    assert all(torch.equal(a, b) for a, b in zip(eager, outs, strict=True))
    # progress 0.1 and 0.2 merge; progress 0.7 runs unpatched
    assert [torch.equal(a, b) for a, b in zip(outs, unpatched, strict=True)] == [False, True, False]


@torch.no_grad()
def test_reuse_steps_never_hands_one_images_plan_to_another_at_the_same_timestep() -> None:
    """A one-step model called at one timestep image after image, and the two halves of a guidance
    step run as two calls: each call at a repeated timestep plans for its own input."""
    model = tiny_sd_unet()
    tomediff.apply_tome(model, reuse_steps=2, use_rand=False)
    first, _, context_a = unet_inputs(seed=1)
    second, _, context_b = unet_inputs(seed=2)
    t = torch.tensor(999)
    model(first, t, context_a)
    reused = model(second, t, context_b).sample
    fresh_model = tiny_sd_unet()
    tomediff.apply_tome(fresh_model, reuse_steps=2, use_rand=False)
    assert torch.equal(reused, fresh_model(second, t, context_b).sample)


@torch.no_grad()
def test_reuse_steps_keeps_a_plan_per_half_when_guidance_runs_as_two_calls() -> None:
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, reuse_steps=2, use_rand=False)
    made = _count_matchings(handle)
    events: list[PlanEvent] = []
    handle.watch(events.append)
    cond, _, context = unet_inputs(batch=1, seed=1)
    uncond = cond.flip(-1)
    for t in (900, 800, 700):
        model(cond, torch.tensor(t), context)  # conditional half
        model(uncond, torch.tensor(t), context * 0)  # unconditional half
    assert sorted(set(made)) == [1, 2, 5, 6]  # steps 1 and 3 match, step 2 reuses
    block = events[0].block
    plans = [e.plan for e in events if e.block == block]
    assert plans[2] is plans[0] and plans[3] is plans[1] and plans[1] is not plans[0]


def test_apply_reducer_applies_the_configs_plan_reuse_to_the_given_reducer() -> None:
    from tomediff.core.reducers import MatchReducer

    made: list[int] = []

    class Counting(MatchReducer):
        def plan(self, state: Any, request: Any) -> Any:
            made.append(state.calls)
            return super().plan(state, request)

    config = tomediff.ToMeConfig(reuse_steps=5, reuse_level=True)
    model = tiny_sd_unet()
    tomediff.apply_reducer(model, Counting(config), config)
    with torch.no_grad():
        for t in (900, 800, 700, 600, 500):
            _call_unet(model, timestep=t)
    assert made == [1]  # one matching for the level, kept for 5 steps


def test_downsample_refuses_a_cross_attention_only_block_before_patching() -> None:
    model = tiny_sd_unet(only_cross_attention=True)
    with pytest.raises(tomediff.ConfigError, match="only_cross_attention=True"):
        tomediff.apply_tome(model, method="downsample")
    assert _hook_count(model) == 0
    tomediff.apply_tome(model, method="merge")  # merging queries still works there
    with torch.no_grad():
        assert torch.isfinite(_call_unet(model)).all()


def test_a_reducer_returning_something_else_than_a_plan_is_named() -> None:
    from tomediff.core.reducers import Reducer

    class Broken(Reducer):
        def plan(self, state: Any, request: Any) -> Any:
            return "not a plan"

    model = tiny_sd_unet()
    tomediff.apply_reducer(model, Broken())
    with pytest.raises(tomediff.MergeCallError, match=r"Broken\.plan returned a str"), torch.no_grad():
        _call_unet(model)


@torch.no_grad()
def test_downsample_report_says_it_counts_keys_and_values() -> None:
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, method="downsample")
    _call_unet(model)
    assert "key/value tokens removed over the last call: 0.750 (every query is kept" in str(handle.report())
