"""Measurements of one denoising call: latency, FLOPs and peak memory."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from tomediff.bench.models import ModelInputs

__all__ = [
    "CPU_MEMORY_ENV",
    "count_flops",
    "cpu_peak_in_subprocess",
    "cuda_peak_bytes",
    "forward",
    "read_rss",
    "reset_peak_rss",
    "synchronize",
    "timed_forward",
]

# glibc keeps freed heap memory and, after freeing a large mmapped block, raises its mmap threshold
# so later blocks of that size come from the heap and are never returned. Both make RSS lag behind
# live memory. A fixed threshold (which also disables the adaptive one) makes every tensor above
# 64 KiB its own mapping, released on free, so a call's peak RSS reflects the tensors alive at once.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """One denoising call without autograd (as diffusers pipelines run it); returns the prediction."""
    with torch.no_grad():
        out = model(*inputs.args, **inputs.kwargs)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):  # a ModelOutput
        out = out.sample
    return out


def timed_forward(model: nn.Module, inputs: ModelInputs, device: torch.device) -> tuple[float, torch.Tensor]:
    """Wall time of one call, from a synchronised start to a synchronised end."""
    synchronize(device)
    start = time.perf_counter()
    out = forward(model, inputs)
    synchronize(device)
    return time.perf_counter() - start, out


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


def _flop_mapping() -> dict[Any, Any]:
    # On the CPU, SDPA dispatches to a flash kernel that torch's FLOP registry does not list (it
    # only lists the CUDA ones), so attention would count as zero FLOPs. Same formula as theirs.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _sdpa_flops}


def count_flops(model: nn.Module, inputs: ModelInputs) -> tuple[int, torch.Tensor]:
    """FLOPs of one call (matmuls, convolutions, attention; 1 multiply-add = 2 FLOPs), and its output.

    Counting runs the call for real, so it doubles as a warm-up call.
    """
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_flop_mapping())
    with counter:
        out = forward(model, inputs)
    return int(counter.get_total_flops()), out


def cuda_peak_bytes(model: nn.Module, inputs: ModelInputs, device: torch.device) -> tuple[int, int]:
    """``(peak bytes allocated during one call above what was allocated before it, bytes before)``."""
    synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = forward(model, inputs)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak), int(before)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def read_rss() -> tuple[int, int]:
    """``(current RSS, peak RSS since the last reset)`` of this process, in bytes (Linux)."""
    return _proc_status_kib("VmRSS") * 1024, _proc_status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def cpu_peak_in_subprocess(
    job: dict[str, Any], timeout: float | None = None, runner: Callable[..., Any] = subprocess.run
) -> dict[str, Any]:
    """Run one configuration in a fresh process (``tomediff.bench.worker``); returns its JSON result.

    A fresh process per configuration means no allocator state, cached buffers or peak from another
    variant can leak into the number.
    """
    env = {**os.environ, **CPU_MEMORY_ENV}
    proc = runner(
        [sys.executable, "-m", "tomediff.bench.worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        return {"error": f"memory worker failed (exit {proc.returncode}): {' | '.join(tail)}"}
    return dict(json.loads(lines[-1]))
