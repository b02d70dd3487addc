"""The ComfyUI node pack (integrations/comfyui) against real ComfyUI 0.3.64 on the CPU: tiny
random-weight models built through ComfyUI's own classes, sampled by its KSampler node."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import tomediff
from comfyui_env import (
    SDXL_POOLED,
    Comfy,
    build_model,
    conditioning,
    flux_unet_config,
    ksample,
    qwen_image_unet_config,
    sd3_unet_config,
    sd15_unet_config,
    sdxl_unet_config,
    start_comfy,
    stop_comfy,
    vendor_archive,
    wan_unet_config,
)

CONTEXT = 16


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Comfy]:
    if vendor_archive() is None:
        pytest.skip("ComfyUI archive shared/vendor/comfyui-0.3.64-a125cd8.tar.gz not found")
    env = start_comfy(tmp_path_factory.mktemp("comfyui"))
    yield env
    stop_comfy(env)


@pytest.fixture(scope="module")
def sd15(comfy: Comfy) -> Any:
    return build_model(comfy, "SD15", sd15_unet_config(), seed=0)


def cond(seed: int, **extra: Any) -> list[list[Any]]:
    return conditioning(CONTEXT, 4, seed, **extra)


def latent(batch: int = 1, size: int = 16) -> torch.Tensor:
    return torch.zeros(batch, 4, size, size)


def run(
    comfy: Comfy, model: Any, batch: int = 1, size: int = 16, steps: int = 1, seed: int = 0
) -> torch.Tensor:
    return ksample(comfy, model, cond(1), cond(2), latent(batch, size), steps=steps, seed=seed)


def simple(comfy: Comfy, model: Any, method: str = "merge", ratio: float = 0.5, seed: int = 0) -> Any:
    node = comfy.nodes.NODE_CLASS_MAPPINGS["TomediffToMe"]()
    (patched,) = node.patch(model, method=method, ratio=ratio, seed=seed)
    return patched


def advanced_defaults(comfy: Comfy) -> dict[str, Any]:
    node_class = comfy.nodes.NODE_CLASS_MAPPINGS["TomediffToMeAdvanced"]
    required = node_class.INPUT_TYPES()["required"]
    return {name: spec[1]["default"] for name, spec in required.items() if name != "model"}


def advanced(comfy: Comfy, model: Any, **options: Any) -> Any:
    node = comfy.nodes.NODE_CLASS_MAPPINGS["TomediffToMeAdvanced"]()
    (patched,) = node.patch(model, **{**advanced_defaults(comfy), **options})
    return patched


def sampling_patch(comfy: Comfy, patched: Any) -> Any:
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    (wrapper,) = patched.get_wrappers(outer, "tomediff")
    return wrapper


def hook_count(model: Any) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.model.diffusion_model.modules()
    )


def test_comfy_loader_registers_both_nodes(comfy: Comfy) -> None:
    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    assert mappings["TomediffToMe"].__module__.endswith("tome_nodes")
    assert {"TomediffToMe", "TomediffToMeAdvanced"} <= set(comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)


def test_node_merges_sd15_at_level_1_and_leaves_no_hook(comfy: Comfy, sd15: Any) -> None:
    reference = run(comfy, sd15)
    patched = simple(comfy, sd15)
    assert hook_count(sd15) == 0  # the node itself touches nothing
    merged = run(comfy, patched)
    assert hook_count(sd15) == 0  # removed when sampling ended
    assert not torch.equal(merged, reference)
    report = sampling_patch(comfy, patched).last_report
    assert report.adapter == "ldm-unet" and report.max_downsample == 1
    level_1 = [b.last_call for b in report.blocks if b.downsample == 1]
    assert level_1 and all(s.tokens == 256 and s.tokens_after_merge == 128 for s in level_1)


def test_unrelated_clone_is_bit_exact_while_and_after_the_node_workflow(comfy: Comfy, sd15: Any) -> None:
    unrelated = sd15.clone()
    reference = run(comfy, unrelated)
    patched = simple(comfy, sd15)
    assert torch.equal(run(comfy, unrelated), reference)  # node executed, its sampler not yet run
    run(comfy, patched)
    assert torch.equal(run(comfy, unrelated), reference)
    assert torch.equal(run(comfy, sd15), reference)


def test_bypass_leaves_the_input_model_alone(comfy: Comfy, sd15: Any) -> None:
    before = (repr(sd15.model_options), repr(sd15.wrappers))
    reference = run(comfy, sd15)
    patched = simple(comfy, sd15)
    run(comfy, patched)
    assert (repr(sd15.model_options), repr(sd15.wrappers)) == before
    assert torch.equal(run(comfy, sd15), reference)  # a bypassed node passes this model on


def test_ratio_zero_is_bit_exact(comfy: Comfy, sd15: Any) -> None:
    reference = run(comfy, sd15, steps=2)
    assert torch.equal(run(comfy, simple(comfy, sd15, ratio=0.0), steps=2), reference)
    assert torch.equal(run(comfy, simple(comfy, sd15, method="downsample", ratio=0.0), steps=2), reference)


def test_same_seed_same_image_other_seed_other_image(comfy: Comfy, sd15: Any) -> None:
    first = run(comfy, simple(comfy, sd15, seed=7), steps=2)
    assert torch.equal(run(comfy, simple(comfy, sd15, seed=7), steps=2), first)
    assert not torch.equal(run(comfy, simple(comfy, sd15, seed=8), steps=2), first)


def test_two_workflows_alternating(comfy: Comfy, sd15: Any) -> None:
    a, b = simple(comfy, sd15, ratio=0.5, seed=1), simple(comfy, sd15, method="downsample", ratio=0.5)
    first_a, first_b = run(comfy, a), run(comfy, b)
    assert not torch.equal(first_a, first_b)
    for _ in range(2):
        assert torch.equal(run(comfy, a), first_a)
        assert torch.equal(run(comfy, b), first_b)


def test_reapplying_replaces_instead_of_stacking(comfy: Comfy, sd15: Any) -> None:
    reference = run(comfy, sd15)
    twice = simple(comfy, simple(comfy, sd15, ratio=0.5), ratio=0.0)
    assert len(twice.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "tomediff")) == 1
    assert torch.equal(run(comfy, twice), reference)


def test_tome_patch_model_on_the_same_model_is_refused(comfy: Comfy, sd15: Any) -> None:
    (comfy_tome,) = comfy.tome_patch_model.execute(sd15, 0.5).result
    with pytest.raises(tomediff.ConflictingPatchError, match="TomePatchModel"):
        simple(comfy, comfy_tome)
    # TomePatchModel after the node: refused when sampling starts, and nothing stays hooked.
    (both,) = comfy.tome_patch_model.execute(simple(comfy, sd15), 0.5).result
    with pytest.raises(tomediff.ConflictingPatchError, match="TomePatchModel"):
        run(comfy, both)
    assert hook_count(sd15) == 0


def test_hooks_removed_when_sampling_fails(comfy: Comfy, sd15: Any) -> None:
    patched = simple(comfy, sd15)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL

    def fail(executor: Any, *args: Any, **kwargs: Any) -> Any:
        assert hook_count(sd15) > 0  # tomediff is on while this clone samples
        raise RuntimeError("interrupted")

    patched.add_wrapper_with_key(apply_model, "test-failure", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(comfy, patched)
    assert hook_count(sd15) == 0


def test_sdxl_level_2_reduced_where_tome_patch_model_changes_nothing(comfy: Comfy) -> None:
    sdxl = build_model(comfy, "SDXL", sdxl_unet_config(), seed=3)
    pooled = {"pooled_output": torch.randn(1, SDXL_POOLED, generator=torch.Generator().manual_seed(4))}
    positive, negative = cond(1, **pooled), cond(2, **pooled)

    def sample(model: Any) -> torch.Tensor:
        return ksample(comfy, model, positive, negative, latent(1, 16))

    reference = sample(sdxl)
    patched = simple(comfy, sdxl)
    assert not torch.equal(sample(patched), reference)
    report = sampling_patch(comfy, patched).last_report
    assert report.max_downsample == 2 and report.levels_found == (2, 4)
    reduced = {b.downsample for b in report.blocks if b.last_call and b.last_call.removed}
    assert reduced == {2}
    assert all(b.last_call.tokens == 64 and b.last_call.removed == 32 for b in report.blocks)
    (comfy_tome,) = comfy.tome_patch_model.execute(sdxl, 0.5).result
    assert torch.equal(sample(comfy_tome), reference)  # max_downsample=1 is hard-coded in it
    assert hook_count(sdxl) == 0


def test_cond_and_uncond_share_the_partition_when_comfy_runs_them_apart(
    comfy: Comfy, sd15: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI batches [uncond, cond] in one call when memory allows, else runs one call each. With an
    even latent batch both layouts use random partitions: the node draws them per noise level, so
    both halves of a step get the same one and the image does not depend on the split."""
    calls: list[list[int]] = []

    def record(executor: Any, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(list(args[3]["cond_or_uncond"]))
        return executor(x, t, *args, **kwargs)

    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    patched, unpatched = simple(comfy, sd15, seed=5), sd15.clone()
    for model in (patched, unpatched):
        model.add_wrapper_with_key(apply_model, "test-record", record)
    joint = run(comfy, patched, batch=2, steps=2)
    joint_unpatched = run(comfy, unpatched, batch=2, steps=2)
    assert calls[:2] == [[1, 0], [1, 0]]
    calls.clear()
    # No room for both halves at once: ComfyUI runs cond and uncond as separate calls.
    monkeypatch.setattr(sd15.model, "memory_required", lambda *args, **kwargs: float("inf"))
    split = run(comfy, patched, batch=2, steps=2)
    split_unpatched = run(comfy, unpatched, batch=2, steps=2)
    assert sorted(map(tuple, calls[:4])) == [(0,), (0,), (1,), (1,)]
    # Unpatched, the split changes the result by float rounding only; patched, by no more than that.
    rounding = (joint_unpatched - split_unpatched).abs().max().item()
    assert (joint - split).abs().max().item() <= max(4 * rounding, 1e-6)
    assert not torch.equal(joint, joint_unpatched)


@pytest.mark.parametrize(
    ("node_type", "options", "expected"),
    [
        ("TomediffToMeAdvanced", {"ratio": 0.9}, "ratio=0.9 is outside [0, 0.75]"),
        ("TomediffToMeAdvanced", {"level_ratios": "1=0.5"}, "level_ratios '1=0.5' is not a list"),
        ("TomediffToMeAdvanced", {"start": 0.8, "stop": 0.2}, "start=0.8 and stop=0.2"),
        ("TomediffToMeAdvanced", {"method": "downsample", "reuse_level": True}, "reuse_level apply"),
        ("TomediffToMeAdvanced", {"max_downsample": "3"}, "max_downsample must be one of auto, 1, 2"),
        ("TomediffToMe", {"method": "merge", "ratio": 0.8, "seed": 0}, "ratio=0.8 is outside [0, 0.75]"),
    ],
)
def test_bad_settings_are_a_one_line_validation_error(
    comfy: Comfy, node_type: str, options: dict[str, Any], expected: str
) -> None:
    import asyncio

    defaults = advanced_defaults(comfy) if node_type == "TomediffToMeAdvanced" else {}
    inputs = {**defaults, **options, "model": ["1", 0]}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": node_type, "inputs": inputs},
    }
    valid, errors, _ = asyncio.run(comfy.execution.validate_inputs("p", prompt, "2", {}))
    assert not valid
    messages = {e["details"].split(" - ", 1)[1] for e in errors if e["type"] == "custom_validation_failed"}
    assert len(messages) == 1
    (message,) = messages
    assert expected in message and "\n" not in message
    node = comfy.nodes.NODE_CLASS_MAPPINGS[node_type]()
    with pytest.raises(tomediff.ConfigError):  # the same settings fed by links: refused when run
        node.patch(None, **{k: v for k, v in inputs.items() if k != "model"})


