"""tomediff stacked with each of diffusers' caches, group offloading and layerwise casting (diffusers
0.42): applied in both orders, each removed alone, on tiny random-weight pipelines.

For every stack: tomediff then the feature, and the feature then tomediff, give the same outputs;
removing tomediff leaves the feature's own outputs bit-exact, removing (disabling) the feature leaves
tomediff's own outputs bit-exact, and with both removed the unpatched outputs come back.

Caches that keep an attention module's output across steps (Pyramid Attention Broadcast, FasterCache,
TaylorSeer) are checked against their own rule: at the steps they skip, the attention's output (as the
block sees it) is exactly what the cache's rule makes of the outputs of the steps it computed, which
tomediff computed with fewer tokens. tomediff reduces such an attention inside the module, at its
attention call, so those outputs keep the full token order (see ``tomediff.adapters.diffusers_caches``).
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from test_dit_families import WAN_TEXT, tiny_wan
from test_dit_models import flux_pipeline, tome_hooks

diffusers = pytest.importorskip("diffusers")
hooks = pytest.importorskip("diffusers.hooks")

STEPS = 4  # flux_pipeline's


def counter(module: nn.Module) -> list[int]:
    """How many times ``module`` ran (a pre-hook; a cache that skips its parent never calls it)."""
    count = [0]
    module.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count


def diffusers_hooks(model: nn.Module) -> int:
    return sum(len(getattr(getattr(m, "_diffusers_hook", None), "hooks", {})) for m in model.modules())


@dataclass(frozen=True)
class Cache:
    """One diffusers cache on the tiny Flux pipeline: its config (given the pipeline), and which
    module it skips, so a test can see that it did."""

    config: Callable[[Any], Any]
    skipped: Callable[[nn.Module], nn.Module]


def _first_attention_projection(model: nn.Module) -> nn.Module:
    return model.transformer_blocks[0].attn.to_q  # runs only when the attention computes


def _last_block_attention(model: nn.Module) -> nn.Module:
    return model.single_transformer_blocks[-1].attn  # runs only when the block stack computes


CACHES = {
    "pyramid_attention_broadcast": Cache(
        lambda pipe: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
        _first_attention_projection,
    ),
    "faster_cache": Cache(
        lambda pipe: hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 999),  # the first step (t=1000) computes
            current_timestep_callback=lambda: pipe.current_timestep,
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,
        ),
        _first_attention_projection,
    ),
    "taylorseer_cache": Cache(
        lambda pipe: hooks.TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
        ),
        _first_attention_projection,
    ),
    "first_block_cache": Cache(
        lambda pipe: hooks.FirstBlockCacheConfig(threshold=10.0), _last_block_attention
    ),
    # mag_ratios of 1 and no retention: every step after the first two reuses the residual.
    "mag_cache": Cache(
        lambda pipe: hooks.MagCacheConfig(
            mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, retention_ratio=0.0
        ),
        _last_block_attention,
    ),
}


def remove_alone(
    removed_first: str,
    handle: tomediff.ToMeHandle,
    disable: Callable[[], None],
    run: Callable[[], torch.Tensor],
    cached: torch.Tensor,
    merged: torch.Tensor,
) -> None:
    """Removes tomediff (``removed_first="tome"``) or the cache first, checks that what is left gives its
    own outputs (``cached`` or ``merged``) bit-exactly, then removes the other."""
    if removed_first == "tome":
        handle.remove()
        assert torch.equal(run(), cached)  # the cache's own outputs
        disable()
    else:
        disable()
        assert torch.equal(run(), merged)  # tomediff's own outputs
        handle.remove()


def stack_both_ways(
    pipe: Any,
    generate: Callable[[], torch.Tensor],
    enable: Callable[[], None],
    disable: Callable[[], None],
    skipped: nn.Module,
    removed_first: str,
    calls: int = STEPS,
) -> None:
    """The checks every stack gets (see the module docstring); ``skipped`` runs only at the steps the
    cache computes, ``calls`` is how many model calls a generation makes."""
    model = pipe.transformer

    def patch() -> tomediff.ToMeHandle:
        return tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)

    with torch.no_grad():
        plain = generate()
        enable()
        cached = generate()
        disable()
        handle = patch()
        merged = generate()
        handle.remove()
        ran = counter(skipped)
        stacked = []
        for tome_first in (True, False):
            if tome_first:
                handle = patch()
                enable()
            else:
                enable()
                handle = patch()
            ran[0] = 0
            stacked.append(generate())
            assert 0 < ran[0] < calls  # the cache skipped some steps' computation
            report = handle.report()
            assert report.calls == calls and report.effective_ratio == 0.5  # tomediff reduced every call
            remove_alone(removed_first, handle, disable, generate, cached, merged)
            assert torch.equal(generate(), plain)
            assert tome_hooks(model) == 0 and diffusers_hooks(model) == 0
    both = stacked[0]
    assert torch.equal(both, stacked[1])  # the order they were applied in does not matter
    assert torch.isfinite(both).all() and not torch.equal(both, cached) and not torch.equal(both, merged)


@pytest.mark.parametrize("removed_first", ["tome", "cache"])
@pytest.mark.parametrize("name", sorted(CACHES))
def test_cache_and_tome_stack_in_both_orders_and_remove_alone(name: str, removed_first: str) -> None:
    cache = CACHES[name]
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    stack_both_ways(
        pipe,
        generate,
        lambda: model.enable_cache(cache.config(pipe)),
        model.disable_cache,
        cache.skipped(model),
        removed_first,
    )


def _recorded_attention_outputs(name: str, tome_first: bool) -> tuple[list[torch.Tensor], list[int]]:
    """The image-token output of the first block's attention at each step, as the block receives it,
    with tomediff and cache ``name`` stacked; and the steps at which the attention computed."""
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    attn = model.transformer_blocks[0].attn
    if tome_first:
        tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
        model.enable_cache(CACHES[name].config(pipe))
    else:
        model.enable_cache(CACHES[name].config(pipe))
        tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
    outputs: list[torch.Tensor] = []
    computed: list[int] = []
    # Registered last: runs after tomediff's hooks, so it sees what the block gets.
    attn.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    attn.to_q.register_forward_pre_hook(lambda m, a: computed.append(len(outputs)))
    with torch.no_grad():
        generate()
    assert len(outputs) == STEPS
    return outputs, computed


@pytest.mark.parametrize("tome_first", [True, False], ids=["tome-then-cache", "cache-then-tome"])
def test_pyramid_attention_broadcast_replays_the_full_order_output_of_its_last_computed_step(
    tome_first: bool,
) -> None:
    outputs, computed = _recorded_attention_outputs("pyramid_attention_broadcast", tome_first)
    assert computed == [0, 2]
    # A step it skips gets the previous step's output: the very tensor, tokens in their places.
    assert outputs[1] is outputs[0] and outputs[3] is outputs[2]
    assert not torch.equal(outputs[2], outputs[0])


@pytest.mark.parametrize("tome_first", [True, False], ids=["tome-then-cache", "cache-then-tome"])
def test_faster_cache_extrapolates_from_full_order_outputs(tome_first: bool) -> None:
    outputs, computed = _recorded_attention_outputs("faster_cache", tome_first)
    assert computed == [0, 2]
    # FasterCache's rule at a skipped step i: o[i-1] + (o[i-1] - o[i-2]) * weight, from the last two
    # outputs it saw (the first one twice at step 1).
    for step in (1, 3):
        last, before = outputs[step - 1], outputs[max(step - 2, 0)]
        assert torch.equal(outputs[step], last + (last - before) * 0.5)


@pytest.mark.parametrize("tome_first", [True, False], ids=["tome-then-cache", "cache-then-tome"])
def test_taylorseer_forecasts_from_full_order_outputs(tome_first: bool) -> None:
    outputs, computed = _recorded_attention_outputs("taylorseer_cache", tome_first)
    assert computed == [0, 2]
    # First order Taylor forecast one step on from the computed steps' outputs.
    assert torch.equal(outputs[1], torch.zeros_like(outputs[0]) + outputs[0] * 1.0)
    slope = (outputs[2] - outputs[0]) / 2
    assert torch.equal(outputs[3], torch.zeros_like(outputs[2]) + outputs[2] * 1.0 + slope * 1.0)


def test_mag_cache_calibration_run_with_tome_then_its_ratios() -> None:
    """Calibration never skips: with tomediff it gives tomediff's own outputs, and the ratios it prints
    (of the stack) drive the cache afterwards."""
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    with torch.no_grad():
        handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
        merged = generate()
        model.enable_cache(hooks.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert torch.equal(generate(), merged)
        model.disable_cache()
        ratios = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
        assert len(ratios) == STEPS and ratios[0] == 1.0
        ran = counter(_last_block_attention(model))
        config = hooks.MagCacheConfig(
            mag_ratios=ratios, num_inference_steps=STEPS, threshold=10.0, retention_ratio=0.0
        )
        model.enable_cache(config)
        both = generate()
        assert 0 < ran[0] < STEPS and torch.isfinite(both).all()
        model.disable_cache()
        assert torch.equal(generate(), merged)
        handle.remove()
    assert tome_hooks(model) == 0


def wan_pipeline() -> tuple[Any, Callable[[], torch.Tensor]]:
    """A tiny ``WanPipeline`` (text-to-video: SeaCache's built-in Wan adapter), guidance as two calls."""
    pipe = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan(in_channels=16, out_channels=16),
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(2, 1, WAN_TEXT, 16, generator=gen)

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=32,
            width=48,
            num_frames=9,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames

    return pipe, generate


@pytest.mark.parametrize("removed_first", ["tome", "cache"])
def test_sea_cache_and_tome_stack_on_wan(removed_first: str) -> None:
    pipe, generate = wan_pipeline()
    model = pipe.transformer
    config = hooks.SeaCacheConfig(threshold=10.0, retention_steps=1, cache_end_steps=0)
    stack_both_ways(
        pipe,
        generate,
        lambda: model.enable_cache(config),
        model.disable_cache,
        model.blocks[-1].attn1,  # runs only when the block stack computes
        removed_first,
        calls=2 * STEPS,  # guidance as two calls a step
    )


def _remove_group_offloading(model: nn.Module) -> None:
    """diffusers 0.42 has no public way to undo group offloading; this removes its hooks by their
    names, as diffusers does itself before re-applying it. The weights stay where they are (here
    offloaded to and onloaded on the CPU, so they never move)."""
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    registry = model._diffusers_hook
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_and_tome_stack_in_both_orders_and_remove_alone(offload_type: str) -> None:
    """Offloading moves weights and never changes a value: stacked, the outputs are tomediff's own."""
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    cpu = torch.device("cpu")

    def offload() -> None:
        kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        model.enable_group_offload(cpu, offload_device=cpu, offload_type=offload_type, **kwargs)

    with torch.no_grad():
        plain = generate()
        handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
        merged = generate()
        handle.remove()
        for tome_first, removed_first in ((True, "tome"), (False, "offloading")):
            if tome_first:
                handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
                offload()
            else:
                offload()
                handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
            assert torch.equal(generate(), merged)
            # Offloading alone gives the plain outputs.
            remove_alone(
                removed_first, handle, lambda: _remove_group_offloading(model), generate, plain, merged
            )
            assert torch.equal(generate(), plain)
            assert tome_hooks(model) == 0 and diffusers_hooks(model) == 0


def test_layerwise_casting_and_tome_stack_in_both_orders() -> None:
    """Weights stored in float8, computed in float32: stacked in either order the outputs are the same,
    and removing tomediff leaves the cast model's own outputs. diffusers cannot undo the casting (the
    weights were rounded to float8 in place), so there is no removal of it to test."""
    stacked = []
    for tome_first in (True, False):
        pipe, generate = flux_pipeline()
        model = pipe.transformer

        def cast(model: nn.Module = model) -> None:
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)

        with torch.no_grad():
            plain = generate()
            if tome_first:
                handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
                cast()
            else:
                cast()
                cast_alone = generate()
                handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
            stacked.append(generate())
            assert handle.report().effective_ratio == 0.5
            handle.remove()
            if tome_first:
                cast_alone = generate()
            else:
                assert torch.equal(generate(), cast_alone)
        assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        assert not torch.equal(cast_alone, plain) and tome_hooks(model) == 0
    assert torch.equal(stacked[0], stacked[1])
    assert torch.isfinite(stacked[0]).all() and not torch.equal(stacked[0], cast_alone)


