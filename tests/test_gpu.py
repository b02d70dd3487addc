"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

import tomediff
from conftest import assert_close, tiny_sd_unet, unet_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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
