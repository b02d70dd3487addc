"""Plans never cross generations (``reuse_steps``) and never cross images (``reuse_cfg``): where a
generation starts and whether a batch is a guidance pair come from the patched pipeline, or are said
explicitly for a model patched on its own, never guessed."""

from __future__ import annotations

import gc
import pickle
import threading
from typing import Any

import diffusers
import pytest
import torch
from torch import nn

import tomediff
from conftest import tiny_sd_unet, unet_inputs
from test_methods import _tiny_pipeline
from tomediff.core import PlanEvent
from tomediff.ops import grid_partition, plan_merge

# ---------------------------------------------------------------------------------------------------
# reuse_steps: where a generation starts


def _unet_call(model: nn.Module, seed: int, timestep: int) -> torch.Tensor:
    sample, _, context = unet_inputs(seed=seed)
    return model(sample, torch.tensor(timestep), context).sample


def _fresh_patched_unet(**settings: Any) -> nn.Module:
    model = tiny_sd_unet()
    tomediff.apply_tome(model, **settings)
    return model


@pytest.mark.parametrize("mark", ["new_generation", "reseed"])
@torch.no_grad()
def test_a_marked_generation_keeps_no_plan_of_an_unfinished_one(mark: str) -> None:
    """The issue's sequence: A stops after two steps, B starts below A's last timestep. The timesteps
    alone take B for A's third step; the handle says B is a new generation, so B plans afresh."""
    settings = {"reuse_steps": 3, "use_rand": False}
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, **settings)
    _unet_call(model, seed=1, timestep=999)
    _unet_call(model, seed=1, timestep=899)
    getattr(handle, mark)()
    b = _unet_call(model, seed=2, timestep=599)
    assert torch.equal(b, _unet_call(_fresh_patched_unet(**settings), seed=2, timestep=599))


@torch.no_grad()
def test_new_generation_marks_the_calling_threads_next_call_only() -> None:
    """Two threads run A, A, mark, B in lock step: each B equals a fresh patch's (each thread's mark is
    its own: the other thread's call does not take it)."""
    settings = {"reuse_steps": 3, "use_rand": False}
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, **settings)
    barrier = threading.Barrier(2)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            with torch.no_grad():
                _unet_call(model, seed=seed, timestep=999)
                barrier.wait()
                _unet_call(model, seed=seed, timestep=899)
                barrier.wait()
                handle.new_generation()
                barrier.wait()
                results[seed] = _unet_call(model, seed=seed + 10, timestep=599)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    fresh = _fresh_patched_unet(**settings)
    for seed in (1, 2):
        assert torch.equal(results[seed], _unet_call(fresh, seed=seed + 10, timestep=599))


def _img2img(unet: nn.Module) -> diffusers.StableDiffusionImg2ImgPipeline:
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**_tiny_pipeline(unet).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img_patched(**settings: Any) -> diffusers.StableDiffusionImg2ImgPipeline:
    pipe = _img2img(tiny_sd_unet())
    tomediff.apply_tome(pipe, **settings)
    return pipe


