"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import tomediff
from conftest import assert_close, tiny_sd_unet, unet_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls() -> Iterator[None]:
    """fp32 comparisons against the CPU and tomesd need IEEE fp32 products: TF32 (on by default for
    cuDNN convolutions, and often for matmuls) rounds them to 10 mantissa bits."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu_partition_and_tomesd(dtype: torch.dtype) -> None:
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_sd_unet().to("cuda", dtype)
    sample, timestep, context = (t.to("cuda") for t in unet_inputs())
    sample, context = sample.to(dtype), context.to(dtype)
    with torch.no_grad():
        tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
        reference = unet(sample, timestep, context).sample
        tomesd.remove_patch(unet)
        tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
        ours = unet(sample, timestep, context).sample
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert_close(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)


def test_cuda_random_partitions_match_cpu_and_are_deterministic() -> None:
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        outputs = []
        for device in ("cpu", "cuda", "cuda"):
            unet = tiny_sd_unet().to(device)
            sample, timestep, context = (t.to(device) for t in unet_inputs())
            tomediff.apply_tome(unet, ratio=0.5, seed=4)
            with torch.no_grad():
                outputs.append(unet(sample, timestep, context).sample.cpu())
        assert torch.equal(outputs[1], outputs[2])  # same seed, same device: bit-identical
        assert_close(outputs[1], outputs[0], atol=1e-4)  # same partitions on CPU and CUDA
    finally:
        torch.use_deterministic_algorithms(False)


def test_patched_call_never_syncs_with_the_host() -> None:
    unet = tiny_sd_unet().to("cuda", torch.float16)
    sample, timestep, context = (t.to("cuda") for t in unet_inputs())
    sample, context = sample.half(), context.half()
    for use_rand in (False, True):
        tomediff.apply_tome(unet, ratio=0.5, use_rand=use_rand)
        with torch.no_grad():
            unet(sample, timestep, context)  # builds the per-shape caches
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                unet(sample, timestep, context)
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_reduce_overhead_compile_matches_eager() -> None:
    torch._dynamo.reset()
    unet = tiny_sd_unet().to("cuda", torch.float16)
    sample, timestep, context = (t.to("cuda") for t in unet_inputs())
    sample, context = sample.half(), context.half()
    tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    with torch.no_grad():
        eager = unet(sample, timestep, context).sample
        compiled = torch.compile(unet, mode="reduce-overhead")
        for _ in range(3):  # recorded into a CUDA graph on the second call, replayed after
            out = compiled(sample, timestep, context).sample.clone()
    assert_close(out.float(), eager.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_merge_of_large_groups_is_finite_and_exact(dtype: torch.dtype) -> None:
    from tomediff.ops import grid_partition, plan_merge

    x = torch.full((2, 4096, 64), 50.0, dtype=dtype, device="cuda")
    part = grid_partition(64, 64, 2, 2, torch.zeros(32, 32, dtype=torch.long, device="cuda"))
    plan = plan_merge(x, part, 2048)
    merged = plan.merge(x)
    assert torch.equal(merged, torch.full_like(merged, 50.0))
