"""Patching real diffusers / LDM-layout models: exactness, equivalence to tomesd, every block layout."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tomediff
from conftest import (
    DIM,
    BlockStack,
    RecordTokens,
    assert_close,
    norm_type_case,
    sdxl_added_cond,
    tiny_pixart,
    tiny_sd_unet,
    tiny_sd_unet_3level,
    tiny_sdxl_unet,
    unet_inputs,
)

tomesd = pytest.importorskip("tomesd")


@torch.no_grad()
def run_unet(
    unet: nn.Module, batch: int = 2, height: int = 32, width: int = 32, **kwargs: object
) -> torch.Tensor:
    sample, timestep, context = unet_inputs(batch, height, width)
    return unet(sample, timestep, context, **kwargs).sample


def test_ratio_zero_is_bit_identical() -> None:
    unet = tiny_sd_unet()
    base = run_unet(unet)
    handle = tomediff.apply_tome(unet, ratio=0.0, merge_crossattn=True, merge_mlp=True)
    assert torch.equal(run_unet(unet), base)
    assert all(b.last_call.removed == 0 for b in handle.report().blocks)


@pytest.mark.parametrize(
    ("merge_attn", "merge_crossattn", "merge_mlp"),
    [
        (True, False, False),
        (True, True, False),
        (True, True, True),
        (False, True, False),
        (False, False, True),
    ],
)
@pytest.mark.parametrize("max_downsample", [1, 2])
def test_equals_tomesd_without_randomness(
    merge_attn: bool, merge_crossattn: bool, merge_mlp: bool, max_downsample: int
) -> None:
    unet = tiny_sd_unet_3level()
    options = dict(
        ratio=0.5,
        max_downsample=max_downsample,
        use_rand=False,
        merge_attn=merge_attn,
        merge_crossattn=merge_crossattn,
        merge_mlp=merge_mlp,
    )
    base = run_unet(unet)
    tomesd.apply_patch(unet, **options)
    reference = run_unet(unet)
    tomesd.remove_patch(unet)
    tomediff.apply_patch(unet, **options)
    ours = run_unet(unet)
    tomediff.remove_patch(unet)
    assert (reference - base).abs().max() > 1e-3, "tomesd did not change the output: the test proves nothing"
    assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_random_partitions_equal_tomesd_with_the_same_seed() -> None:
    """One draw per call for every block consumes tomesd's per-block stream in the same order, so with
    the same CPU seed both libraries pick the same random dst tokens, call after call."""
    unet = tiny_sd_unet()
    handle = tomediff.apply_tome(unet, ratio=0.5, seed=5)
    ours = [run_unet(unet) for _ in range(3)]
    handle.remove()
    tomesd.apply_patch(unet, ratio=0.5)
    unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(5)
    reference = [run_unet(unet) for _ in range(3)]
    tomesd.remove_patch(unet)
    assert not torch.equal(reference[0], reference[1]), "the partitions did not change between calls"
    for mine, theirs in zip(ours, reference, strict=True):
        assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_equals_tomesd_on_non_square_latents() -> None:
    unet = tiny_sd_unet_3level()
    tomesd.apply_patch(unet, ratio=0.4, use_rand=False, max_downsample=2)
    reference = run_unet(unet, height=24, width=40)
    tomesd.remove_patch(unet)
    tomediff.apply_patch(unet, ratio=0.4, use_rand=False, max_downsample=2)
    assert_close(run_unet(unet, height=24, width=40), reference, atol=2e-5, rtol=1e-4)


def test_removal_restores_bit_identical_outputs_and_leaves_nothing() -> None:
    unet = tiny_sd_unet()
    before_attrs = {name: set(vars(m)) for name, m in unet.named_modules()}
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run_unet(unet)
    handle = tomediff.apply_tome(unet, ratio=0.6, merge_crossattn=True, merge_mlp=True)
    assert not torch.equal(run_unet(unet), base)
    assert set(unet.state_dict()) == set(before_state)
    handle.remove()
    assert torch.equal(run_unet(unet), base)
    for name, module in unet.named_modules():
        assert set(vars(module)) == before_attrs[name], f"attributes changed on {name}"
        assert "forward" not in vars(module)
        for table in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
        ):
            assert not getattr(module, table), f"{table} left on {name}"
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert all(torch.equal(v, before_state[k]) for k, v in unet.state_dict().items())


def test_remove_tome_without_patch_is_a_noop_and_twice_is_safe() -> None:
    unet = tiny_sd_unet()
    base = run_unet(unet)
    assert tomediff.remove_tome(unet) is unet
    handle = tomediff.apply_tome(unet)
    handle.remove()
    handle.remove()
    tomediff.remove_tome(unet)
    assert torch.equal(run_unet(unet), base)


def test_applying_twice_replaces_the_first_patch() -> None:
    unet = tiny_sd_unet()
    first = tomediff.apply_tome(unet, ratio=0.3, use_rand=False)
    second = tomediff.apply_tome(unet, ratio=0.6, use_rand=False)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert len(attn._forward_pre_hooks) == 1
    recorder = RecordTokens(attn.to_q)
    run_unet(unet)
    assert recorder.counts == [1024 - int(1024 * 0.6)]
    assert first.report().blocks[0].last_call is None and second.report().calls == 1


def test_a_block_called_with_a_count_the_last_call_cannot_explain_is_refused() -> None:
    unet = tiny_sd_unet()
    tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    run_unet(unet)  # 32x32 latent: the block sees 1024 tokens
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    context = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert block(torch.randn(2, 1024, 32), encoder_hidden_states=context).shape == (2, 1024, 32)
        # 64 tokens: no model input explains them, so no 8x8 grid is guessed
        with pytest.raises(tomediff.MergeCallError, match=r"received 64 tokens.*never guesses a grid"):
            block(torch.randn(2, 64, 32), encoder_hidden_states=context)


def test_context_manager_patches_only_inside() -> None:
    unet = tiny_sd_unet()
    base = run_unet(unet)
    with tomediff.tome(unet, ratio=0.5) as handle:
        assert handle.active and not torch.equal(run_unet(unet), base)
    assert not handle.active and torch.equal(run_unet(unet), base)


@pytest.mark.parametrize(
    "norm_type", ["layer_norm", "ada_norm", "ada_norm_zero", "ada_norm_single", "ada_norm_continuous"]
)
def test_every_norm_type_merges(norm_type: str) -> None:
    model, kwargs = norm_type_case(norm_type)
    sample = torch.randn(2, DIM, 8, 6, generator=torch.Generator().manual_seed(0))
    block = model.blocks[0]
    with torch.no_grad():
        base = model(sample, **kwargs)
        handle = tomediff.apply_tome(model, ratio=0.5, merge_crossattn=True, merge_mlp=True)
        seen = {name: RecordTokens(getattr(block, name)) for name in ("attn1", "attn2", "ff")}
        out = model(sample, **kwargs)
    expected = 48 - int(48 * 0.5)
    assert {name: rec.counts for name, rec in seen.items()} == {
        "attn1": [expected],
        "attn2": [expected],
        "ff": [expected],
    }
    stats = handle.report().blocks[0].last_call
    assert (stats.height, stats.width, stats.tokens, stats.tokens_after_merge) == (8, 6, 48, expected)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)


def test_sdxl_merges_by_default_at_its_highest_resolution_level() -> None:
    unet = tiny_sdxl_unet()
    added = sdxl_added_cond(2)
    handle = tomediff.apply_tome(unet)
    run_unet(unet, added_cond_kwargs=added)
    report = handle.report()
    assert report.max_downsample == 2 and report.levels_found == (2, 4)
    assert {b.downsample for b in report.blocks} == {2} and len(report.blocks) == 6
    assert all(b.last_call.tokens == 256 and b.last_call.tokens_after_merge == 128 for b in report.blocks)
    assert "max_downsample=2" in str(report)


def test_sdxl_with_tomesd_default_level_raises_instead_of_doing_nothing() -> None:
    unet = tiny_sdxl_unet()
    with pytest.raises(
        ValueError, match=r"max_downsample=1 selects none of the 14 .*levels \[2, 4\].*max_downsample=2"
    ):
        tomediff.apply_patch(unet, ratio=0.5)


def test_keyword_call_matches_positional_call() -> None:
    unet = tiny_sd_unet()
    sample, timestep, context = unet_inputs()
    tomediff.apply_tome(unet, ratio=0.5, seed=3)
    with torch.no_grad():
        positional = unet(sample, timestep, context).sample
        tomediff.apply_tome(unet, ratio=0.5, seed=3)
        keyword = unet(sample=sample, timestep=timestep, encoder_hidden_states=context).sample
    assert torch.equal(positional, keyword)


@pytest.mark.parametrize(("height", "width"), [(24, 40), (40, 24), (30, 34)])
def test_non_square_and_odd_sizes(height: int, width: int) -> None:
    unet = tiny_sd_unet_3level()
    handle = tomediff.apply_tome(unet, ratio=0.5, max_downsample=2)
    out = run_unet(unet, height=height, width=width)
    assert out.shape == (2, 4, height, width) and torch.isfinite(out).all()
    grids = {(b.last_call.height, b.last_call.width) for b in handle.report().blocks}
    assert grids == {(height, width), ((height + 1) // 2, (width + 1) // 2)}
    for block in handle.report().blocks:
        stats = block.last_call
        assert stats.tokens == stats.height * stats.width
        assert stats.tokens_after_merge == stats.tokens - int(stats.tokens * 0.5)


@pytest.mark.parametrize("batch", [1, 3])
def test_odd_batch_sizes_use_the_fixed_partition(batch: int) -> None:
    unet = tiny_sd_unet()
    tomediff.apply_tome(unet, ratio=0.5, use_rand=True, seed=0)
    random_seed_0 = run_unet(unet, batch=batch)
    handle = tomediff.apply_tome(unet, ratio=0.5, use_rand=True, seed=1)
    random_seed_1 = run_unet(unet, batch=batch)
    assert f"(last call: top-left (odd batch of {batch}) partition, as tomesd" in str(handle.report())
    tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    fixed = run_unet(unet, batch=batch)
    assert random_seed_0.shape[0] == batch
    assert torch.equal(random_seed_0, fixed) and torch.equal(random_seed_1, fixed)


def test_batch_elements_share_the_partition() -> None:
    # cond and uncond halves of a CFG batch with identical inputs must get identical outputs
    unet = tiny_sd_unet()
    sample, timestep, context = unet_inputs(batch=1)
    tomediff.apply_tome(unet, ratio=0.5, use_rand=True)
    with torch.no_grad():
        out = unet(sample.repeat(2, 1, 1, 1), timestep, context.repeat(2, 1, 1)).sample
    assert torch.equal(out[0], out[1])


def test_seed_determinism_and_global_rng_untouched() -> None:
    unet = tiny_sd_unet()
    torch.manual_seed(1234)
    global_state = torch.get_rng_state()
    handle = tomediff.apply_tome(unet, ratio=0.5, seed=5)
    first = run_unet(unet)
    assert torch.equal(torch.get_rng_state(), global_state), "the library drew from the global RNG"
    second = run_unet(unet)
    handle.reseed()
    again = run_unet(unet)
    tomediff.apply_tome(unet, ratio=0.5, seed=6)
    other_seed = run_unet(unet)
    assert torch.equal(first, again)
    assert not torch.equal(first, second), "the partition should advance between calls"
    assert not torch.equal(first, other_seed)


def test_user_generator_is_used() -> None:
    unet = tiny_sd_unet()
    tomediff.apply_tome(unet, ratio=0.5, generator=torch.Generator().manual_seed(9))
    a = run_unet(unet)
    tomediff.apply_tome(unet, ratio=0.5, generator=torch.Generator().manual_seed(9))
    b = run_unet(unet)
    tomediff.apply_tome(unet, ratio=0.5, seed=9)
    c = run_unet(unet)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_pixart_dit_merges_on_its_patch_grid() -> None:
    model = tiny_pixart()
    sample = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    caption = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    kwargs = dict(encoder_hidden_states=caption, timestep=torch.tensor([10, 10]))
    with torch.no_grad():
        base = model(sample, **kwargs).sample
        handle = tomediff.apply_tome(model, ratio=0.5)
        out = model(hidden_states=sample, **kwargs).sample
        handle.remove()
        assert torch.equal(model(sample, **kwargs).sample, base)
    report = handle.report()
    assert report.adapter == "diffusers-dit" and len(report.blocks) == 2
    assert all(
        (b.last_call.height, b.last_call.width, b.last_call.tokens_after_merge) == (8, 6, 24)
        for b in report.blocks
    )
    assert not torch.equal(out, base) and torch.isfinite(out).all()


def test_pixart_reduces_inside_its_self_attention_under_faster_cache() -> None:
    """FasterCache's defaults take PixArt's self-attentions (attn1), whose tokens tomediff then reduces
    at the attention call inside: what the cache extrapolates at a skipped step is its rule applied to
    full-order outputs of the steps it computed."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    model = tiny_pixart()
    now = [1000]
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 681),  # t=1000 computes; then every other call
        current_timestep_callback=lambda: now[0],
        attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True,
    )
    apply_faster_cache(model, config)
    handle = tomediff.apply_tome(model, ratio=0.5)
    attn = model.transformer_blocks[0].attn1
    outputs: list[torch.Tensor] = []
    computed: list[int] = []
    attn.register_forward_hook(lambda m, a, out: outputs.append(out))  # after tomediff's hooks
    attn.to_q.register_forward_pre_hook(lambda m, a: computed.append(len(outputs)))
    sample = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    caption = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (1000, 500, 400):
            now[0] = t
            out = model(sample, encoder_hidden_states=caption, timestep=torch.tensor([t, t])).sample
    assert computed == [0, 2] and torch.isfinite(out).all()
    assert torch.equal(outputs[1], outputs[0] + (outputs[0] - outputs[0]) * 0.5)
    assert handle.report().effective_ratio == 0.5
    handle.remove()