def test_good_settings_validate(comfy: Comfy) -> None:
    import asyncio

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {
            "class_type": "TomediffToMe",
            "inputs": {"model": ["1", 0], "method": "merge", "ratio": 0.6, "seed": 3},
        },
    }
    _, errors, _ = asyncio.run(comfy.execution.validate_inputs("p", prompt, "2", {}))
    assert [e for e in errors if e["type"] == "custom_validation_failed"] == []


def test_advanced_node_options_reach_the_patch(comfy: Comfy, sd15: Any) -> None:
    reference = run(comfy, sd15)
    patched = advanced(
        comfy, sd15, level_ratios="1:0.25, 2:0.5", reuse_level=True, sx=2, sy=1, seed=9, skip_first=1
    )
    assert not torch.equal(run(comfy, patched), reference)
    report = sampling_patch(comfy, patched).last_report
    config = report.config
    assert (
        config.level_ratios == ((1, 0.25), (2, 0.5)) and config.reuse_level and config.skip_blocks == (1, 0)
    )
    removed = {b.name: b.last_call.removed for b in report.blocks if b.last_call is not None}
    assert "input_blocks.1.1.transformer_blocks.0" not in removed  # the first block, skipped
    assert removed["output_blocks.3.1.transformer_blocks.0"] == 64  # level 1: 256 tokens * 0.25
    assert removed["middle_block.1.transformer_blocks.0"] == 32  # level 2: 64 tokens * 0.5
    assert len(removed) == 6


