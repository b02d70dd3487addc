"""Pure tensor functions of token merging: partition, matching, merge/unmerge. No model imports."""

from tomediff.ops.attention import AttentionPlan, attention_merge_plan, paired_plan, reduced_attention
from tomediff.ops.caching import (
    changed_tokens,
    fill_from_cache,
    gather_tokens,
    scatter_tokens,
    strided_tokens,
)
from tomediff.ops.downsample import (
    DOWNSAMPLE_MODES,
    DownsampleMode,
    GridDownsample,
    downsample_grid,
    downsampled_grid,
)
from tomediff.ops.groups import (
    GroupedDownsample,
    GroupedPlan,
    combine_group_plans,
    group_starts,
    grouped_attention_merge_plan,
)
from tomediff.ops.kernels import triton_enabled
from tomediff.ops.matching import (
    Backend,
    PlanConstants,
    best_dst_for_src,
    plan_constants,
    plan_merge,
    score_block_elements,
)
from tomediff.ops.merge import KeepPlan, MergePlan, TokenPlan
from tomediff.ops.partition import Partition, draw_dst_offsets, grid_partition, num_windows, window_tokens
from tomediff.ops.tokens import (
    SharedMergePlan,
    merge_trailing,
    reduce_rotary,
    shared_metric,
    slot_positions,
    unmerge_trailing,
)
from tomediff.ops.video import downsample_video, downsampled_video, video_window_index

__all__ = [
    "DOWNSAMPLE_MODES",
    "AttentionPlan",
    "Backend",
    "DownsampleMode",
    "GridDownsample",
    "GroupedDownsample",
    "GroupedPlan",
    "KeepPlan",
    "MergePlan",
    "Partition",
    "PlanConstants",
    "SharedMergePlan",
    "TokenPlan",
    "attention_merge_plan",
    "best_dst_for_src",
    "changed_tokens",
    "combine_group_plans",
    "downsample_grid",
    "downsample_video",
    "downsampled_grid",
    "downsampled_video",
    "draw_dst_offsets",
    "fill_from_cache",
    "gather_tokens",
    "grid_partition",
    "group_starts",
    "grouped_attention_merge_plan",
    "merge_trailing",
    "num_windows",
    "paired_plan",
    "plan_constants",
    "plan_merge",
    "reduce_rotary",
    "reduced_attention",
    "scatter_tokens",
    "score_block_elements",
    "shared_metric",
    "slot_positions",
    "strided_tokens",
    "triton_enabled",
    "unmerge_trailing",
    "video_window_index",
    "window_tokens",
]
