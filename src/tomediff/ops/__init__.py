"""Pure tensor functions of token merging: partition, matching, merge/unmerge. No model imports."""

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

__all__ = [
    "Backend",
    "KeepPlan",
    "MergePlan",
    "Partition",
    "PlanConstants",
    "TokenPlan",
    "best_dst_for_src",
    "draw_dst_offsets",
    "grid_partition",
    "num_windows",
    "plan_constants",
    "plan_merge",
    "score_block_elements",
    "triton_enabled",
    "window_tokens",
]
