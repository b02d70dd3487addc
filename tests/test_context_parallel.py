"""Token reduction under diffusers' context parallelism: two CPU processes on the gloo backend, a tiny
Wan transformer split by Ulysses attention, compared with the same reduction in one process."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
SETTINGS: dict[str, dict[str, Any]] = {
    "downsample": {"method": "downsample"},
    "merge": {"ratio": 0.5, "use_rand": False},
    "kv_ratio": {"ratio": 0.25, "kv_ratio": 0.5, "use_rand": False},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)[0]


def _rank_checks() -> dict[str, Any]:
    """What one rank measures: outputs without parallelism, then the same under Ulysses."""
    import tomediff
    from test_dit_families import tiny_wan, wan_inputs

    # diffusers picks the rank's device as rank % torch.accelerator.device_count(), 0 without a GPU.
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    model = tiny_wan()
    args, kwargs = wan_inputs(batch=1, frames=2, height=8, width=8)  # 2 x 4 x 4 tokens: 16 per rank
    plain = _run(model, args, kwargs)
    single = {}
    for name, options in SETTINGS.items():
        with tomediff.tome(model, **options):
            single[name] = _run(model, args, kwargs)
    model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=WORLD))
    split_plain = _run(model, args, kwargs)
    result: dict[str, Any] = {"plain": (split_plain - plain).abs().max().item()}
    for name, options in SETTINGS.items():
        handle = tomediff.apply_tome(model, **options)
        split = _run(model, args, kwargs)
        handle.remove()
        result[name] = ((split - single[name]).abs().max().item(), (split - plain).abs().max().item())
    result["removed"] = torch.equal(_run(model, args, kwargs), split_plain)

    ring = tiny_wan()
    ring.enable_parallelism(config=diffusers.ContextParallelConfig(ring_degree=WORLD))
    tomediff.apply_tome(ring, method="downsample")
    try:
        _run(ring, args, kwargs)
        result["ring"] = "no error"
    except tomediff.MergeCallError as error:
        result["ring"] = str(error)
    return result


def _worker(rank: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        queue.put((rank, _rank_checks()))
    except Exception as error:  # reported to the test, which fails with it
        queue.put((rank, "".join(traceback.format_exception(error))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch and diffusers: ~30 s of CPU
def test_ulysses_reduction_matches_one_process_and_ring_is_refused() -> None:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, port, queue)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    results = dict(queue.get() for _ in range(WORLD))
    for rank in range(WORLD):
        result = results[rank]
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
        assert result["plain"] < 1e-5, result
        for name in SETTINGS:
            to_single, to_plain = result[name]
            assert to_single < 1e-5, f"rank {rank} {name}: differs from one process by {to_single}"
            assert to_plain > 1e-3, f"rank {rank} {name}: reduced nothing"
        assert result["removed"]
        assert "ring attention (ring_degree=2)" in result["ring"], result["ring"]
        assert "ulysses_degree" in result["ring"]