DIT_FAMILIES = {
    # family: (supported_models class, unet config, latent shape, pooled width, image tokens)
    "flux": ("Flux", flux_unet_config, (1, 16, 16, 16), 8, 64),
    "sd3": ("SD3", sd3_unet_config, (1, 16, 16, 16), 8, 64),
    "wan": ("WAN21_T2V", wan_unet_config, (1, 16, 2, 16, 16), 0, 128),
    "qwen_image": ("QwenImage", qwen_image_unet_config, (1, 16, 1, 16, 16), 0, 64),
}


@pytest.mark.parametrize("family", sorted(DIT_FAMILIES))
def test_dit_keys_and_values_downsampled(comfy: Comfy, family: str) -> None:
    model_class, unet_config, latent_shape, pooled, image_tokens = DIT_FAMILIES[family]
    model = build_model(comfy, model_class, unet_config(), seed=11)
    extra = (
        {"pooled_output": torch.randn(1, pooled, generator=torch.Generator().manual_seed(5))}
        if pooled
        else {}
    )
    positive, negative = cond(1, **extra), cond(2, **extra)

    def sample(patched: Any) -> torch.Tensor:
        return ksample(comfy, patched, positive, negative, torch.zeros(latent_shape))

    reference = sample(model)
    assert torch.isfinite(reference).all()
    patched = simple(comfy, model, method="downsample")
    reduced = sample(patched)
    assert not torch.equal(reduced, reference)
    report = sampling_patch(comfy, patched).last_report
    assert report.family == family and report.reduced_calls > 0, str(report)
    text = 4  # the conditioning's tokens
    assert report.keys_before in (image_tokens, image_tokens + text)
    assert report.keys_after == report.keys_before - image_tokens * 3 // 4, str(report)
    assert torch.equal(sample(model), reference)  # the unpatched model is untouched
    assert torch.equal(sample(simple(comfy, model, method="downsample", ratio=0.0)), reference)


