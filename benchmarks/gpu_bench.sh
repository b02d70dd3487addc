#!/usr/bin/env bash
# GPU numbers for docs/benchmarks.md (issue 7), as one prepared command run in parts, each with a time
# cap. Default PARTS="tests ops eager compiled"; pick others with PARTS="...". Times measured on an H100
# (2026-11-27): tests over 70 s (cap now 150), sweep 80 s, profile about 27 s per model, eager 100 s,
# compiled more than 150 s at 1024 alone (three variants compile; cap now 300).
#   tests     pytest -m gpu plus the Triton kernel tests on CUDA (tests/test_kernels.py, test_gpu.py)
#   sweep     benchmarks/kernel_sweep.py: the fused best-dst kernel over candidate tiles at SD/SDXL/PixArt
#             shapes, beside the torch path and tomesd (and an earlier kernels.py given as PREVIOUS_KERNELS),
#             an experimental variant that keeps the src tile on chip (C = 320/640), plus host and device
#             time of one plan_merge
#   profile   benchmarks/profile_merge.py on CUDA: kernels per call, kernel time and GPU busy fraction of
#             baseline / tomediff / ideal, SD 1.5 at 512/1024 and PixArt-alpha at 1024 (PROFILES="sd15:512"
#             for one)
#   ops       benchmarks/ops_bench.py: matching and merge+unmerge vs tomesd at N = 4096/16384/65536, fp16,
#             the torch reference path beside the Triton kernel, SDPA on N and N-r, peak memory at 65536
#   eager     tomediff bench, fp16, batch 2, ratio 0.5, self-attention only, use_rand off, baseline vs
#             tomediff vs tomesd 0.1.3 vs ideal in one interleaved run per model: SD 1.5 at 512/1024/2048,
#             SDXL (max_downsample 2) at 2048, PixArt-alpha at 1024/2048
#   compiled  the same for SD 1.5 with every variant torch.compile'd at 1024 and 2048
#             (COMPILED_RESOLUTIONS="1024" for one; COMPILE_MODE=reduce-overhead for CUDA graphs, which
#             take away the host launch cost that bounds eager calls at 512-1024)
#   methods   issue 8: named settings side by side (tomesd's default, merge, downsample, merge+reuse, fast,
#             merge of two levels leaving grids of <= 4096 tokens alone, fast on two levels, ToDo x4 at the
#             top level and x2 at the next), fp16, batch 2: SD 1.5 at
#             1024/2048, SDXL at 1024/2048 (with the deeper level too); reuse settings timed over a
#             2-call trajectory
#   dits      issue 9: SD3-medium (bf16, batch 2) and FLUX.1-dev (bf16, batch 1), full published configs,
#             at 1024/2048: baseline vs tomediff vs ideal at ratio 0.5
#   video     issue 15: Wan 2.1 T2V 1.3B, whole transformer (30 blocks, published config), bf16, batch 1,
#             480p x 81 frames (832x480, 32,760 tokens): baseline vs method=downsample (keys/values x2 per
#             side), the same also x2 in time, kv_ratio 0.75 and 0.5 (queries kept; each with its ideal)
#             and merge at 0.5; the issue's target is at least 1.5x with downsampling x2 per side
#             (VIDEO_RESOLUTIONS="480 720" adds 1280x720, 75,600 tokens; not timed yet)
#   flux2     issue 15: FLUX.2-dev (published config, 32B parameters: 64 GB of bf16 weights), batch 1, at
#             1024/2048: baseline vs tomediff vs ideal at ratio 0.5 (not timed yet)
#   stack     issue 16: FLUX.1-dev (published config, random weights), bf16, batch 1, 1024², a whole
#             28-step trajectory (benchmarks/flux_trajectory.py, 2 interleaved rounds): unaccelerated vs
#             merge 0.3 outside the first and last block, token caching (refresh every 2nd step, a quarter
#             of the image tokens between; with a warm-up and the linear forecast, the 1,024-token DiT's
#             presets' schedules, and no image token computed between refreshes for the last two:
#             dit-tokencache-faster's and dit-tokencache-fastest's), FirstBlockCache 0.1, TaylorSeer (interval 3), MagCache with
#             the ratios its authors calibrated on FLUX.1-dev at diffusers' default (0.06/3/0.2) and at
#             the authors' Flux setting (E024K5R01), each alone and with merge 0.3 outside the first and
#             last block (the recommended stack), and PAB + merge 0.5; each row also counts the steps
#             whose last block computed attention (not timed yet; the target is >= 2.5x)
# Every part has its own time cap, so one that overruns leaves the others' results. All parts together
# take longer than one session's device time (15 min, machine start included): pick them, e.g.
# PARTS="tests methods dits" or PARTS="tests compiled".
#
# The GPU machine has no internet. It needs a Python with CUDA torch and triton; diffusers, tomesd and
# importlib_metadata come as wheels in .whl/ (gitignored), prepared on a machine with internet:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 tomesd==0.1.3 importlib_metadata==8.7.0
# Results go to $OUT (default runs/gpu_bench): per part a log, per bench run bench.json/csv/png, and
# versions.txt (card, driver, libraries).
#
# Usage:  bash benchmarks/gpu_bench.sh            (PYTHON=/path/to/python to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_bench}"
PARTS="${PARTS:-tests ops eager compiled}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: $PY has no CUDA-enabled torch or sees no GPU" >&2
    exit 1
