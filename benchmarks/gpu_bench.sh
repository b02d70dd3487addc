#!/usr/bin/env bash
# GPU numbers for docs/benchmarks.md (issue 3): SD 1.5 and SDXL base UNets at 512², 1024² and 2048²,
# fp16, diffusers' default SDPA attention processor, batch 2 (one image with CFG), ratio 0.5,
# merge_attn only, use_rand off; baseline vs tomediff vs tomesd 0.1.3 vs ideal, in one run per model.
# SDXL merges at max_downsample=2 (its 1x level has no transformer blocks; tomesd's default of 1 would
# patch nothing there) for all three merging variants alike.
#
# Budget: under 10 minutes on one H100 (each model run is capped with `timeout`; a capped run still
# leaves the other model's results). Results go to $OUT (default runs/gpu_bench): per model
# bench.json / bench.csv / speedup.png / the terminal table, plus versions.txt (card, driver, libraries).
#
# The GPU machine has no internet. It needs a Python with CUDA-enabled torch (>= 2.1); the other
# dependencies are installed from wheels carried in .whl/ (gitignored), prepared on a machine with
# internet and the same Python version, e.g.:
#   pip download --dest .whl --only-binary=:all: diffusers==0.42.1 tomesd==0.1.3 rich matplotlib numpy \
#       safetensors huggingface_hub
# (drop torch and its nvidia-* wheels if pip pulls them in: the machine's own torch is used).
#
# Usage:  bash benchmarks/gpu_bench.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_bench}"
mkdir -p "$OUT_DIR"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: $PY has no CUDA-enabled torch or sees no GPU" >&2
    exit 1
fi
if ! "$PY" -c "import diffusers, tomesd, rich, matplotlib" 2>/dev/null; then
    if [ -d .whl ]; then
        "$PY" -m pip install --quiet --no-index --find-links .whl diffusers tomesd rich matplotlib numpy
    else
        echo "gpu_bench.sh: diffusers/tomesd/rich/matplotlib missing and no .whl/ directory to install from" >&2
        exit 1
    fi
fi

# The package from this checkout, whether or not it is pip-installed there.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0))
for name in ("diffusers", "tomesd"):
    print(name, md.version(name))
EOF
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT_DIR/versions.txt"

run_model() {  # model, time cap in seconds
    local model="$1" cap="$2"
    echo "== $model (cap ${cap}s)"
    timeout "$cap" "$PY" -m tomediff.cli.bench_cmd \
        --model "$model" --resolution 512 1024 2048 --ratio 0.5 \
        --device cuda --dtype fp16 --batch 2 --repeats 10 --warmup 3 \
        --compare tomesd --out "$OUT_DIR/$model" 2>&1 | tee "$OUT_DIR/$model.log" || \
        echo "gpu_bench.sh: $model run failed or hit its ${cap}s cap; see $OUT_DIR/$model.log" >&2
}

start=$SECONDS
run_model sd15 210
run_model sdxl 330
echo "gpu_bench.sh: done in $((SECONDS - start)) s; results in $OUT_DIR"