def test_example_workflow_is_valid_for_comfy(comfy: Comfy) -> None:
    import asyncio
    import json

    path = comfy.pack.__path__[0] + "/example_workflows/tomediff_sd15.json"
    with open(path) as file:
        prompt = json.load(file)
    validated: dict[str, Any] = {}
    asyncio.run(comfy.execution.validate_inputs("p", prompt, "8", validated))
    # Only the checkpoint (absent here) may fail; every other node, tomediff's included, validates.
    failed = {node for node, (ok, errors, _) in validated.items() if errors}
    assert failed == {"1"}, {node: validated[node][1] for node in failed}
    assert prompt["2"]["class_type"] == "TomediffToMe"


def test_start_stop_follow_comfy_timesteps(comfy: Comfy, sd15: Any) -> None:
    """ComfyUI passes the UNet its 0..999 timestep; one step at the largest sigma is progress 0."""
    reference = run(comfy, sd15)
    assert torch.equal(run(comfy, advanced(comfy, sd15, start=0.5)), reference)
    assert not torch.equal(run(comfy, advanced(comfy, sd15, stop=0.5)), reference)


def test_attention_replaced_by_another_node_is_refused(comfy: Comfy, sd15: Any) -> None:
    """A node replacing attn1 of a patched block (ComfyUI then calls to_q/to_k/to_v itself) would leave
    tomediff's hooks idle there: refused, naming the block; a replacement elsewhere is fine."""
    import comfy.ldm.modules.attention as attention

    def replacement(q: Any, k: Any, v: Any, extra: dict[str, Any]) -> Any:
        return attention.optimized_attention(q, k, v, extra["n_heads"])

    clashing = simple(comfy, sd15)
    clashing.set_model_attn1_replace(replacement, "input", 1)
    with pytest.raises(
        tomediff.ConflictingPatchError, match=r"input_blocks\.1\.1\.transformer_blocks\.0 \(attn1\)"
    ):
        run(comfy, clashing)
    assert hook_count(sd15) == 0
    elsewhere = simple(comfy, sd15)
    elsewhere.set_model_attn1_replace(replacement, "middle", 0)  # level 2: not merged by default
    run(comfy, elsewhere)
    assert sampling_patch(comfy, elsewhere).last_report.calls == 1


def test_dit_without_matching_attention_is_an_error(comfy: Comfy, monkeypatch: pytest.MonkeyPatch) -> None:
    """When no attention call holds the image tokens the latent implies (e.g. extra reference-image
    tokens), the node says so instead of sampling unreduced."""
    model_class, unet_config, latent_shape, _, _ = DIT_FAMILIES["wan"]
    model = build_model(comfy, model_class, unet_config(), seed=11)
    dit_attention = sys.modules[comfy.pack.__name__ + ".dit_attention"]
    monkeypatch.setattr(dit_attention, "_token_grid", lambda model, latent: (1, 3, 3))
    with pytest.raises(tomediff.MergeCallError, match="reduced no attention call"):
        ksample(comfy, simple(comfy, model, method="downsample"), cond(1), cond(2), torch.zeros(latent_shape))


