"""Pure tensor functions of token merging: partition, matching, merge/unmerge. No model imports."""

from tomediff.ops.matching import best_dst_for_src, plan_merge
from tomediff.ops.merge import KeepPlan, MergePlan, TokenPlan
from tomediff.ops.partition import Partition, draw_dst_offsets, grid_partition

__all__ = [
    "KeepPlan",
    "MergePlan",
    "Partition",
    "TokenPlan",
    "best_dst_for_src",
    "draw_dst_offsets",
    "grid_partition",
    "plan_merge",
]
