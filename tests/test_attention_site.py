"""The attention-call site: image keys/values (and queries) reduced at
``F.scaled_dot_product_attention`` inside diffusers attention modules, after rotary positions; Flux.1
and Wan 2.x through it (tiny random-weight configs)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import tomediff
from conftest import assert_close
from test_dit_models import TEXT, flux_inputs, run, tiny_flux, tome_hooks
from tomediff.errors import ConfigError, MergeCallError, NothingToPatchError
from tomediff.ops import (
    AttentionPlan,
    GridDownsample,
    downsample_video,
    grid_partition,
    plan_merge,
    reduced_attention,
    video_window_index,
)

diffusers = pytest.importorskip("diffusers")


class SdpaSpy(TorchFunctionMode):
    """Records the q/k/v of every attention call made while it is on (below tomediff's own mode, so
    it sees the tensors tomediff passes on)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = {**dict(zip(("query", "key", "value"), args, strict=False)), **kwargs}
            self.calls.append((named["query"].clone(), named["key"].clone(), named["value"].clone()))
        return func(*args, **kwargs)


def spy_run(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, SdpaSpy]:
    spy = SdpaSpy()
    with spy, torch.no_grad():
        out = model(*args, **kwargs)[0]
    return out, spy


# ops ------------------------------------------------------------------------------------------------


def test_video_window_index_and_downsample_against_hand_references() -> None:
    frames, height, width = 3, 5, 4
    x = torch.randn(2, frames * height * width, 6)
    grid = x.view(2, frames, height, width, 6)
    index = video_window_index(frames, height, width, 2, 2, 2)
    expected = [(t * height + y) * width + w for t in (0, 2) for y in (0, 2, 4) for w in (0, 2)]
    assert index.tolist() == expected
    assert torch.equal(
        downsample_video(x, frames, height, width, 2, 2, 2), grid[:, ::2, ::2, ::2].reshape(2, -1, 6)
    )
    avg = downsample_video(x, frames, height, width, 1, 2, 2, "avg").view(2, 3, 3, 2, 6)
    assert_close(avg[:, 1, 2, 1], grid[:, 1, 4, 2:4].mean(1))  # a partial window at the border
    assert_close(avg[:, 2, 0, 0], grid[:, 2, 0:2, 0:2].reshape(2, 4, 6).mean(1))
    assert downsample_video(x, frames, height, width, 1, 1, 1) is x
    plan = GridDownsample.build(2, frames * height, width, 2, "nearest", frames, 3)
    assert plan.num_merged == 1 * 3 * 2 and torch.equal(plan.reduce(x), x[:, plan.kept_index(x.device)])


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, **kw: Any
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)


@pytest.mark.parametrize("prefix", [0, 3])
def test_reduced_attention_keys_from_a_downsampled_grid_equal_a_hand_selection(prefix: int) -> None:
    height, width, batch = 4, 6, 2
    num = height * width
    q, k, v = (torch.randn(batch, 2, prefix + num, 8) for _ in range(3))
    plan = AttentionPlan(None, GridDownsample.build(batch, height, width, 2, "nearest"))
    kept = torch.cat([torch.arange(prefix), prefix + plan.keys.kept_index(q.device)])
    expected = _sdpa(q, k[:, :, kept], v[:, :, kept])
    assert torch.equal(reduced_attention(_sdpa, plan, prefix, q, k, v), expected)
    mask = torch.randn(batch, 1, prefix + num, prefix + num)  # an additive mask follows its key columns
    expected = _sdpa(q, k[:, :, kept], v[:, :, kept], mask[..., kept])
    assert torch.equal(reduced_attention(_sdpa, plan, prefix, q, k, v, mask), expected)


def test_reduced_attention_merges_queries_and_copies_their_output_back() -> None:
    height, width, batch, prefix = 4, 4, 2, 3
    num = height * width
    q, k, v = (torch.randn(batch, 2, prefix + num, 8) for _ in range(3))
    partition = grid_partition(height, width, 2, 2, torch.zeros(2, 2, dtype=torch.int64))
    merge = plan_merge(torch.randn(batch, num, 5), partition, 8)
    plan = AttentionPlan(merge, merge)
    out = reduced_attention(_sdpa, plan, prefix, q, k, v)

    def hand(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] image part merged by hand
        tokens = x[:, :, prefix:].transpose(1, 2).reshape(batch, num, -1)
        merged = merge.merge(tokens).view(batch, merge.num_merged, 2, 8).transpose(1, 2)
        return torch.cat([x[:, :, :prefix], merged], dim=2)

    small = _sdpa(hand(q), hand(k), hand(v))
    image = small[:, :, prefix:].transpose(1, 2).reshape(batch, merge.num_merged, -1)
    expected_image = merge.unmerge(image).view(batch, num, 2, 8).transpose(1, 2)
    assert_close(out[:, :, prefix:], expected_image)
    assert_close(out[:, :, :prefix], small[:, :, :prefix])  # text queries keep their own rows
    assert out.shape == q.shape


