"""The Triton kernels against the torch reference path (CPU: Triton's interpreter; CUDA when present)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_close
from tomediff.ops import best_dst_for_src, draw_dst_offsets, grid_partition, matching, plan_merge
from tomediff.ops.kernels import launch_best_dst, plan_slots_triton, scatter_add_triton, triton_enabled

pytest.importorskip("triton")

# CPU tensors run in Triton's interpreter (set up by conftest when there is no GPU).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = (["cpu"] if _INTERPRETING else []) + (["cuda"] if torch.cuda.is_available() else [])


def _exact_similarity(metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """``[B, Ns, Nd]`` cosine similarities in float64."""
    x = metric.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return x[:, src_idx] @ x[:, dst_idx].transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("batch", "height", "width", "channels", "sx", "sy"),
    [
        (1, 4, 4, 16, 2, 2),
        (2, 7, 9, 40, 2, 2),
        (3, 12, 10, 5, 2, 2),
        (2, 9, 14, 33, 3, 2),
        (1, 16, 16, 64, 2, 2),
    ],
)
def test_best_dst_kernel_matches_torch_in_fp32(
    device: str, batch: int, height: int, width: int, channels: int, sx: int, sy: int
) -> None:
    gen = torch.Generator().manual_seed(height * width + channels)
    offsets = draw_dst_offsets(height, width, sx, sy, gen).to(device)
    part = grid_partition(height, width, sx, sy, offsets)
    metric = torch.randn(batch, height * width, channels, generator=gen).to(device)
    score_t, choice_t = best_dst_for_src(metric, part, backend="triton")
    score_r, choice_r = best_dst_for_src(metric, part, backend="torch")
    assert score_t.dtype == torch.float32 and choice_t.dtype == torch.int64
    assert_close(score_t.cpu(), score_r.float().cpu(), atol=1e-5, rtol=1e-5)
    # Choices agree wherever the best dst is not within rounding of the runner-up.
    sims = _exact_similarity(metric.cpu(), part.src_idx.cpu(), part.dst_idx.cpu())
    top2 = sims.topk(min(2, part.num_dst), dim=-1).values
    clear = (
        (top2[..., 0] - top2[..., -1]) > 1e-5 if part.num_dst > 1 else torch.ones_like(top2[..., 0]).bool()
    )
    assert clear.float().mean() > 0.9
    assert torch.equal(choice_t.cpu()[clear], choice_r.cpu()[clear])
    assert torch.equal(choice_t.cpu()[clear], sims.argmax(-1)[clear])


@pytest.mark.parametrize("device", DEVICES)
def test_best_dst_kernel_breaks_ties_like_torch(device: str) -> None:
    # Every dst token is one of two vectors, so each src row ties between many dsts (exactly equal
    # dot products and norms): both paths must return the lowest dst index, as torch.max does.
    height, width, channels = 8, 10, 24
    part = grid_partition(height, width, 2, 2, torch.zeros(4, 5, dtype=torch.long, device=device))
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(2, height * width, channels, generator=gen)
    pair = torch.randn(2, channels, generator=gen)
    dst_cpu = part.dst_idx.cpu()
    metric[:, dst_cpu] = pair[torch.arange(part.num_dst) % 2]
    metric = metric.to(device)
    score_t, choice_t = best_dst_for_src(metric, part, backend="triton")
    score_r, choice_r = best_dst_for_src(metric, part, backend="torch")
    assert torch.equal(choice_t.cpu(), choice_r.cpu())
    assert set(choice_t.unique().tolist()) <= {0, 1}
    assert_close(score_t.cpu(), score_r.cpu(), atol=1e-5, rtol=1e-5)
    # Zero vectors (cosine similarity 0 everywhere) tie across all dsts too.
    metric[:, :] = 0
    score_t, choice_t = best_dst_for_src(metric, part, backend="triton")
    assert torch.equal(choice_t.cpu(), torch.zeros_like(choice_t.cpu()))
    assert torch.equal(score_t.cpu(), torch.zeros_like(score_t.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_best_dst_kernel_half_precision_picks_a_best_dst(device: str, dtype: torch.dtype) -> None:
    height, width, channels = 10, 12, 48
    gen = torch.Generator().manual_seed(11)
    part = grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, gen).to(device))
    metric = torch.randn(2, height * width, channels, generator=gen).to(device, dtype)
    score, choice = best_dst_for_src(metric, part, backend="triton")
    sims = _exact_similarity(metric.cpu(), part.src_idx.cpu(), part.dst_idx.cpu())
    best = sims.max(-1).values
    picked = sims.gather(-1, choice.cpu().unsqueeze(-1)).squeeze(-1)
    # The kernel accumulates in fp32 from the half inputs: its pick is optimal up to fp32 rounding.
    assert (best - picked).max() < 1e-5
    assert_close(score.cpu().double(), best, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scatter_add_kernel_sums_in_fp32(device: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    rows, channels, slots = 77, 37, 13
    slot = torch.randint(slots, (rows,), generator=gen).to(device)
    x = torch.randn(rows, channels, generator=gen).to(device, dtype)
    out = scatter_add_triton(x, slot, slots)
    expected = torch.zeros(slots, channels, dtype=torch.float64).index_add_(0, slot.cpu(), x.cpu().double())
    assert out.dtype == torch.float32
    assert_close(out.cpu().double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_from_kernel_equals_plan_from_torch(device: str) -> None:
    height, width = 16, 12
    gen = torch.Generator().manual_seed(8)
    part = grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, gen).to(device))
    x = torch.randn(2, height * width, 32, generator=gen).to(device)
    plan_t = plan_merge(x, part, 90, backend="triton")
    plan_r = plan_merge(x, part, 90, backend="torch")
    assert plan_t is not None and plan_r is not None
    assert torch.equal(plan_t.flat_slot, plan_r.flat_slot)
    assert torch.equal(plan_t.counts, plan_r.counts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_best_dst_kernel_dst_norms_inline_or_precomputed_agree(device: str, dtype: torch.dtype) -> None:
    # Small grids sum the dst norms inside the kernel, larger ones in a kernel of their own first.
    height, width, channels = 14, 18, 37
    gen = torch.Generator().manual_seed(21)
    part = grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, gen).to(device))
    metric = torch.randn(3, height * width, channels, generator=gen).to(device, dtype)
    score_in, choice_in = launch_best_dst(metric, part.src_idx, part.dst_idx, inline_norms=True)
    score_pre, choice_pre = launch_best_dst(metric, part.src_idx, part.dst_idx, inline_norms=False)
    assert_close(score_in.cpu(), score_pre.cpu(), atol=1e-6, rtol=1e-6)
    assert torch.equal(choice_in.cpu(), choice_pre.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scores", ["distinct", "ties", "nan"])
def test_slot_kernel_counted_ranks_equal_a_stable_sort(device: str, scores: str) -> None:
    # Small grids rank the src tokens by counting in the slot kernel; larger ones pass a sort's order.
    # Both give the same plan as a stable descending sort (equal scores: lower position first; NaN
    # first).
    height, width, batch = 12, 14, 3
    gen = torch.Generator().manual_seed(2)
    part = grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, gen).to(device))
    score = torch.randn(batch, part.num_src, generator=gen)
    if scores == "ties":
        score = score.round()  # a handful of distinct values
    elif scores == "nan":
        score[:, ::7] = float("nan")
    choice = torch.randint(part.num_dst, (batch, part.num_src), generator=gen)
    num_remove = part.num_src // 2 + 1
    ranked = score.argsort(dim=1, descending=True, stable=True)  # NaN first, ties in position order
    args = (score.to(device), choice.to(device), part.src_idx, part.dst_idx, num_remove)
    counted = plan_slots_triton(*args, order=None)
    sorted_ = plan_slots_triton(*args, order=ranked.to(device))
    assert torch.equal(counted[0].cpu(), sorted_[0].cpu())
    assert torch.equal(counted[1].cpu(), sorted_[1].cpu())
    # A plan: every slot holds as many tokens as its count says.
    num_merged = part.num_tokens - num_remove
    members = torch.bincount(counted[0].cpu(), minlength=batch * num_merged).float()
    assert torch.equal(members, counted[1].cpu().squeeze(1))


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_compile_as_opaque_ops(device: str) -> None:
    # Under torch.compile each launch is a custom op (shapes from its fake implementation): a whole
    # plan and a merge trace as one graph and give what eager gives, for both ranking modes.
    height, width = 10, 12
    gen = torch.Generator().manual_seed(4)
    part = grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, gen).to(device))
    x = torch.randn(2, height * width, 24, generator=gen).to(device, torch.float16)
    order = torch.randn(2, part.num_src, generator=gen).argsort(dim=1).to(device)

    def plan_and_merge(x: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan = plan_merge(x, part, 50, backend="triton")
        assert plan is not None
        score, choice = best_dst_for_src(x, part, backend="triton")
        given = plan_slots_triton(score, choice, part.src_idx, part.dst_idx, 50, order=order)
        return plan.flat_slot, plan.counts, plan.merge(x), *given

    torch._dynamo.reset()
    compiled = torch.compile(plan_and_merge, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(x, order), plan_and_merge(x, order), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", ["zero", "inf"])
@pytest.mark.parametrize("count_ranks", [True, False])
def test_plan_from_kernel_equals_plan_from_torch_with_tied_or_nan_scores(
    device: str, features: str, count_ranks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Zero tokens tie exactly (every score is 0); an inf feature gives a NaN score. Both ranking modes
    # of the Triton path (counted for small grids, sorted above COUNT_RANKS_MAX_SRC) and the torch path
    # must still agree on one plan. (Repeated nonzero tokens only nearly tie: the paths round their
    # cosines differently, so their order among such tokens may differ.)
    if not count_ranks:
        monkeypatch.setattr(matching, "COUNT_RANKS_MAX_SRC", 0)
    height, width = 12, 10
    gen = torch.Generator().manual_seed(6)
    part = grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, gen).to(device))
    x = torch.randn(2, height * width, 16, generator=gen)
    if features == "zero":
        x.zero_()
    else:
        x[0, part.src_idx[[2, 7]].cpu(), 0] = float("inf")
    x = x.to(device)
    plan_t = plan_merge(x, part, 40, backend="triton")
    plan_r = plan_merge(x, part, 40, backend="torch")
    assert plan_t is not None and plan_r is not None
    assert torch.equal(plan_t.flat_slot.cpu(), plan_r.flat_slot.cpu())
    assert torch.equal(plan_t.counts.cpu(), plan_r.counts.cpu())


def test_slot_kernel_refuses_a_removal_count_outside_the_src_tokens() -> None:
    part = grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long))
    score, choice = torch.zeros(1, part.num_src), torch.zeros(1, part.num_src, dtype=torch.long)
    with pytest.raises(ValueError, match=r"num_remove=17 must be in \[0, 12\]"):
        plan_slots_triton(score, choice, part.src_idx, part.dst_idx, 17)


def test_zero_channels_give_zero_similarity() -> None:
    part = grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long))
    score, choice = launch_best_dst(torch.randn(2, 16, 0), part.src_idx, part.dst_idx)
    assert torch.equal(score, torch.zeros(2, part.num_src)) and not choice.any()


def test_inline_norms_are_refused_with_large_tiles() -> None:
    part = grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long))
    tiles = {"BLOCK_S": 128, "BLOCK_D": 256, "BLOCK_C": 64, "num_warps": 8, "num_stages": 3}
    with pytest.raises(ValueError, match="inline_norms=True with 128x256 tiles"):
        launch_best_dst(torch.randn(1, 16, 8), part.src_idx, part.dst_idx, tiles, inline_norms=True)


def test_automatic_backend_uses_triton_only_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not triton_enabled(torch.zeros(1))
    if torch.cuda.is_available():
        assert triton_enabled(torch.zeros(1, device="cuda"))
        monkeypatch.setenv("TOMEDIFF_DISABLE_TRITON", "1")
        assert not triton_enabled(torch.zeros(1, device="cuda"))


def test_bad_backend_is_refused() -> None:
    part = grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton', got 'cuda'"):
        best_dst_for_src(torch.randn(1, 16, 4), part, backend="cuda")  # type: ignore[arg-type]