def test_reuse_cfg_on_comfy_guidance_pairs(comfy: Comfy, sd15: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """reuse_cfg matches on the conditional half of ComfyUI's [uncond, cond] call; when ComfyUI runs the
    halves apart, an even batch (two images of one half) is no pair and plans per sample, exactly as
    without reuse_cfg."""
    nodes = sys.modules[comfy.pack.__name__ + ".tome_nodes"]
    if not nodes.supports_guidance_caller():
        with pytest.raises(tomediff.ConfigError, match=r"reuse_cfg needs a tomediff whose ToMeHandle"):
            advanced(comfy, sd15, reuse_cfg=True)
        return
    reference = run(comfy, sd15, batch=2)
    patched = advanced(comfy, sd15, reuse_cfg=True)
    shared = run(comfy, patched, batch=2)
    assert not torch.equal(shared, reference)
    assert not torch.equal(shared, run(comfy, advanced(comfy, sd15), batch=2))
    config = sampling_patch(comfy, patched).last_report.config
    assert config.reuse_cfg and config.cfg_layout == "auto"
    monkeypatch.setattr(sd15.model, "memory_required", lambda *args, **kwargs: float("inf"))
    for batch in (1, 2):  # halves apart: one or two images of one half per call
        apart = run(comfy, patched, batch=batch, steps=2)
        assert torch.equal(apart, run(comfy, advanced(comfy, sd15), batch=batch, steps=2))
    assert hook_count(sd15) == 0


def test_reuse_steps_keeps_plans_across_steps(comfy: Comfy, sd15: Any) -> None:
    """The per-call reseed must not cut tomediff's generations: with reuse_steps=2 the second step
    reuses the first step's matching, which changes the image."""
    every_step = run(comfy, advanced(comfy, sd15, seed=3), steps=2)
    patched = advanced(comfy, sd15, seed=3, reuse_steps=2)
    assert not torch.equal(run(comfy, patched, steps=2), every_step)
    assert torch.equal(
        run(comfy, advanced(comfy, sd15, seed=3, reuse_steps=2), steps=2), run(comfy, patched, steps=2)
    )


@pytest.fixture(scope="module")
def dits(comfy: Comfy) -> dict[str, Any]:
    """One tiny model of each ComfyUI DiT family, built once for the module."""
    return {family: build_model(comfy, spec[0], spec[1](), seed=11) for family, spec in DIT_FAMILIES.items()}


def dit_sample(
    comfy: Comfy, family: str, model: Any, batch: int = 1, steps: int = 1, seed: int = 0
) -> torch.Tensor:
    _, _, latent_shape, pooled, _ = DIT_FAMILIES[family]

    def conds(seed: int) -> list[list[Any]]:
        generator = torch.Generator().manual_seed(seed + 100)
        extra = {"pooled_output": torch.randn(1, pooled, generator=generator)} if pooled else {}
        return cond(seed, **extra)

    latent_batch = torch.zeros((batch, *latent_shape[1:]))
    return ksample(comfy, model, conds(1), conds(2), latent_batch, steps=steps, seed=seed)


@pytest.fixture
def attention_calls(comfy: Comfy, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(queries, keys) of every attention the override lets run, read from the tensors themselves."""
    dit_attention = sys.modules[comfy.pack.__name__ + ".dit_attention"]
    calls: list[tuple[int, int]] = []
    original = dit_attention._Override.__call__

    def recording(self: Any, func: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        def counted(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
            axis = 2 if kwargs.get("skip_reshape", args[3] if len(args) > 3 else False) else 1
            calls.append((int(q.shape[axis]), int(k.shape[axis])))
            return func(q, k, v, *args, **kwargs)

        return original(self, counted, q, k, v, *args, **kwargs)

    monkeypatch.setattr(dit_attention._Override, "__call__", recording)
    return calls


@pytest.mark.parametrize("family", sorted(DIT_FAMILIES))
def test_dit_tokens_merged_at_the_attention_call(
    comfy: Comfy, dits: dict[str, Any], family: str, attention_calls: list[tuple[int, int]]
) -> None:
    """q+kv merging on ComfyUI's Flux, SD3, Wan and Qwen-Image: half the image queries and keys/values
    merged in every self/joint attention, text tokens kept, output copied back to every position."""
    model = dits[family]
    image_tokens = DIT_FAMILIES[family][4]
    reference = dit_sample(comfy, family, model)
    unrelated = model.clone()
    patched = simple(comfy, model, method="merge", ratio=0.5, seed=1)
    assert torch.equal(dit_sample(comfy, family, unrelated), reference)  # node executed, not sampled yet
    attention_calls.clear()
    merged = dit_sample(comfy, family, patched)
    assert not torch.equal(merged, reference) and torch.isfinite(merged).all()
    report = sampling_patch(comfy, patched).last_report
    text = 0 if family == "wan" else 4  # Wan's self-attention holds image tokens only
    full = image_tokens + text
    left = image_tokens - image_tokens // 2 + text
    assert (report.method, report.queries_before, report.queries_after) == ("merge", full, left), str(report)
    assert report.keys_after == left
    reduced = [call for call in attention_calls if call == (left, left)]
    assert len(reduced) == report.reduced_calls > 0
    assert (full, full) not in attention_calls  # no self/joint attention ran unreduced
    # Nothing stays behind: no hook, no override, and every other clone is bit-exact.
    assert hook_count(model) == 0
    assert "optimized_attention_override" not in patched.model_options.get("transformer_options", {})
    assert torch.equal(dit_sample(comfy, family, unrelated), reference)
    assert torch.equal(dit_sample(comfy, family, model), reference)
    assert torch.equal(dit_sample(comfy, family, simple(comfy, model, method="merge", ratio=0.0)), reference)


def test_dit_merge_same_seed_same_image_and_guidance_split(
    comfy: Comfy, dits: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flux with merging: the node's seed fixes the partitions (same seed, same image; another seed,
    another image), and running the guidance halves apart changes the image by float rounding only."""
    model = dits["flux"]
    first = dit_sample(comfy, "flux", simple(comfy, model, seed=7), batch=2, steps=2)
    assert torch.equal(dit_sample(comfy, "flux", simple(comfy, model, seed=7), batch=2, steps=2), first)
    assert not torch.equal(dit_sample(comfy, "flux", simple(comfy, model, seed=8), batch=2, steps=2), first)
    unpatched = dit_sample(comfy, "flux", model.clone(), batch=2, steps=2)
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    split = dit_sample(comfy, "flux", simple(comfy, model, seed=7), batch=2, steps=2)
    split_unpatched = dit_sample(comfy, "flux", model.clone(), batch=2, steps=2)
    rounding = (unpatched - split_unpatched).abs().max().item()
    assert (first - split).abs().max().item() <= max(4 * rounding, 1e-6)


def test_dit_kv_ratio_merges_keys_apart_from_queries(
    comfy: Comfy, dits: dict[str, Any], attention_calls: list[tuple[int, int]]
) -> None:
    """kv_ratio on Wan: keys/values merged at their own ratio, queries at ratio (0: all kept)."""
    model, image_tokens = dits["wan"], DIT_FAMILIES["wan"][4]
    reference = dit_sample(comfy, "wan", model)
    keys_only = advanced(comfy, model, ratio=0.0, kv_ratio=0.75)
    assert not torch.equal(dit_sample(comfy, "wan", keys_only), reference)
    assert attention_calls[-2:][0] == (image_tokens, image_tokens // 4)  # self-attention, then cross
    attention_calls.clear()
    both = advanced(comfy, model, ratio=0.25, kv_ratio=0.5)
    dit_sample(comfy, "wan", both)
    report = sampling_patch(comfy, both).last_report
    expected = (image_tokens - image_tokens // 4, image_tokens // 2)
    assert (report.queries_after, report.keys_after) == expected
    assert expected in attention_calls
    with pytest.raises(
        tomediff.ConfigError, match=r"kv_ratio=0\.5 applies to ComfyUI's Flux, SD3, Wan and Qwen"
    ):
        advanced(comfy, build_model(comfy, "SD15", sd15_unet_config(), seed=0), kv_ratio=0.5)


def test_dit_merge_refuses_settings_it_cannot_honour(comfy: Comfy, dits: dict[str, Any]) -> None:
    with pytest.raises(tomediff.ConfigError, match=r"^reuse_level does not apply to ComfyUI's sd3 model"):
        advanced(comfy, dits["sd3"], reuse_level=True)
    with pytest.raises(tomediff.ConfigError, match=r"^reuse_cfg, reuse_steps do not apply to ComfyUI's flux"):
        advanced(comfy, dits["flux"], reuse_cfg=True, reuse_steps=2)


def test_dit_merge_is_the_same_in_both_of_comfys_attention_layouts(comfy: Comfy) -> None:
    """ComfyUI's DiTs call attention with [B, L, H*D] (SD3, Wan) or [B, H, L, D] tensors (Flux,
    skip_reshape): the override merges both alike and answers in the layout asked for."""
    import types

    import comfy.ldm.modules.attention as attention

    dit_attention = sys.modules[comfy.pack.__name__ + ".dit_attention"]
    config = tomediff.ToMeConfig(ratio=0.5, kv_ratio=0.25)
    owner = dit_attention.DitAttention(config, "flux", types.SimpleNamespace(patch_size=2))
    override = dit_attention._Override(owner, ((1, 8, 8),), 4)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4 + 64, 8, generator=generator) for _ in range(3))
    function = attention.optimized_attention.__wrapped__  # the attention function itself, unwrapped
    owner.generator.manual_seed(1)
    by_heads = override(function, q, k, v, 3, skip_reshape=True, skip_output_reshape=True)
    owner.generator.manual_seed(1)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(2, 4 + 64, 24)

    flat_out = override(function, flat(q), flat(k), flat(v), heads=3)
    assert by_heads.shape == q.shape and torch.equal(flat(by_heads), flat_out)
    report = owner.report
    assert (report.queries_after, report.keys_after) == (4 + 32, 4 + 48)
    assert not torch.equal(by_heads, function(q, k, v, 3, skip_reshape=True, skip_output_reshape=True))


# Edit models: two reference latents, a 12x8 and an 8x8 latent (6x4 and 4x4 tokens), after the 8x8
# tokens of the sampled 16x16 latent and 4 text tokens.
EDIT_FAMILIES = ("flux", "qwen_image")
REFERENCE_GRIDS = ((1, 6, 4), (1, 4, 4))
EDIT_TEXT, EDIT_IMAGE, EDIT_REFERENCES = 4, 64, (24, 16)
EDIT_FULL = EDIT_TEXT + EDIT_IMAGE + sum(EDIT_REFERENCES)


def reference_latents(family: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(21)
    frames = (1,) if family == "qwen_image" else ()  # Qwen-Image's latents are [B, C, T, H, W]
    return [torch.randn(1, 16, *frames, 2 * h, 2 * w, generator=generator) for _, h, w in REFERENCE_GRIDS]


def edit_sample(comfy: Comfy, family: str, model: Any, method: str | None = None) -> torch.Tensor:
    """One step of ``model`` with the reference latents in both conditionings (as ComfyUI's
    ReferenceLatent node puts them), ``method``: ComfyUI's ref_latents_method, None = its default."""
    _, _, latent_shape, pooled, _ = DIT_FAMILIES[family]
    references = reference_latents(family)

    def conds(seed: int) -> list[list[Any]]:
        generator = torch.Generator().manual_seed(seed + 100)
        extra: dict[str, Any] = {"reference_latents": references}
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=generator)
        if method is not None:
            extra["reference_latents_method"] = method
        return cond(seed, **extra)

    return ksample(comfy, model, conds(1), conds(2), torch.zeros(latent_shape))


@pytest.fixture
def grouped_plans(comfy: Comfy, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], list[Any]]]:
    """(grids, ratios) of every grouped merge plan the override asks tomediff.ops for."""
    dit_attention = sys.modules[comfy.pack.__name__ + ".dit_attention"]
    calls: list[tuple[list[Any], list[Any]]] = []
    original = dit_attention.grouped_attention_merge_plan

    def recording(metric: torch.Tensor, grids: Any, ratios: Any, **options: Any) -> Any:
        calls.append((list(grids), list(ratios)))
        return original(metric, grids, ratios, **options)

    monkeypatch.setattr(dit_attention, "grouped_attention_merge_plan", recording)
    return calls


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_edit_references_merged_each_on_its_own_grid(
    comfy: Comfy,
    dits: dict[str, Any],
    family: str,
    attention_calls: list[tuple[int, int]],
    grouped_plans: list[tuple[list[Any], list[Any]]],
) -> None:
    """Flux Kontext / Qwen-Image-Edit: the latent merged at ratio (and kv_ratio), each reference latent
    at reference_ratio on its own grid, the text kept; removal and ratio 0 bit-exact."""
    model = dits[family]
    reference = edit_sample(comfy, family, model)
    assert torch.isfinite(reference).all()

    def merged(expected: tuple[int, int], **options: Any) -> Any:
        attention_calls.clear()
        grouped_plans.clear()
        patched = advanced(comfy, model, seed=1, **options)
        out = edit_sample(comfy, family, patched)
        assert not torch.equal(out, reference) and torch.isfinite(out).all()
        report = sampling_patch(comfy, patched).last_report
        assert report.reference_grids == REFERENCE_GRIDS, str(report)
        assert (report.queries_before, report.keys_before) == (EDIT_FULL, EDIT_FULL), str(report)
        assert (report.queries_after, report.keys_after) == expected, str(report)
        assert attention_calls.count(expected) == report.reduced_calls > 0
        assert (EDIT_FULL, EDIT_FULL) not in attention_calls  # no joint attention ran unreduced
        assert all(grids == [(8, 8), (6, 4), (4, 4)] for grids, _ in grouped_plans)
        return grouped_plans[0][1]

    # Latent 64 -> 32 tokens; references 24 -> 18 and 16 -> 12 at 0.25; text 4.
    ratios = merged((4 + 32 + 18 + 12,) * 2, ratio=0.5, reference_ratio=0.25)
    assert ratios == [(0.5, None), (0.25, None), (0.25, None)]
    # reference_ratio -1 (None): the references like the latent.
    assert merged((4 + 32 + 12 + 8,) * 2, ratio=0.5)[1:] == [(0.5, None)] * 2
    # kv_ratio applies to the latent only; reference_ratio to the references' queries and keys alike.
    merged((4 + 32 + 18 + 12, 4 + 16 + 18 + 12), ratio=0.5, kv_ratio=0.75, reference_ratio=0.25)
    # Only the references merged; the latent kept whole.
    merged((4 + 64 + 12 + 8,) * 2, ratio=0.0, reference_ratio=0.5)
    # Nothing merged: bit-exact, and nothing stays behind on the model.
    assert torch.equal(
        edit_sample(comfy, family, advanced(comfy, model, ratio=0.0, reference_ratio=0.0)), reference
    )
    assert hook_count(model) == 0
    assert torch.equal(edit_sample(comfy, family, model), reference)


