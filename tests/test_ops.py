"""The pure tensor functions: partition, matching, merge/unmerge, masks."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from tomediff.ops import (
    KeepPlan,
    attention_merge_plan,
    best_dst_for_src,
    draw_dst_offsets,
    grid_partition,
    grouped_attention_merge_plan,
    plan_merge,
    reduced_attention,
)

tomesd_merge = pytest.importorskip("tomesd.merge")


@pytest.mark.parametrize(
    ("height", "width", "sx", "sy"), [(8, 8, 2, 2), (7, 9, 2, 2), (6, 10, 3, 2), (5, 5, 2, 3)]
)
def test_partition_has_one_dst_per_full_window(height: int, width: int, sx: int, sy: int) -> None:
    gen = torch.Generator().manual_seed(0)
    part = grid_partition(height, width, sx, sy, draw_dst_offsets(height, width, sx, sy, gen))
    assert part.num_dst == (height // sy) * (width // sx)
    assert sorted(torch.cat([part.dst_idx, part.src_idx]).tolist()) == list(range(height * width))
    rows, cols = part.dst_idx // width, part.dst_idx % width
    windows = sorted(zip((rows // sy).tolist(), (cols // sx).tolist(), strict=True))
    assert windows == sorted({(i, j) for i in range(height // sy) for j in range(width // sx)})
    # leftover rows/columns of grids that are not multiples of the window are always src
    assert int(rows.max()) < (height // sy) * sy and int(cols.max()) < (width // sx) * sx


def test_top_left_partition_without_generator() -> None:
    part = grid_partition(4, 4, 2, 2, draw_dst_offsets(4, 4, 2, 2, None))
    assert part.dst_idx.tolist() == [0, 2, 8, 10]


def test_offsets_come_from_the_given_generator_only() -> None:
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a = draw_dst_offsets(16, 16, 2, 2, torch.Generator().manual_seed(7))
    b = draw_dst_offsets(16, 16, 2, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and int(a.max()) <= 3 and len(a.unique()) > 1
    assert torch.equal(torch.get_rng_state(), global_state)


def test_chunked_matching_equals_one_block() -> None:
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 24 * 20, 16, generator=gen)
    part = grid_partition(24, 20, 2, 2, draw_dst_offsets(24, 20, 2, 2, gen))
    score_full, choice_full = best_dst_for_src(metric, part, max_score_elements=1 << 30)
    score_chunked, choice_chunked = best_dst_for_src(metric, part, max_score_elements=2 * part.num_dst * 7)
    assert torch.equal(choice_full, choice_chunked)
    assert_close(score_chunked, score_full, atol=1e-6)
    # the score is the cosine similarity of each src token to its chosen dst
    unit = metric / metric.norm(dim=-1, keepdim=True)
    src, dst = unit[:, part.src_idx], unit[:, part.dst_idx]
    cosine = (src @ dst.transpose(1, 2)).max(dim=-1).values
    assert_close(score_full, cosine, atol=1e-5)


@pytest.mark.parametrize(("height", "width", "ratio"), [(16, 16, 0.5), (7, 9, 0.4), (12, 8, 0.75)])
def test_merge_and_unmerge_equal_tomesd(height: int, width: int, ratio: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, height * width, 24, generator=gen)
    r = int(height * width * ratio)
    plan = plan_merge(x, grid_partition(height, width, 2, 2, draw_dst_offsets(height, width, 2, 2, None)), r)
    merge, unmerge = tomesd_merge.bipartite_soft_matching_random2d(x, width, height, 2, 2, r, no_rand=True)
    ours, reference = plan.merge(x), merge(x)
    assert ours.shape == reference.shape == (3, height * width - r, 24)
    # token order inside the merged sequence is free (attention is permutation-equivariant)
    assert_close(ours.sort(dim=1).values, reference.sort(dim=1).values, atol=1e-6)
    # unmerge after any token-wise function (here a linear layer) must match tomesd's
    tokenwise = torch.nn.Linear(24, 24)
    with torch.no_grad():
        assert_close(plan.unmerge(tokenwise(ours)), unmerge(tokenwise(reference)), atol=1e-5)


def test_merge_is_a_mean_including_the_dst_token() -> None:
    # Tokens 1 and 2 duplicate dst 0; with r=2 exactly those merge and their slot is the mean.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]])
    part = grid_partition(1, 4, 2, 1, torch.tensor([[0, 1]]))  # dsts: token 0 and token 3
    plan = plan_merge(x, part, 2)
    merged = plan.merge(x)
    assert merged.shape == (1, 2, 2)
    assert_close(merged.sort(dim=1).values, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]).sort(dim=1).values)
    restored = plan.unmerge(merged)
    assert torch.equal(restored[0, 0], restored[0, 1]) and torch.equal(restored[0, 0], restored[0, 2])
    assert torch.equal(restored[0, 3], x[0, 3])


def test_unmerge_of_merge_preserves_unmerged_tokens_and_sums() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 8, generator=gen)
    plan = plan_merge(x, grid_partition(8, 8, 2, 2, draw_dst_offsets(8, 8, 2, 2, gen)), 20)
    restored = plan.unmerge(plan.merge(x))
    counts = torch.bincount(plan.local_slot[0], minlength=plan.num_merged)
    alone = counts[plan.local_slot[0]] == 1
    assert int((~alone).sum()) >= 21  # 20 removed tokens and at least one dst they joined
    assert torch.equal(restored[0, alone], x[0, alone])
    # averaging keeps each slot's sum, hence the total
    assert_close(restored.sum(dim=1), x.sum(dim=1), atol=1e-5)


def test_plan_is_none_when_nothing_can_merge() -> None:
    x = torch.randn(2, 5, 4)
    part = grid_partition(1, 5, 2, 2, draw_dst_offsets(1, 5, 2, 2, None))  # no full 2x2 window
    assert part.num_dst == 0
    assert plan_merge(x, part, 2) is None
    assert (
        plan_merge(torch.randn(2, 16, 4), grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long)), 0)
        is None
    )


def test_merge_rejects_tensors_of_another_call() -> None:
    x = torch.randn(2, 16, 4)
    plan = plan_merge(x, grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long)), 8)
    with pytest.raises(ValueError, match=r"\[batch=2, tokens=16, channels\]"):
        plan.merge(torch.randn(2, 15, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_are_preserved(dtype: torch.dtype) -> None:
    x = torch.randn(2, 64, 8).to(dtype)
    plan = plan_merge(x, grid_partition(8, 8, 2, 2, torch.zeros(4, 4, dtype=torch.long)), 32)
    merged = plan.merge(x)
    assert merged.dtype == dtype and plan.unmerge(merged).dtype == dtype
    assert_close(plan.merge(x.float()), merged.float(), atol=2e-2, rtol=2e-2)


def test_mask_merge_keeps_a_slot_if_any_token_is_attendable() -> None:
    x = torch.randn(2, 16, 4)
    plan = plan_merge(x, grid_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.long)), 8)
    bool_mask = torch.ones(1, 1, 16, dtype=torch.bool)
    bool_mask[..., 5] = False
    merged = plan.merge_mask(bool_mask, -1)
    assert merged.shape == (2, 1, 8) and merged.dtype == torch.bool
    expected = torch.zeros(2, 8, dtype=torch.bool)
    for b in range(2):
        expected[b].index_fill_(0, plan.local_slot[b][bool_mask[0, 0]], True)
    assert torch.equal(merged[:, 0], expected)
    bias = torch.where(bool_mask, 0.0, -10000.0).expand(2, 16, 16)
    merged_bias = plan.merge_mask(plan.merge_mask(bias, -1), -2)
    assert merged_bias.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="batch size 3"):
        plan.merge_mask(torch.ones(3, 1, 16), -1)


def test_keep_plan_copies_kept_tokens_back() -> None:
    x = torch.randn(2, 10, 3)
    plan = KeepPlan.build(2, 10, 6, x.device)
    merged = plan.merge(x)
    assert torch.equal(merged, x[:, :6])
    restored = plan.unmerge(merged)
    assert torch.equal(restored[:, :6], x[:, :6]) and torch.equal(restored[:, 6:], x[:, :4])


def test_attention_merge_plan_merges_queries_and_keys_at_their_ratios() -> None:
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 64, 8, generator=generator)
    plan = attention_merge_plan(metric, 8, 8, 0.25, 0.5, generator=torch.Generator().manual_seed(3))
    assert plan is not None and (plan.num_queries, plan.num_merged) == (48, 32)
    # The same partition as drawn by hand from the same seed, matched on the metric.
    offsets = draw_dst_offsets(8, 8, 2, 2, torch.Generator().manual_seed(3))
    by_hand = plan_merge(metric, grid_partition(8, 8, 2, 2, offsets), 32)
    assert by_hand is not None and torch.equal(plan.keys.local_slot, by_hand.local_slot)
    same = attention_merge_plan(metric, 8, 8, 0.5)
    assert same is not None and same.queries is same.keys
    assert attention_merge_plan(metric, 8, 8, 0.0, 0.0) is None
    keys_only = attention_merge_plan(metric, 8, 8, 0.0, 0.5)
    assert keys_only is not None and keys_only.queries is None and keys_only.num_queries == 64
    # Text tokens before the image keep their outputs' length; attention sees 4 + 48 queries.
    q, k, v = (torch.randn(2, 2, 4 + 64, 4, generator=generator) for _ in range(3))
    seen: list[tuple[int, int]] = []

    def attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: object = None
    ) -> torch.Tensor:
        seen.append((query.shape[2], key.shape[2]))
        return torch.nn.functional.scaled_dot_product_attention(query, key, value)

    out = reduced_attention(attention, plan, 4, q, k, v)
    assert out.shape == q.shape and seen == [(4 + 48, 4 + 32)]
    with pytest.raises(ValueError, match="not the 4x8 grid's 32"):
        attention_merge_plan(metric, 4, 8, 0.5)


def test_grouped_attention_merge_plan_merges_each_image_on_its_own_grid() -> None:
    """An 8x8 image then a 6x4 reference: each merged on its own grid at its own ratios, the same plans
    as attention_merge_plan on each slice with the generator drawn in span order."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 64 + 24, 8, generator=generator)
    grids, ratios = [(8, 8), (6, 4)], [(0.5, 0.75), (0.25, None)]
    plan = grouped_attention_merge_plan(metric, grids, ratios, generator=torch.Generator().manual_seed(3))
    assert plan is not None and (plan.num_queries, plan.num_merged) == (32 + 18, 16 + 18)
    drawn = torch.Generator().manual_seed(3)
    image = attention_merge_plan(metric[:, :64], 8, 8, 0.5, 0.75, generator=drawn)
    reference = attention_merge_plan(metric[:, 64:], 6, 4, 0.25, None, generator=drawn)
    assert image is not None and reference is not None
    assert torch.equal(plan.queries.plans[0].local_slot, image.queries.local_slot)
    assert torch.equal(plan.keys.plans[0].local_slot, image.keys.local_slot)
    assert torch.equal(plan.keys.plans[1].local_slot, reference.keys.local_slot)
    # No slot holds tokens of both images: the reference's slots come after the image's.
    slots = plan.keys.local_slot
    assert slots[:, :64].max() < 16 and slots[:, 64:].min() >= 16
    # Equal sides share one plan; a reference kept whole (0) and an image at 0 reduce nothing.
    shared = grouped_attention_merge_plan(metric, grids, [(0.5, None), (0.5, None)])
    assert shared is not None and shared.queries is shared.keys
    kept = grouped_attention_merge_plan(metric, grids, [(0.5, None), (0.0, None)])
    assert kept is not None and kept.queries.plans[1] is None and kept.num_queries == 32 + 24
    assert grouped_attention_merge_plan(metric, grids, [(0.0, None), (0.0, 0.0)]) is None
    q, k, v = (torch.randn(2, 2, 4 + 88, 4, generator=generator) for _ in range(3))
    out = reduced_attention(torch.nn.functional.scaled_dot_product_attention, plan, 4, q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"not \[B, N, C\] with the N=80 tokens"):
        grouped_attention_merge_plan(metric, [(8, 8), (4, 4)], ratios)
    with pytest.raises(ValueError, match="one \\(ratio, kv_ratio\\) per image grid"):
        grouped_attention_merge_plan(metric, grids, ratios[:1])