fi
SITE=/tmp/tomediff-gpu-site
if ! "$PY" -c "import diffusers, tomesd" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl || exit 1
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_bench.sh: diffusers/tomesd missing and no .whl/ directory to install from" >&2
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
for name in ("diffusers", "tomesd", "triton"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT_DIR/versions.txt"

start=$SECONDS
has_part() { [[ " $PARTS " == *" $1 "* ]]; }

bench() {  # name, cap in seconds, bench flags...
    local name="$1" cap="$2"
    shift 2
    echo "== $name (cap ${cap}s, at $((SECONDS - start)) s)"
    timeout "$cap" "$PY" -m tomediff.cli.bench_cmd --device cuda --dtype fp16 --batch 2 --ratio 0.5 \
        --no-flops --out "$OUT_DIR/$name" "$@" 2>&1 | grep -v "^\[" | tee "$OUT_DIR/$name.log" \
        || echo "gpu_bench.sh: $name failed or hit its ${cap}s cap; see $OUT_DIR/$name.log" >&2
}

bench_settings() {  # name, cap in seconds, bench flags... (named settings: no --ratio)
    local name="$1" cap="$2"
    shift 2
    echo "== $name (cap ${cap}s, at $((SECONDS - start)) s)"
    timeout "$cap" "$PY" -m tomediff.cli.bench_cmd --device cuda --no-flops --no-memory \
        --out "$OUT_DIR/$name" "$@" 2>&1 | grep -v "^\[" | tee "$OUT_DIR/$name.log" \
        || echo "gpu_bench.sh: $name failed or hit its ${cap}s cap; see $OUT_DIR/$name.log" >&2
}

if has_part tests; then
    echo "== tests (at $((SECONDS - start)) s)"
    timeout 150 "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider -m "gpu or not gpu" \
        tests/test_kernels.py tests/test_gpu.py > "$OUT_DIR/tests.log" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/tests.log"
fi
if has_part sweep; then
    echo "== sweep (at $((SECONDS - start)) s)"
    timeout 150 "$PY" benchmarks/kernel_sweep.py --json "$OUT_DIR/sweep.json" \
        ${PREVIOUS_KERNELS:+--previous "$PREVIOUS_KERNELS"} 2>&1 | tee "$OUT_DIR/sweep.log"
fi
if has_part profile; then
    for run in ${PROFILES:-sd15:512 sd15:1024 pixart:1024}; do
        set -- ${run/:/ }
        echo "== profile $1 $2 (at $((SECONDS - start)) s)"
        timeout 60 "$PY" benchmarks/profile_merge.py --model "$1" --resolution "$2" --device cuda --dtype fp16 \
            --repeats 5 2>&1 | grep -v "^\[\|USDT" | tee "$OUT_DIR/profile_$1_$2.log"
    done
fi
if has_part ops; then
    echo "== ops (at $((SECONDS - start)) s)"
    timeout 45 "$PY" benchmarks/ops_bench.py --device cuda --dtype fp16 --tokens 4096 16384 65536 \
        --memory-tokens 65536 --repeats 21 --json "$OUT_DIR/ops.json" 2>&1 | tee "$OUT_DIR/ops.log"
fi
if has_part eager; then
    bench sd15 90 --model sd15 --resolution 512 1024 2048 --repeats 7 --warmup 2 --compare tomesd
    # SDXL at 1024² is left to the methods part: its baseline's calls varied by 2x there (0.069-0.131 s).
    bench sdxl 60 --model sdxl --resolution 2048 --repeats 7 --warmup 2 --compare tomesd
    bench pixart 60 --model pixart --resolution 1024 2048 --repeats 7 --warmup 2
fi
if has_part compiled; then
    for res in ${COMPILED_RESOLUTIONS:-1024 2048}; do
        bench "sd15_compiled_$res" 300 --model sd15 --resolution "$res" --repeats 5 --warmup 2 --compile \
            --compile-mode "${COMPILE_MODE:-default}"
    done
fi
if has_part methods; then
    METHOD_SETTINGS=(--setting tomesd-default --setting merge --setting downsample --setting merge+reuse
        --setting fast --setting "merge-2levels-min:max_downsample=2,min_tokens=4097"
        --setting "fast-2levels:ratio=0.7,reuse_steps=2,max_downsample=2"
        --setting "downsample-4-2:method=downsample,downsample_factor=4,downsample_factor_next=2")
    bench_settings sd15_methods 120 --model sd15 --resolution 1024 2048 --dtype fp16 --batch 2 --repeats 5 \
        --warmup 2 --trajectory 2 "${METHOD_SETTINGS[@]}"
    bench_settings sdxl_methods 120 --model sdxl --resolution 1024 2048 --dtype fp16 --batch 2 --repeats 5 \
        --warmup 2 --trajectory 2 --setting merge:max_downsample=2 --setting "fast:max_downsample=2" \
        --setting "levels:level_ratios=2:0.7/4:0.5" --setting "downsample:downsample_factor_next=2"
fi
if has_part video; then
    VIDEO_SETTINGS=(--setting downsample
        --setting "downsample-t2:method=downsample,downsample_factor=2,downsample_factor_time=2"
        --setting "kv0.75:ratio=0,kv_ratio=0.75" --setting "kv0.5:ratio=0,kv_ratio=0.5" --setting merge)
    for res in ${VIDEO_RESOLUTIONS:-480}; do
        bench_settings "wan_1.3b_$res" 240 --model wan-1.3b --resolution "$res" --dtype bf16 --batch 1 \
            --repeats 5 --warmup 2 "${VIDEO_SETTINGS[@]}"
    done
fi
if has_part flux2; then
    bench flux2 300 --model flux2 --resolution 1024 2048 --dtype bf16 --batch 1 --repeats 5 --warmup 2 --no-memory
fi
if has_part stack; then
    echo "== stack (at $((SECONDS - start)) s)"
    timeout 420 "$PY" benchmarks/flux_trajectory.py --device cuda --dtype bfloat16 --resolution 1024 \
        --steps 28 --rounds 2 --out "$OUT_DIR/stack" --setting "merge0.3-skip1:ratio=0.3,skip_blocks=1/1" \
        --setting "tokencache-i2:method=cache,cache_interval=2,cache_ratio=0.25" \
        --setting "tokencache-i2-from0.2:method=cache,cache_interval=2,cache_ratio=0.00390625,start=0.2,cache_forecast=linear" \
        --setting "tokencache-i3at0.45:method=cache,cache_interval=2,cache_intervals=0.45:3,cache_ratio=0.00390625,start=0.2,cache_forecast=linear" \
        --setting "tokencache-i4at0.45:method=cache,cache_interval=2,cache_intervals=0.45:4,cache_ratio=0.00390625,start=0.2,cache_forecast=linear" \
        --setting "tokencache-i4at0.45-r0:method=cache,cache_interval=2,cache_intervals=0.45:4,cache_ratio=0,start=0.2,cache_forecast=linear" \
        --setting "tokencache-fastest:method=cache,cache_interval=3,cache_intervals=0.4:4/0.6:5,cache_ratio=0,start=0.15,cache_forecast=linear" \
        --setting "fbc0.1:cache=fbc:threshold=0.1" \
        --setting "taylorseer3:cache=taylorseer:interval=3/warmup=3/order=1" \
        --setting "mag-default:cache=mag:threshold=0.06/max_skip=3/retention=0.2" \
        --setting "mag-default+merge0.3-skip1:ratio=0.3,skip_blocks=1/1,cache=mag:threshold=0.06/max_skip=3/retention=0.2" \
        --setting "mag-e024k5r01:cache=mag:threshold=0.24/max_skip=5/retention=0.1" \
        --setting "mag-e024k5r01+merge0.3-skip1:ratio=0.3,skip_blocks=1/1,cache=mag:threshold=0.24/max_skip=5/retention=0.1" \
        --setting "pab+merge0.5:ratio=0.5,cache=pab:every=2/t_low=0/t_high=1000" 2>&1 | tee "$OUT_DIR/stack.log" \
        || echo "gpu_bench.sh: stack failed or hit its 420s cap; see $OUT_DIR/stack.log" >&2
fi
if has_part dits; then
    bench sd3 120 --model sd3 --resolution 1024 2048 --dtype bf16 --repeats 5 --warmup 2 --no-memory
    bench flux 150 --model flux --resolution 1024 2048 --dtype bf16 --batch 1 --repeats 5 --warmup 2 --no-memory
fi
echo "gpu_bench.sh: done in $((SECONDS - start)) s; results in $OUT_DIR"