def test_flux_reference_methods_are_read_alike(
    comfy: Comfy, dits: dict[str, Any], attention_calls: list[tuple[int, int]]
) -> None:
    """ComfyUI's ref_latents_method (offset, index, uxo) moves the references' rotary ids, not their
    tokens: every variant is reduced on the same grids, and each gives its own image."""
    model = dits["flux"]
    images = []
    for method in ("offset", "index", "uxo"):
        attention_calls.clear()
        patched = advanced(comfy, model, ratio=0.5, reference_ratio=0.25)
        images.append(edit_sample(comfy, "flux", patched, method))
        report = sampling_patch(comfy, patched).last_report
        assert report.reference_grids == REFERENCE_GRIDS and report.reduced_calls == 2, str(report)
        assert (report.queries_after, report.keys_after) == (4 + 32 + 18 + 12,) * 2
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_edit_references_downsampled_each_on_its_own_grid(
    comfy: Comfy, dits: dict[str, Any], family: str, attention_calls: list[tuple[int, int]]
) -> None:
    """method="downsample": every query kept; the keys/values of the latent (8x8 -> 4x4) and of each
    reference (6x4 -> 3x2, 4x4 -> 2x2) from its own downsampled grid; text kept; factor 1 bit-exact."""
    model = dits[family]
    reference = edit_sample(comfy, family, model)
    patched = simple(comfy, model, method="downsample")
    assert not torch.equal(edit_sample(comfy, family, patched), reference)
    report = sampling_patch(comfy, patched).last_report
    expected = (EDIT_FULL, 4 + 16 + 6 + 4)
    assert (report.queries_after, report.keys_after) == expected, str(report)
    assert attention_calls.count(expected) == report.reduced_calls > 0
    assert torch.equal(
        edit_sample(comfy, family, simple(comfy, model, method="downsample", ratio=0.0)), reference
    )
    assert torch.equal(edit_sample(comfy, family, model), reference)