def test_unet_taylorseer_inside_a_merged_attention_sees_full_order_outputs() -> None:
    """A cache on a module inside the merged attention (its ``to_out``): the tokens are reduced at the
    attention call instead, so ``to_out`` sees, and the cache keeps, full-order outputs; its forecast is
    its first-order rule on them."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    unet = tiny_sd_unet()
    handle = tomediff.apply_tome(unet, ratio=0.5)
    config = TaylorSeerCacheConfig(
        cache_interval=2,
        disable_cache_before_step=1,
        cache_identifiers=[r".*attn1\.to_out\.0"],
        taylor_factors_dtype=torch.float32,
    )
    apply_taylorseer_cache(unet, config)
    # What CacheMixin.cache_context does for the models that have it (the UNet has not).
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(unet, CacheContext(name="cond"))
    to_out = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0]
    outputs: list[torch.Tensor] = []
    to_out.register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        for _ in range(4):
            assert torch.isfinite(run_unet(unet)).all()
    slope = (outputs[2] - outputs[0]) / 2  # computed at calls 0 and 2, forecast at 1 and 3
    assert torch.equal(outputs[1], torch.zeros_like(outputs[0]) + outputs[0] * 1.0)
    assert torch.equal(outputs[3], torch.zeros_like(outputs[2]) + outputs[2] * 1.0 + slope * 1.0)
    assert handle.report().effective_ratio == 0.5
    handle.remove()


def test_unet_refuses_a_cache_on_a_merged_feed_forward() -> None:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    unet = tiny_sd_unet()
    config = TaylorSeerCacheConfig(cache_interval=2, cache_identifiers=[r".*transformer_blocks\.0\.ff"])
    apply_taylorseer_cache(unet, config)
    where = r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.ff"
    with pytest.raises(
        tomediff.ConflictingPatchError, match=f"TaylorSeer cache keeps the output of '{where}'"
    ):
        tomediff.apply_tome(unet, ratio=0.5, merge_mlp=True)
    assert not unet.down_blocks[0].attentions[0].transformer_blocks[0].ff._forward_pre_hooks
    tomediff.apply_tome(unet, ratio=0.5)  # the feed-forward left unmerged: no conflict


def test_controlnet_residuals_and_patched_controlnet() -> None:
    from diffusers import ControlNetModel

    unet = tiny_sd_unet()
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    sample, timestep, context = unet_inputs()
    cond_image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def run() -> torch.Tensor:
        with torch.no_grad():
            down, mid = controlnet(sample, timestep, context, controlnet_cond=cond_image, return_dict=False)
            return unet(
                sample,
                timestep,
                context,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample

    base = run()
    unet_handle = tomediff.apply_tome(unet, ratio=0.5)
    control_handle = tomediff.apply_tome(controlnet, ratio=0.5)
    out = run()
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)
    assert (
        control_handle.adapter == "diffusers-unet"
        and control_handle.report().blocks[0].last_call.tokens == 1024
    )
    assert unet_handle.report().blocks[0].last_call.tokens_after_merge == 512
    unet_handle.remove()
    control_handle.remove()
    assert torch.equal(run(), base)


def test_pipeline_object_patches_its_unet() -> None:
    class FakePipeline:  # what matters: not a Module, has .unet (like DiffusionPipeline)
        def __init__(self, unet: nn.Module) -> None:
            self.unet = unet

    unet = tiny_sd_unet()
    pipe = FakePipeline(unet)
    handle = tomediff.apply_tome(pipe)
    assert handle.model is unet and handle.num_blocks == 3
    tomediff.remove_tome(pipe)
    assert not unet.down_blocks[0].attentions[0].transformer_blocks[0]._forward_pre_hooks


def test_forward_chunking_works_and_mlp_merge_says_why_not() -> None:
    unet = tiny_sd_unet()
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block.set_chunk_feed_forward(2, dim=1)  # what UNet3D's enable_forward_chunking does
    tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    chunked = run_unet(unet)
    tomediff.apply_tome(unet, ratio=0.5, merge_mlp=True)
    with pytest.raises(
        RuntimeError, match="merge_mlp=True cannot be used while feed-forward chunking"
    ) as info:
        run_unet(unet)
    # The fix the message names must exist on this diffusers (a UNet2DConditionModel has no
    # disable_forward_chunking()): run the loop it gives, literally.
    message = str(info.value)
    assert not hasattr(unet, "disable_forward_chunking") and "disable_forward_chunking" not in message
    loop = message[message.index("for m in model.modules()") : message.index("), or apply")]
    exec(loop, {"model": unet})
    assert all(block._chunk_size is None for block in blocks)
    tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    assert_close(chunked, run_unet(unet), atol=1e-5)


def test_custom_attention_processor_still_runs_on_merged_tokens() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    seen: list[int] = []

    class CountingProcessor(AttnProcessor):
        def __call__(self, attn, hidden_states, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(hidden_states.shape[1])
            return super().__call__(attn, hidden_states, *args, **kwargs)

    unet = tiny_sd_unet()
    unet.set_attn_processor(CountingProcessor())
    tomediff.apply_tome(unet, ratio=0.5)
    run_unet(unet)
    assert seen.count(512) == 3  # the three level-1 self-attentions see merged tokens


def test_self_attention_mask_is_merged() -> None:
    torch.manual_seed(0)
    from diffusers.models.attention import BasicTransformerBlock

    block = BlockStack([BasicTransformerBlock(DIM, 2, 8)]).eval()
    sample = torch.randn(2, DIM, 4, 4)
    mask = torch.zeros(2, 1, 16)
    mask[:, :, 3] = -10000.0
    seen: list[tuple[int, ...]] = []
    attn1 = block.blocks[0].attn1
    tomediff.apply_tome(block, ratio=0.5)
    # registered after the patch, so it sees what the attention itself receives
    attn1.register_forward_pre_hook(
        lambda m, a, k: seen.append(tuple(k["attention_mask"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        out = block(sample, attention_mask=mask)
    assert seen == [(2, 1, 8)] and torch.isfinite(out).all()


class LDMCrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v


class BasicTransformerBlock(nn.Module):  # the LDM/CompVis layout, found by class name
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1, self.attn2 = LDMCrossAttention(dim), LDMCrossAttention(dim, context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.disable_self_attn = False

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        return tokens.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::2, ::2]


class Upsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bilinear, not nearest: duplicated tokens would make the matching's ties decide the test
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear")


class Step(nn.Sequential):  # like LDM's TimestepEmbedSequential: passes context to transformers
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, context) if isinstance(layer, SpatialTransformer) else layer(x)
        return x


class LDMUNetModel(nn.Module):
    def __init__(self, dim: int = 8, context_dim: int = 6) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList(
            [
                Step(SpatialTransformer(dim, context_dim)),
                Step(Downsample()),
                Step(SpatialTransformer(dim, context_dim)),
            ]
        )
        self.middle_block = Step(SpatialTransformer(dim, context_dim))
        self.output_blocks = nn.ModuleList(
            [
                Step(SpatialTransformer(dim, context_dim), Upsample()),
                Step(SpatialTransformer(dim, context_dim)),
            ]
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            x = block(x, context)
        return x


class LatentDiffusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LDMUNetModel()


@pytest.mark.parametrize("max_downsample", [1, 2])
def test_ldm_layout_equals_tomesd(max_downsample: int) -> None:
    torch.manual_seed(0)
    ldm = LatentDiffusion().eval()
    unet = ldm.model.diffusion_model
    x = torch.randn(2, 8, 12, 10, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 1])
    with torch.no_grad():
        base = unet(x, t, context)
        tomesd.apply_patch(ldm, ratio=0.5, use_rand=False, max_downsample=max_downsample, merge_mlp=True)
        reference = unet(x, t, context)
        tomesd.remove_patch(ldm)
        handle = tomediff.apply_patch(
            ldm, ratio=0.5, use_rand=False, max_downsample=max_downsample, merge_mlp=True
        )
        ours = unet(x, t, context)
        tomediff.remove_patch(ldm)
        assert torch.equal(unet(x, t, context), base)
    assert handle is ldm
    assert (reference - base).abs().max() > 1e-3
    assert_close(ours, reference, atol=2e-5)


def test_ldm_levels_are_read_from_the_layout() -> None:
    ldm = LatentDiffusion()
    handle = tomediff.apply_tome(ldm, max_downsample=2)
    assert handle.adapter == "ldm-unet"
    assert [(b.name, b.downsample) for b in handle.report().blocks] == [
        ("input_blocks.0.0.transformer_blocks.0", 1),
        ("input_blocks.2.0.transformer_blocks.0", 2),
        ("middle_block.0.transformer_blocks.0", 2),
        ("output_blocks.0.0.transformer_blocks.0", 2),
        ("output_blocks.1.0.transformer_blocks.0", 1),
    ]


def test_generic_module_finds_levels_at_call_time() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_sd_unet_3level()

        def forward(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.inner(sample, t, context).sample

    wrapper = Wrapper()
    handle = tomediff.apply_tome(wrapper, ratio=0.5, max_downsample=1)
    assert handle.adapter == "generic-blocks" and handle.num_blocks == 7
    sample, t, context = unet_inputs(height=24, width=20)
    with torch.no_grad():
        wrapper(sample, t, context)
    merged = {b.name: b.last_call for b in handle.report().blocks}
    levels = {s.downsample for s in merged.values()}
    assert levels == {1, 2, 4}
    assert all((s.tokens_after_merge < s.tokens) == (s.downsample == 1) for s in merged.values())
    # the report's level column shows the level told at call time
    rows = [line.split() for line in str(handle.report()).splitlines()[2:9]]
    assert {row[1] for row in rows} == {"1", "2", "4"}


def test_all_unets_build_the_same_plan_for_all_sites_combinations() -> None:
    # every combination of sites that is allowed really merges exactly those sites
    for attn, cross, mlp in itertools.product([False, True], repeat=3):
        if not (attn or cross or mlp):
            continue
        unet = tiny_sd_unet()
        block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
        tomediff.apply_tome(unet, ratio=0.5, merge_attn=attn, merge_crossattn=cross, merge_mlp=mlp)
        records = {name: RecordTokens(getattr(block, name)) for name in ("attn1", "attn2", "ff")}
        run_unet(unet)
        assert [records[n].counts[0] for n in ("attn1", "attn2", "ff")] == [
            512 if on else 1024 for on in (attn, cross, mlp)
        ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_merge_in_their_dtype(dtype: torch.dtype) -> None:
    unet = tiny_sd_unet().to(dtype)
    sample, timestep, context = unet_inputs()
    handle = tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    with torch.no_grad():
        out = unet(sample.to(dtype), timestep, context.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert handle.report().blocks[0].last_call.tokens_after_merge == 512
    handle.remove()
    reference = tiny_sd_unet()
    tomediff.apply_tome(reference, ratio=0.5, use_rand=False)
    assert_close(out.float(), run_unet(reference), atol=0.1, rtol=0.1)


def test_plan_is_released_after_the_last_merged_site() -> None:
    # The plan's index tensors must not stay alive through the (unmerged) feed-forward layer,
    # where a block's memory peak usually is.
    from tomediff.core.hooks import BlockPreHook

    unet = tiny_sd_unet()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    tomediff.apply_tome(unet, ratio=0.5)
    block_call = next(h.block for h in block._forward_pre_hooks.values() if isinstance(h, BlockPreHook))
    plan_alive_at_ff: list[bool] = []
    block.ff.register_forward_pre_hook(
        lambda module, args: plan_alive_at_ff.append(block_call.plan is not None)
    )
    plan_alive_at_attn2: list[bool] = []
    block.attn2.register_forward_pre_hook(
        lambda module, args: plan_alive_at_attn2.append(block_call.plan is not None)
    )
    run_unet(unet)
    assert plan_alive_at_attn2 == [False] and plan_alive_at_ff == [False]
    tomediff.apply_tome(unet, ratio=0.5, merge_mlp=True)
    block_call = next(h.block for h in block._forward_pre_hooks.values() if isinstance(h, BlockPreHook))
    plan_alive_at_ff.clear()
    run_unet(unet)
    assert plan_alive_at_ff == [True] and block_call.plan is None