def _edit(pipe: diffusers.StableDiffusionImg2ImgPipeline, seed: int, strength: float, **kw: Any) -> Any:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 32, 32, generator=gen)  # 4 channels: taken as latents, not encoded
    embeds = torch.randn(1, 7, 32, generator=gen)
    return pipe(
        image=latents,
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        strength=strength,
        num_inference_steps=10,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images


def test_each_pipeline_call_starts_a_generation() -> None:
    """A generation interrupted by a callback after two steps (timesteps 901, 801), then an edit at low
    strength that starts below them (301): the edit equals the same edit on a fresh patch."""
    settings = {"reuse_steps": 4, "use_rand": False}
    pipe = _img2img(tiny_sd_unet())
    attributes = set(vars(pipe))
    tomediff.apply_tome(pipe, **settings)
    assert set(vars(pipe)) == attributes  # the pipeline is only read, never wrapped
    timesteps: list[int] = []

    def interrupt(p: Any, step: int, t: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        timesteps.append(int(t))
        p._interrupt = step >= 1
        return kwargs

    _edit(pipe, seed=1, strength=1.0, callback_on_step_end=interrupt)
    assert timesteps == [901, 801]
    edit = _edit(pipe, seed=2, strength=0.4)
    assert torch.equal(edit, _edit(_img2img_patched(**settings), seed=2, strength=0.4))


def test_the_patch_holds_its_pipeline_weakly() -> None:
    """The model's hooks never keep the pipeline (and its other models) alive; once the pipeline is gone
    the model acts as one patched on its own."""
    pipe = _tiny_pipeline(tiny_sd_unet())
    handle = tomediff.apply_tome(pipe, reuse_steps=2)
    caller = handle.state.caller
    assert caller is not None and caller.generation() is pipe.scheduler.timesteps
    copied = pickle.loads(pickle.dumps(pipe.unet))  # a copy starts as a model patched on its own
    hooks = [h for m in copied.modules() for h in m._forward_pre_hooks.values() if hasattr(h, "state")]
    assert hooks and all(h.state.caller is None for h in hooks)
    del pipe
    gc.collect()
    assert caller.generation() is None and caller.guidance(torch.zeros(2, 1)) is None


# ---------------------------------------------------------------------------------------------------
# reuse_cfg: which batches are guidance pairs


def _text2img(pipe: diffusers.StableDiffusionPipeline, guidance_scale: float) -> torch.Tensor:
    embeds = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))  # two prompts
    return pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        guidance_scale=guidance_scale,
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def _patched_pipeline(**settings: Any) -> diffusers.StableDiffusionPipeline:
    pipe = _tiny_pipeline(tiny_sd_unet())
    tomediff.apply_tome(pipe, **settings)
    return pipe


def test_reuse_cfg_without_guidance_gives_each_image_its_own_plan() -> None:
    """guidance_scale=1 with two prompts: a batch of two images, not [unconditional, conditional]."""
    shared = _text2img(_patched_pipeline(reuse_cfg=True), guidance_scale=1.0)
    assert torch.equal(shared, _text2img(_patched_pipeline(reuse_cfg=False), guidance_scale=1.0))


def test_reuse_cfg_with_guidance_shares_the_conditional_halfs_plan() -> None:
    pipe = _tiny_pipeline(tiny_sd_unet())
    handle = tomediff.apply_tome(pipe, reuse_cfg=True)
    events: list[PlanEvent] = []
    handle.watch(events.append)
    guided = _text2img(pipe, guidance_scale=7.5)
    slots = events[0].plan.local_slot
    assert slots.shape[0] == 4 and torch.equal(slots[:2], slots[2:])
    assert torch.equal(guided, _text2img(_patched_pipeline(reuse_cfg=True, cfg_layout="uncond_cond"), 7.5))
    assert not torch.equal(guided, _text2img(_patched_pipeline(reuse_cfg=False), 7.5))


@torch.no_grad()
def test_reuse_cfg_takes_a_batch_with_different_halves_for_no_pair() -> None:
    """The pipeline still says guidance is on (its last call was guided), but a batch whose halves are
    not one latent batch twice is no guidance pair: each sample plans for itself."""
    pipe = _patched_pipeline(reuse_cfg=True, use_rand=False)
    _text2img(pipe, guidance_scale=7.5)
    assert pipe.do_classifier_free_guidance
    sample, t, context = unet_inputs(batch=2)
    shared = pipe.unet(sample, t, context).sample
    tomediff.apply_tome(pipe, reuse_cfg=False, use_rand=False)
    assert torch.equal(shared, pipe.unet(sample, t, context).sample)


@torch.no_grad()
def test_reuse_cfg_on_a_model_patched_alone_refuses_to_guess() -> None:
    model = tiny_sd_unet()
    tomediff.apply_tome(model, reuse_cfg=True)
    sample, t, context = unet_inputs(batch=2)
    with pytest.raises(tomediff.MergeCallError, match=r"batch of 2 is such a pair.*cfg_layout='uncond_cond'"):
        model(sample, t, context)
    odd, _, odd_context = unet_inputs(batch=1)  # an odd batch holds no pair: nothing to tell
    tomediff.apply_tome(model, reuse_cfg=False)
    alone = model(odd, t, odd_context).sample
    tomediff.apply_tome(model, reuse_cfg=True)
    assert torch.equal(model(odd, t, odd_context).sample, alone)