def test_reference_ratio_refused_where_it_cannot_apply(comfy: Comfy, dits: dict[str, Any], sd15: Any) -> None:
    with pytest.raises(
        tomediff.ConfigError, match=r"^reference_ratio=0\.5 applies to ComfyUI's Flux \(Kontext\)"
    ):
        advanced(comfy, sd15, reference_ratio=0.5)
    with pytest.raises(
        tomediff.ConfigError, match=r"ComfyUI's wan model takes none. Set reference_ratio to -1"
    ):
        advanced(comfy, dits["wan"], reference_ratio=0.5)
    with pytest.raises(tomediff.ConfigError, match=r"reference_ratio applies to method='merge'"):
        advanced(comfy, dits["flux"], method="downsample", reference_ratio=0.5)
    node_class = comfy.nodes.NODE_CLASS_MAPPINGS["TomediffToMeAdvanced"]
    refused = node_class.VALIDATE_INPUTS(**{**advanced_defaults(comfy), "reference_ratio": 0.9})
    assert isinstance(refused, str) and refused.startswith("reference_ratio=0.9 is outside [0, 0.75]")


def test_unreadable_reference_latents_are_an_error(comfy: Comfy) -> None:
    """Reference latents the node cannot place among the image tokens stop the run with the reason."""
    import types

    dit_attention = sys.modules[comfy.pack.__name__ + ".dit_attention"]
    model = types.SimpleNamespace(patch_size=2)
    config = tomediff.ToMeConfig(ratio=0.5)
    x, t, context = torch.zeros(1, 16, 8, 8), torch.ones(1), torch.zeros(1, 4, 16)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model ran")

    def call(family: str, references: Any, latent: torch.Tensor = x) -> None:
        owner = dit_attention.DitAttention(config, family, model)
        owner(never, latent, t, None, context, None, {}, ref_latents=references)

    with pytest.raises(
        tomediff.MergeCallError, match=r"expected a list of 4-D latents .* got \[\(16, 8, 8\)\]"
    ):
        call("flux", [torch.zeros(16, 8, 8)])
    with pytest.raises(tomediff.MergeCallError, match=r"expected a list of 4-D latents"):
        call("flux", torch.zeros(1, 16, 8, 8))  # one tensor, not ComfyUI's list
    with pytest.raises(
        tomediff.MergeCallError, match=r"reference latents \[\(1, 16, 2, 8, 8\)\] .*\(one frame\)"
    ):
        call("qwen_image", [torch.zeros(1, 16, 2, 8, 8)], torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(
        tomediff.MergeCallError, match="to its wan model, whose forward tomediff does not know"
    ):
        call("wan", [torch.zeros(1, 16, 8, 8)])