@pytest.mark.parametrize("removed_first", ["tome", "cache"])
def test_text_kv_cache_and_tome_stack_on_nucleus_moe(removed_first: str) -> None:
    """TextKVCache computes NucleusMoE-Image's text keys/values once per prompt (exactly: its outputs equal
    the unpatched model's), and the attention call then takes ``[image, cached text]`` keys: the image
    queries and keys are reduced there as without the cache. Both orders, each removed alone."""
    from family_support import call_shapes, family_run
    from tiny_recent_families import nucleusmoe_image_inputs, tiny_nucleusmoe_image

    nucleus = tiny_nucleusmoe_image()
    inputs = nucleusmoe_image_inputs(2, (1, 3, 4))

    def run() -> torch.Tensor:
        return family_run(nucleus, inputs)[0]

    def patch() -> tomediff.ToMeHandle:
        return tomediff.apply_tome(nucleus, ratio=0.5, use_rand=False)

    plain = run()
    nucleus.enable_cache(hooks.TextKVCacheConfig())
    cached = run()
    nucleus.disable_cache()
    handle = patch()
    merged = run()
    handle.remove()
    assert torch.equal(cached, plain) and not torch.equal(merged, plain)
    for tome_first in (True, False):
        if tome_first:
            handle = patch()
            nucleus.enable_cache(hooks.TextKVCacheConfig())
        else:
            nucleus.enable_cache(hooks.TextKVCacheConfig())
            handle = patch()
        for _ in range(2):  # the first call fills the text cache, the second uses it
            out, spy = family_run(nucleus, inputs)
            assert call_shapes(spy) == [(6, 11)] * 2  # 12 image queries and keys merged to 6; 5 text keys
            assert torch.equal(out, merged)
        remove_alone(removed_first, handle, nucleus.disable_cache, run, cached, merged)
        assert torch.equal(run(), plain)
        assert tome_hooks(nucleus) == 0 and diffusers_hooks(nucleus) == 0