# Flux.1 -------------------------------------------------------------------------------------------------


def test_flux_downsample_reduces_image_keys_after_rotary_and_keeps_text_and_queries() -> None:
    model = tiny_flux()
    height, width = 5, 6  # odd height: the last row of windows is partial
    x, kwargs = flux_inputs(batch=3, height=height, width=width)
    reference, base = spy_run(model, x, **kwargs)
    handle = tomediff.apply_tome(model, method="downsample")
    out, spy = spy_run(model, x, **kwargs)
    kept_image = math.ceil(height / 2) * math.ceil(width / 2)
    assert len(spy.calls) == len(base.calls) == 4
    for (q, k, v), (q0, _, _) in zip(spy.calls, base.calls, strict=True):
        assert q.shape == q0.shape  # every query is kept
        assert k.shape[2] == v.shape[2] == TEXT + kept_image
    # First block: same inputs, so the kept keys are exactly the unpatched post-rotary keys of the
    # selected image tokens (each with its own position), and the text keys/values are untouched.
    (q, k, v), (q0, k0, v0) = spy.calls[0], base.calls[0]
    index = TEXT + video_window_index(1, height, width, 1, 2, 2)
    assert torch.equal(q, q0)
    assert torch.equal(k[:, :, :TEXT], k0[:, :, :TEXT]) and torch.equal(v[:, :, :TEXT], v0[:, :, :TEXT])
    assert torch.equal(k[:, :, TEXT:], k0[:, :, index]) and torch.equal(v[:, :, TEXT:], v0[:, :, index])
    assert not torch.equal(out, reference)
    handle.remove()
    assert tome_hooks(model) == 0 and torch.equal(run(model, x, kwargs), reference)


@pytest.mark.parametrize("ratio, kv_ratio", [(0.0, 0.5), (0.25, 0.5)])
def test_flux_asymmetric_ratios_count_queries_and_keys_separately(ratio: float, kv_ratio: float) -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs(batch=1, height=6, width=8)
    reference = run(model, x, kwargs)
    handle = tomediff.apply_tome(model, ratio=ratio, kv_ratio=kv_ratio, use_rand=False)
    out, spy = spy_run(model, x, **kwargs)
    num = 48
    for q, k, _ in spy.calls:
        assert q.shape[2] == TEXT + num - int(num * ratio)
        assert k.shape[2] == TEXT + num - int(num * kv_ratio)
    assert out.shape == reference.shape and not torch.equal(out, reference)
    handle.remove()
    assert torch.equal(run(model, x, kwargs), reference)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_flux_merged_tokens_carry_their_own_rotary_positions(ratio: float) -> None:
    """The first block's attention call gets the hand-merged post-rotary queries (``ratio``) and
    keys/values (``kv_ratio``) of the unpatched call: each token is rotated at its own position
    before it is merged, and the text rows are the unpatched ones."""
    model = tiny_flux()
    x, kwargs = flux_inputs(batch=2, height=4, width=4)
    _, base = spy_run(model, x, **kwargs)
    plans: list[Any] = []
    handle = tomediff.apply_tome(model, ratio=ratio, kv_ratio=0.5, use_rand=False)
    handle.watch(lambda event: plans.append(event.plan))
    _, spy = spy_run(model, x, **kwargs)
    q0, k0, v0 = base.calls[0]
    q, k, v = spy.calls[0]

    def hand(t: torch.Tensor, plan: Any) -> torch.Tensor:
        if plan is None:
            return t
        tokens = t[:, :, TEXT:].transpose(1, 2).reshape(2, 16, -1)
        merged = plan.merge(tokens).view(2, plan.num_merged, t.shape[1], -1).transpose(1, 2)
        return torch.cat([t[:, :, :TEXT], merged], dim=2)

    keys, queries = plans[0].keys, plans[0].queries
    assert (queries is None) == (ratio == 0)
    assert_close(q, hand(q0, queries))
    assert_close(k, hand(k0, keys))
    assert_close(v, hand(v0, keys))
    handle.remove()


