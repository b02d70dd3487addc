"""What makes merging pay on a GPU, checked on the CPU: no half-precision overflow, few launches per
matching, and torch.compile without graph breaks or recompiles."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from conftest import assert_close, tiny_pixart, tiny_sd_unet, tiny_sdxl_unet, unet_inputs
from tomediff.ops import draw_dst_offsets, grid_partition, plan_constants, plan_merge, window_tokens
from tomediff.ops.kernels import BEST_DST_LABEL, DST_NORM_LABEL, PLAN_SLOTS_LABEL, SCATTER_ADD_LABEL

TRITON_LABELS = {BEST_DST_LABEL, DST_NORM_LABEL, PLAN_SLOTS_LABEL, SCATTER_ADD_LABEL}

# ---------------------------------------------------------------------------------------------------
# 0. No overflow in half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_precision_groups_do_not_overflow(dtype: torch.dtype) -> None:
    # A flat region: every token equal, so every src ties for dst 0 and the top r all merge into it.
    # 2049 tokens of value 50 sum to 102450, beyond float16's largest finite value (65504).
    height = width = 64
    x = torch.full((2, height * width, 8), 50.0, dtype=dtype)
    part = grid_partition(height, width, 2, 2, torch.zeros(32, 32, dtype=torch.long))
    plan = plan_merge(x, part, height * width // 2)
    assert plan is not None
    assert int(plan.counts.max()) == height * width // 2 + 1  # one group of 2049 tokens
    merged = plan.merge(x)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    assert torch.equal(merged, torch.full_like(merged, 50.0))  # the mean of equal values, exactly


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_is_the_rounded_fp32_mean(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 256, 16, generator=gen) * 30).to(dtype)
    part = grid_partition(16, 16, 2, 2, draw_dst_offsets(16, 16, 2, 2, gen))
    plan = plan_merge(x.float(), part, 128)
    assert plan is not None
    expected = plan.merge(x.float()).to(dtype)  # fp32 sums, rounded once
    assert torch.equal(plan.merge(x), expected)


def test_fp64_merge_keeps_fp64_precision() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 64, 4, generator=gen, dtype=torch.float64)
    plan = plan_merge(x, grid_partition(8, 8, 2, 2, torch.zeros(4, 4, dtype=torch.long)), 40)
    assert plan is not None
    merged = plan.merge(x)
    slots = plan.local_slot[0]
    for slot in range(plan.num_merged):
        members = x[0, slots == slot]
        # Divided by an exact count in float64: equal to the float64 mean to the last bits.
        assert_close(merged[0, slot], members.sum(0) / members.shape[0], atol=1e-15, rtol=1e-15)


# ---------------------------------------------------------------------------------------------------
# 3. Launches per matching (CPU op count as the proxy for CUDA kernel launches)

# Ops that only create views or uninitialised memory: no kernel runs for them.
_NO_KERNEL_OPS = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::_unsafe_view",
    "aten::slice",
    "aten::select",
    "aten::expand",
    "aten::transpose",
    "aten::t",
    "aten::permute",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::as_strided",
    "aten::alias",
    "aten::detach",
    "aten::lift_fresh",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::split",
    "aten::unbind",
    "aten::narrow",
    "aten::result_type",
}
# No kernel unless they copy, which shows up as an aten op inside them.
_MAYBE_COPY_OPS = {"aten::to", "aten::contiguous", "aten::reshape", "aten::flatten"}


def _kernel_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Top-level aten ops of one call of ``fn`` that would launch a kernel on a GPU; a Triton launch
    (its profiler label) counts as one, whatever the interpreter does inside it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    launches = []
    for event in prof.events():
        if event.name in TRITON_LABELS:
            launches.append(event.name)
            continue
        if not event.name.startswith("aten::"):
            continue
        # Keep only top-level aten ops (an op inside another op or a Triton launch is part of it).
        parent = event.cpu_parent
        while (
            parent is not None and not parent.name.startswith("aten::") and parent.name not in TRITON_LABELS
        ):
            parent = parent.cpu_parent
        if parent is None and (event.name not in _MAYBE_COPY_OPS or event.cpu_children):
            launches.append(event.name)
    return Counter(name for name in launches if name not in _NO_KERNEL_OPS)


@pytest.mark.parametrize("use_rand", [False, True])
def test_matching_launches_no_more_kernels_than_tomesd(use_rand: bool) -> None:
    # The path a CUDA tensor takes (Triton similarity kernel), run here in Triton's interpreter.
    pytest.importorskip("triton")
    tomesd_merge = pytest.importorskip("tomesd.merge")
    side, batch, channels = 16, 2, 64  # launches do not grow with N; the interpreter does
    num_remove = side * side // 2
    x = torch.randn(batch, side * side, channels, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)

    def ours() -> None:
        # What a block call costs in tomediff: partitions with use_rand off and the plan's index
        # constants are built once per shape; random offsets arrive with the call (one slice).
        if use_rand:
            part = grid_partition(side, side, 2, 2, table[0, : (side // 2) ** 2], windows=windows)
        else:
            part = fixed
        plan_merge(x, part, num_remove, constants=constants, backend="triton")

    def theirs() -> None:
        tomesd_merge.bipartite_soft_matching_random2d(
            x, side, side, 2, 2, num_remove, no_rand=not use_rand, generator=generator
        )

    table = torch.randint(4, (3, (side // 2) ** 2))
    windows = window_tokens(side, side, 2, 2)
    fixed = grid_partition(side, side, 2, 2, torch.zeros(side // 2, side // 2, dtype=torch.long))
    constants = plan_constants(batch, fixed.num_dst, fixed.num_src, num_remove, x.device)
    ours()
    theirs()  # warm-up of both
    ours_ops, theirs_ops = _kernel_ops(ours), _kernel_ops(theirs)
    assert sum(ours_ops.values()) <= sum(theirs_ops.values()), (ours_ops, theirs_ops)
    if not use_rand:  # similarity (dst norms inline at this size), counts, ranks + slots: 3 launches
        assert sum(ours_ops.values()) == 3, ours_ops
    assert "aten::nonzero" not in ours_ops  # nonzero syncs with the host on a GPU
    assert "aten::item" not in ours_ops and "aten::_local_scalar_dense" not in ours_ops


def test_patched_block_call_makes_no_host_copies() -> None:
    # With a CUDA model, tensors built on the CPU inside a block would each be one host-to-device copy
    # per call. On the CPU the proxy is: no aten::randint / aten::nonzero inside blocks, and the
    # partition draw happens once per model call.
    unet = tiny_sd_unet()
    tomediff.apply_tome(unet, ratio=0.5, use_rand=True)
    sample, timestep, context = unet_inputs()
    with torch.no_grad():
        unet(sample, timestep, context)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            unet(sample, timestep, context)
    names = Counter(e.name for e in prof.events())
    assert names["aten::randint"] == 1  # one draw for every block of the call
    assert names["aten::nonzero"] == 0


# ---------------------------------------------------------------------------------------------------
# 4. torch.compile: no graph breaks inside patched blocks, no recompiles across calls


def _sd_case() -> tuple[nn.Module, Callable[[nn.Module, int], Any]]:
    unet = tiny_sd_unet()
    sample, _, context = unet_inputs()
    return unet, lambda model, step: model(sample, torch.tensor(999 - 100 * step), context).sample


def _sdxl_case() -> tuple[nn.Module, Callable[[nn.Module, int], Any]]:
    from conftest import sdxl_added_cond

    unet = tiny_sdxl_unet()
    sample, _, context = unet_inputs()
    added = sdxl_added_cond(2)
    return (
        unet,
        lambda model, step: (
            model(sample, torch.tensor(999 - 100 * step), context, added_cond_kwargs=added).sample
        ),
    )


def _pixart_case() -> tuple[nn.Module, Callable[[nn.Module, int], Any]]:
    model = tiny_pixart()
    sample = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    caption = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    return (
        model,
        lambda m, step: (
            m(sample, encoder_hidden_states=caption, timestep=torch.tensor([999 - 100 * step] * 2)).sample
        ),
    )


CASES = {"sd15": _sd_case, "sdxl": _sdxl_case, "pixart": _pixart_case}


def _compile_counts(case: str, use_rand: bool, calls: int = 5) -> tuple[list[str], int, int]:
    """Graph-break reasons, unique graphs after the first call and after ``calls`` calls."""
    from torch._dynamo.utils import counters

    model, run = CASES[case]()
    tomediff.apply_tome(model, ratio=0.5, use_rand=use_rand)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")  # dynamo's graphs and guards; no codegen
    with torch.no_grad():
        run(compiled, 0)
        after_first = counters["stats"]["unique_graphs"]
        for step in range(1, calls):
            run(compiled, step)
    breaks = [reason for reason, count in counters["graph_break"].items() for _ in range(count)]
    return breaks, after_first, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiles_without_graph_breaks_or_recompiles(case: str) -> None:
    breaks, after_first, after_all = _compile_counts(case, use_rand=False)
    assert breaks == []
    assert after_all == after_first  # every later denoising call reuses the graphs of the first


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_partitions_break_only_at_the_per_call_draw(case: str) -> None:
    breaks, after_first, after_all = _compile_counts(case, use_rand=True)
    # The CPU generator's draw runs eagerly once per call, before any block; nothing inside blocks.
    assert breaks and all("ToMeState._begin" in reason for reason in breaks)
    assert after_all == after_first


def test_compiled_merged_output_equals_eager_merged_output() -> None:
    torch._dynamo.reset()
    unet, run = _sd_case()
    handle = tomediff.apply_tome(unet, ratio=0.5, use_rand=True, seed=3)
    with torch.no_grad():
        eager = [run(unet, step) for step in range(2)]
        handle.reseed()
        compiled = torch.compile(unet)
        outputs = [run(compiled, step) for step in range(2)]
    for got, expected in zip(outputs, eager, strict=True):
        assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert handle.report().calls == 4  # calls are still counted when compiled with use_rand
