"""Child process of the CPU memory measurement: one configuration, one call, peak RSS.

Reads a JSON job on stdin, prints one JSON line: ``model_bytes`` (RSS with the model, inputs and
patch loaded, after a small warm-up call) and ``peak_bytes`` (peak RSS during one denoising call at
the requested resolution above that).
Run by :func:`tomediff.bench.measure.cpu_peak_in_subprocess`; not meant to be called by hand.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

import torch

from tomediff.bench.measure import forward, read_rss, reset_peak_rss
from tomediff.bench.models import build_model, get_model_spec, make_inputs
from tomediff.bench.runner import DTYPES, at_timestep
from tomediff.bench.variants import MergeSettings, make_variant

__all__ = ["run_job"]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    spec = get_model_spec(job["model"])
    dtype = DTYPES[job["dtype"]]
    model = build_model(spec, "cpu", dtype, seed=int(job.get("seed", 0)))
    inputs = make_inputs(spec, int(job["batch"]), int(job["resolution"]), "cpu", dtype, seed=1)
    if job.get("timestep") is not None:  # a variant timed over a trajectory: its first call
        inputs = at_timestep(spec, inputs, int(job["timestep"]))
    settings = MergeSettings(**job["settings"]) if job.get("settings") else None
    variant = make_variant(job["variant"], settings, job.get("label"))
    variant.apply(model)
    # A small call first pages in the code of every kernel the variant uses (shared-library pages
    # count in RSS, once per process); without it, a variant that uses more distinct kernels would
    # look a few MB hungrier per call than it is. Its tensors are freed (see CPU_MEMORY_ENV).
    small = make_inputs(spec, int(job["batch"]), 8 * spec.resolution_multiple, "cpu", dtype, seed=1)
    if job.get("timestep") is not None:
        small = at_timestep(spec, small, int(job["timestep"]))
    forward(model, small)
    del small
    gc.collect()
    if not reset_peak_rss():
        return {"error": "cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 is needed"}
    model_bytes, _ = read_rss()
    out = forward(model, inputs)
    _, peak = read_rss()
    del out
    variant.remove(model)
    return {"model_bytes": model_bytes, "peak_bytes": peak - model_bytes}


def main() -> int:
    job = json.loads(sys.stdin.read())
    result = run_job(job)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