def test_text_kv_cache_stacks_as_a_no_op_outside_nucleus_moe() -> None:
    """Outside NucleusMoE-Image the cache only hooks the model's forward, which composes with tomediff in
    both orders and is removed alone."""
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    with torch.no_grad():
        plain = generate()
        handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
        merged = generate()
        handle.remove()
        for tome_first in (True, False):
            if tome_first:
                handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
                model.enable_cache(hooks.TextKVCacheConfig())
            else:
                model.enable_cache(hooks.TextKVCacheConfig())
                handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
            assert torch.equal(generate(), merged)
            remove_alone(
                "tome" if tome_first else "cache", handle, model.disable_cache, generate, plain, merged
            )
            assert torch.equal(generate(), plain) and tome_hooks(model) == 0


@pytest.mark.parametrize("tome_first", [True, False], ids=["tome-then-cache", "cache-then-tome"])
def test_a_cache_kept_feed_forward_output_is_refused(tome_first: bool) -> None:
    """A feed-forward has no attention call to reduce inside: merged (``merge_mlp``) while a cache
    keeps its output, its kept output would be in an earlier step's merged order. Refused, naming the
    cache, the module and the ways out; without ``merge_mlp`` the same stack runs."""
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    config = hooks.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, cache_identifiers=[r"transformer_blocks\.0\.ff"]
    )
    names = r"diffusers' TaylorSeer cache keeps the output of 'transformer_blocks\.0\.ff'.*disable_cache\(\)"
    if tome_first:
        handle = tomediff.apply_tome(pipe, ratio=0.5, merge_mlp=True)
        model.enable_cache(config)
        with pytest.raises(tomediff.MergeCallError, match=names), torch.no_grad():
            generate()
        handle.remove()
    else:
        model.enable_cache(config)
        with pytest.raises(tomediff.ConflictingPatchError, match=names):
            tomediff.apply_tome(pipe, ratio=0.5, merge_mlp=True)
    assert tome_hooks(model) == 0  # refused before anything was hooked, or removed
    handle = tomediff.apply_tome(pipe, ratio=0.5)
    with torch.no_grad():
        assert torch.isfinite(generate()).all()
    assert handle.report().effective_ratio == 0.5


