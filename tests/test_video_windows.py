"""Video partitions: ``st × sy × sx`` windows that never cross a frame boundary (frames stacked in one
grid), the image case unchanged."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import tomediff
from tomediff.core.reducers import MatchReducer
from tomediff.errors import ConfigError
from tomediff.ops import grid_partition, num_windows, window_tokens


def frame_of(tokens: torch.Tensor, frame_height: int, width: int) -> torch.Tensor:
    return tokens.div(frame_height * width, rounding_mode="floor")


def test_windows_stay_in_their_frame_when_sy_does_not_divide_the_frame_height() -> None:
    frames, frame_height, width = 3, 5, 4
    height = frames * frame_height
    windows = window_tokens(height, width, 2, 2, frames=frames)
    assert windows.shape == (frames * 2 * 2, 4) == (num_windows(height, width, 2, 2, frames), 4)
    per_window = frame_of(windows, frame_height, width)
    assert torch.equal(per_window.min(1).values, per_window.max(1).values)  # no window crosses frames
    assert torch.equal(per_window[:, 0], torch.arange(frames).repeat_interleave(4))
    # The stacked 2-D windows would: rows 4-5 of the stacked grid join frames 0 and 1.
    stacked = frame_of(window_tokens(height, width, 2, 2), frame_height, width)
    assert bool((stacked.min(1).values != stacked.max(1).values).any())
    # Each frame's last row is src, and every token is dst or src exactly once.
    offsets = torch.randint(4, (windows.shape[0],), generator=torch.Generator().manual_seed(0))
    partition = grid_partition(height, width, 2, 2, offsets, frames=frames)
    assert torch.equal(partition.dst_idx, windows.gather(1, offsets.view(-1, 1)).view(-1))
    everything = torch.cat([partition.dst_idx, partition.src_idx]).sort().values
    assert torch.equal(everything, torch.arange(height * width))
    last_rows = [
        (f * frame_height + frame_height - 1) * width + x for f in range(frames) for x in range(width)
    ]
    assert set(last_rows) <= set(partition.src_idx.tolist())


def test_windows_span_st_frames_and_leftover_frames_are_src() -> None:
    frames, frame_height, width = 5, 3, 4
    height = frames * frame_height
    windows = window_tokens(height, width, 2, 2, frames=frames, st=2)
    assert windows.shape == (2 * 1 * 2, 8)  # 5 // 2 frame pairs, 3 // 2 rows, 4 // 2 columns
    per_window = frame_of(windows, frame_height, width)
    # Each window: its first sy*sx positions in frame 2g, the next in frame 2g + 1 (same place).
    assert torch.equal(per_window[:, :4], per_window[:, :1].expand(-1, 4) + 0)
    assert torch.equal(per_window[:, 4:], per_window[:, :1].expand(-1, 4) + 1)
    assert torch.equal(windows[:, 4:] - windows[:, :4], torch.full((4, 4), frame_height * width))
    partition = grid_partition(height, width, 2, 2, torch.zeros(4, dtype=torch.int64), frames=frames, st=2)
    assert set(range(4 * frame_height * width, height * width)) <= set(partition.src_idx.tolist())


@pytest.mark.parametrize(("frame_height", "sy"), [(4, 2), (6, 3)])
def test_frames_whose_height_sy_divides_keep_the_stacked_windows(frame_height: int, sy: int) -> None:
    frames, width = 3, 6
    height = frames * frame_height
    assert torch.equal(
        window_tokens(height, width, 2, sy, frames=frames), window_tokens(height, width, 2, sy)
    )
    offsets = torch.randint(
        2 * sy, (height // sy * (width // 2),), generator=torch.Generator().manual_seed(1)
    )
    video = grid_partition(height, width, 2, sy, offsets, frames=frames)
    stacked = grid_partition(height, width, 2, sy, offsets)
    assert torch.equal(video.dst_idx, stacked.dst_idx) and torch.equal(video.src_idx, stacked.src_idx)


@pytest.mark.parametrize("use_rand", [False, True])
def test_reducer_partitions_a_video_block_by_frame(use_rand: bool) -> None:
    config = tomediff.ToMeConfig(use_rand=use_rand)
    call = SimpleNamespace(offsets=None, grids={0: (3, 5, 4)}, input_size=None)
    generator = torch.Generator().manual_seed(0)
    state = SimpleNamespace(call=call, num_blocks=1, generator=generator, odd_batch_top_left=True)
    reducer = MatchReducer(config)
    partition = reducer.partition(state, 3 * 5, 4, 2, torch.device("cpu"), frames=3)  # type: ignore[arg-type]
    assert partition.num_dst == 3 * 2 * 2
    frames_of_dst = frame_of(partition.dst_idx, 5, 4)
    assert torch.equal(frames_of_dst, torch.arange(3).repeat_interleave(4))
    rows = partition.dst_idx.div(4, rounding_mode="floor").remainder(5)
    assert bool((rows < 4).all())  # never the frame's leftover last row


def test_st_is_validated() -> None:
    with pytest.raises(ConfigError, match="st must be a positive integer window size, got 0"):
        tomediff.ToMeConfig(st=0)
    with pytest.raises(ConfigError, match=r"st=2 .* method='merge' only .* downsample_factor_time"):
        tomediff.ToMeConfig(st=2, method="downsample")


@pytest.mark.parametrize("options", [{"use_rand": False}, {"use_rand": True}, {"st": 2}])
def test_wan_with_frames_sy_does_not_divide_merges_and_removes_cleanly(options: dict[str, Any]) -> None:
    from test_dit_families import tiny_wan, wan_inputs, wan_run

    model = tiny_wan()
    args, kwargs = wan_inputs(batch=2, frames=3, height=10, width=8)  # 3 frames of 5 x 4 tokens
    base = wan_run(model, args, kwargs)
    handle = tomediff.apply_tome(model, ratio=0.5, **options)
    out = wan_run(model, args, kwargs)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    stats = handle.report().blocks[0].last_call
    assert stats is not None and (stats.tokens, stats.tokens_after_merge) == (60, 60 - 30)
    assert ("st=2" in str(handle.report())) == ("st" in options)
    handle.remove()
    assert torch.equal(wan_run(model, args, kwargs), base)