def test_flux_ratio_zero_downsample_factor_one_and_errors() -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs()
    reference = run(model, x, kwargs)
    with tomediff.tome(model, method="downsample", downsample_factor=1):
        assert torch.equal(run(model, x, kwargs), reference)
    with pytest.raises(ConfigError, match="kv_ratio"):
        tomediff.ToMeConfig(kv_ratio=0.9)
    with pytest.raises(ConfigError, match="kv_ratio"):
        tomediff.ToMeConfig(method="downsample", kv_ratio=0.5)
    with pytest.raises(ConfigError, match="merge_mlp"):
        tomediff.ToMeConfig(kv_ratio=0.5, merge_mlp=True)
    with pytest.raises(ConfigError, match="neither"):
        tomediff.ToMeConfig(ratio=0.0, kv_ratio=0.0)
    with pytest.raises(ConfigError, match="downsample_factor_time"):
        tomediff.ToMeConfig(downsample_factor_time=2)
    assert tomediff.ToMeConfig(kv_ratio=0.5).replace(kv_ratio=None).kv_ratio is None
    with pytest.raises(NothingToPatchError, match="kv_ratio"):  # SD3/UNets declare no call sites
        tomediff.apply_tome(_tiny_unet(), kv_ratio=0.5)


def _tiny_unet() -> nn.Module:
    from conftest import tiny_sd_unet

    return tiny_sd_unet()


class _Hidden(TorchFunctionMode):
    """Computes SDPA out of sight of the modes below it, as a non-SDPA attention backend would."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            with torch._C.DisableTorchFunction():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:module forward hook with ``always_call=True``")
def test_an_attention_computed_without_sdpa_is_refused_and_the_mode_stack_is_left_clean() -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs(batch=1)
    attn = model.transformer_blocks[0].attn
    tomediff.apply_tome(model, method="downsample")

    def hide(module: nn.Module, args: Any, kw: Any) -> None:  # runs after tomediff's pre-hook
        torch._C._push_on_torch_function_stack(_Hidden())

    def unhide(module: nn.Module, args: Any, kw: Any, out: Any) -> None:  # and before its post-hook
        torch._C._pop_torch_function_stack()

    handles = [
        attn.register_forward_pre_hook(hide, with_kwargs=True),
        attn.register_forward_hook(unhide, with_kwargs=True, always_call=True, prepend=True),
    ]
    with pytest.raises(MergeCallError, match="saw no attention call"):
        run(model, x, kwargs)
    for handle in handles:
        handle.remove()
    assert torch.overrides._get_current_function_mode_stack() == []

    def fail(module: nn.Module, args: Any, kw: Any) -> None:
        raise RuntimeError("attention failed")

    handle = attn.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(RuntimeError, match="attention failed"):
        run(model, x, kwargs)
    handle.remove()
    assert torch.overrides._get_current_function_mode_stack() == []


def _context_parallel(ring: int = 1, ulysses: int = 1, anything: bool = False) -> SimpleNamespace:
    """What ``enable_parallelism()`` sets as every processor's ``_parallel_config`` (the fields read)."""
    config = SimpleNamespace(
        _world_size=ring * ulysses, ring_degree=ring, ulysses_degree=ulysses, ulysses_anything=anything
    )
    return SimpleNamespace(context_parallel_config=config)


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (
            _context_parallel(ring=2),
            r"context parallelism with ring attention \(ring_degree=2\).*ulysses_degree",
        ),
        (_context_parallel(ulysses=2, anything=True), "context parallelism with ulysses_anything=True"),
        (_context_parallel(ulysses=2), "joins text and image tokens in one sequence"),
    ],
)
def test_context_parallel_attention_is_refused(parallel: SimpleNamespace, message: str) -> None:
    model = tiny_flux()
    x, kwargs = flux_inputs(batch=1)
    processors = [block.attn.processor for block in model.transformer_blocks]
    handle = tomediff.apply_tome(model, method="downsample")
    report = str(handle.report())
    assert "method=downsample" in report
    for processor in processors:
        processor._parallel_config = parallel
    try:
        with pytest.raises(MergeCallError, match=message):
            run(model, x, kwargs)
    finally:
        for processor in processors:
            del processor._parallel_config
    assert torch.overrides._get_current_function_mode_stack() == []
    handle.remove()
    with tomediff.tome(model, ratio=0.25, kv_ratio=0.5) as handle:
        assert "kv_ratio=0.5" in str(handle.report())


def test_unflatten_inside_the_attention_mode_is_the_builtin_one() -> None:
    from tomediff.core.attention import _AttentionCallMode

    x = torch.arange(8.0).view(2, 4)
    with _AttentionCallMode(None, False, None, "block"):  # type: ignore[arg-type]
        plain = x.unflatten(1, (2, -1))  # the builtin torch.unflatten (traceable by torch.compile)
        by_keyword = x.unflatten(dim=1, sizes=(2, 2))
    assert torch.equal(plain, x.view(2, 2, 2)) and torch.equal(by_keyword, plain)