def test_a_step_whose_attention_a_cache_skips_makes_no_plan() -> None:
    """Reduced inside the attention, a block's plan is made at its first attention call: at a step where
    Pyramid Attention Broadcast returns the kept output, that block makes no matching."""
    pipe, generate = flux_pipeline()
    model = pipe.transformer
    handle = tomediff.apply_tome(pipe, ratio=0.5, use_rand=False)
    model.enable_cache(CACHES["pyramid_attention_broadcast"].config(pipe))
    reducer = handle.state.method.reducer
    planned: list[str] = []
    plan = reducer.plan

    def counting_plan(state: Any, request: Any) -> Any:
        planned.append(request.block_name)
        return plan(state, request)

    reducer.plan = counting_plan  # type: ignore[method-assign]
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    computed = [counter(block.attn.to_q) for block in blocks]
    with torch.no_grad():
        generate()
    assert [count[0] for count in computed] == [2] * len(blocks)  # steps 0 and 2 of 4
    assert len(planned) == 2 * len(blocks)  # one matching per block and computed step
    assert handle.report().calls == STEPS


@pytest.mark.parametrize("removed_first", ["tome", "cache"])
def test_pyramid_attention_broadcast_stacks_with_an_attention_call_site_on_wan(removed_first: str) -> None:
    """Wan's self-attention is reduced at its attention call anyway: its output is in full token order,
    and at a skipped step the call site sees no attention call and no projection, which is no error."""
    pipe, generate = wan_pipeline()
    model = pipe.transformer
    config = hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    )
    stack_both_ways(
        pipe,
        generate,
        lambda: model.enable_cache(config),
        model.disable_cache,
        model.blocks[0].attn1.to_q,
        removed_first,
        calls=2 * STEPS,
    )


def test_wan_refuses_a_cache_on_its_merged_feed_forward() -> None:
    model = tiny_wan()
    config = hooks.TaylorSeerCacheConfig(cache_interval=2, cache_identifiers=[r"blocks\.1\.ffn"])
    hooks.apply_taylorseer_cache(model, config)
    with pytest.raises(
        tomediff.ConflictingPatchError, match=r"TaylorSeer cache keeps the output of 'blocks\.1\.ffn'"
    ):
        tomediff.apply_tome(model, ratio=0.5, merge_mlp=True)
    assert tome_hooks(model) == 0