@torch.no_grad()
def test_a_caller_set_on_the_handle_says_per_call_whether_a_batch_is_a_pair() -> None:
    """A host that is no diffusers pipeline (ComfyUI's sampler) tells per call through set_caller: a
    pair shares the conditional half's plan (as cfg_layout='uncond_cond'), a non-pair plans per sample
    (as reuse_cfg=False)."""

    class Host:
        name = "Host"
        pair = True

        def generation(self) -> object | None:
            return None

        def guidance(self, sample: object) -> bool | None:
            return self.pair

    sample, t, context = unet_inputs(batch=2)
    model = tiny_sd_unet()
    tomediff.apply_tome(model, reuse_cfg=True, cfg_layout="uncond_cond", use_rand=False)
    paired = model(sample, t, context).sample
    tomediff.apply_tome(model, reuse_cfg=False, use_rand=False)
    apart = model(sample, t, context).sample
    assert not torch.equal(paired, apart)
    handle, host = tomediff.apply_tome(model, reuse_cfg=True, use_rand=False), Host()
    handle.set_caller(host)
    assert torch.equal(model(sample, t, context).sample, paired)
    host.pair = False
    assert torch.equal(model(sample, t, context).sample, apart)
    handle.set_caller(None)
    with pytest.raises(tomediff.MergeCallError, match="batch of 2 is such a pair"):
        model(sample, t, context)


@torch.no_grad()
def test_a_pipeline_that_does_not_say_whether_it_guides_gets_an_error() -> None:
    class Sampler:  # holds the model like a pipeline, says nothing about guidance
        def __init__(self, unet: nn.Module) -> None:
            self.unet = unet

    sampler = Sampler(tiny_sd_unet())
    tomediff.apply_tome(sampler, reuse_cfg=True)
    sample, t, context = unet_inputs(batch=2)
    with pytest.raises(tomediff.MergeCallError, match="its caller, Sampler, does not say"):
        sampler.unet(sample, t, context)


@torch.no_grad()
def test_cfg_layout_cond_uncond_plans_on_the_first_half() -> None:
    """The reverse order, [conditional, unconditional]: both halves get the first half's own matching."""
    model = tiny_sd_unet()
    handle = tomediff.apply_tome(model, reuse_cfg=True, cfg_layout="cond_uncond", use_rand=False)
    events: list[PlanEvent] = []
    handle.watch(events.append)
    inputs: dict[str, torch.Tensor] = {}
    name = handle.report().blocks[0].name
    capture = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: inputs.setdefault(name, args[0].clone())
    )
    sample, t, context = unet_inputs(batch=4)
    model(sample, t, context)
    capture.remove()
    event = next(e for e in events if e.block == name)
    slots = event.plan.local_slot
    assert torch.equal(slots[:2], slots[2:])
    offsets = torch.zeros(event.height // 2, event.width // 2, dtype=torch.long)
    partition = grid_partition(event.height, event.width, 2, 2, offsets)
    alone = plan_merge(inputs[name][:2], partition, event.plan.num_tokens - event.plan.num_merged)
    assert alone is not None and torch.equal(alone.local_slot, slots[:2])


def test_cfg_layout_is_validated_and_reported() -> None:
    with pytest.raises(tomediff.ConfigError, match=r"cfg_layout must be one of 'auto', 'uncond_cond'"):
        tomediff.ToMeConfig(reuse_cfg=True, cfg_layout="comfy")
    handle = tomediff.apply_tome(tiny_sd_unet(), reuse_cfg=True, cfg_layout="cond_uncond")
    assert "reuse_cfg=True, cfg_layout=cond_uncond" in str(handle.report())
