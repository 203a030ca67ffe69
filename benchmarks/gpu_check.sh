#!/usr/bin/env bash
# ONE prepared GPU check (issue 4, item 5). Installs nothing from the network. From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. parity tests on CUDA (tests/test_gpu.py, -m gpu): float32 (TF32 off) vs the golden embeddings, fast and
#    plain paths; bf16 / fp16 vs the float32 reference (per-token cosine >= 0.999, max |diff| reported);
#    a full-size random checkpoint in bf16 vs float32;
# 2. the encode benchmark in bf16 (benchmarks/bench_encode.py): plain vs fast, crops-per-pass sweep, the
#    encoder's rate vs a bf16 matmul measured in the same run, end-to-end images/s with decode workers
#    (phi3embed.jobs, skipped with a note when that module is absent), once writing files to disk and once
#    dropping the results on the host, each with the encoding thread's time by stage, CPU time, preemptions;
# 3. the host-side feed alone (benchmarks/bench_pipeline.py): bytes and CPU time per image that the encoder's
#    process spends moving crops from 15 decode workers to the device, float32 crops vs uint8 tiles;
# 4. the output side alone (benchmarks/bench_writer.py): fsynced 12 MB safetensors files per second on this
#    box's /tmp, one at a time vs several at once (the job writes 4 at once);
# 5. if time is left, the fast path once more with compile=True (torch.compile).
#
# Figures go to stdout and, when $OUT is set, into $OUT (gpu_check.log, gpu_parity.json, gpu_tests.log,
# bench_cuda_bf16.json/.txt, bench_pipeline.json/.txt, bench_writer.json/.txt,
# bench_cuda_bf16_compile.json/.txt). Each stage has a timeout and the whole check stops starting new stages
# after DEADLINE seconds (default 450), so it ends inside 8 minutes.
#
# Needs on that machine: python3 with torch (CUDA), transformers, safetensors, huggingface_hub, pillow, numpy,
# pytest (the GPU image has them all). A package that is missing is installed from carried wheels only:
# run benchmarks/fetch_gpu_wheels.sh here and carry ".whl"; only wheels of missing packages are installed,
# into /tmp/site (torch is never reinstalled).
# Golden data: the trimmed set in the repository (tests/data/golden, travels with the working tree) unless
# $PHI3EMBED_GOLDEN names another one (e.g. the full set).
#
# Dry run on a CPU box: GPU_CHECK_DEVICE=cpu DEADLINE=1500 BENCH_TIMEOUT=900 PYTHON=.venv/bin/python
# bash benchmarks/gpu_check.sh (tiny parity tests on the CPU and bench_encode --quick; GPU_CHECK_PYTEST_ARGS /
# GPU_CHECK_BENCH_ARGS override the defaults; GPU_CHECK_PRETEND_MISSING="typer rich" exercises the wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DEADLINE=${DEADLINE:-450}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
OUTDIR=${OUT:-$(mktemp -d /tmp/phi3embed-gpu-check.XXXXXX)}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$OUTDIR/gpu_check.log" >&2; }
left() { # seconds for a stage: at most $1, never past the deadline
    local rest=$((DEADLINE - $(elapsed)))
    if [ "$rest" -lt "$1" ]; then echo "$rest"; else echo "$1"; fi
}
stage() { # stage NAME MAX_SECONDS LOGFILE -- command...: run with a timeout, tee its output, record failures
    local name=$1 max=$2 logfile=$3
    shift 4
    local t
    t=$(left "$max")
    if [ "$t" -lt 20 ]; then
        say "SKIPPED $name: no time left before the ${DEADLINE}s deadline"
        failed+=("$name (skipped)")
        return 1
    fi
    say "START $name (timeout ${t}s)"
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$OUTDIR/$logfile"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        say "FAILED $name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
        failed+=("$name")
    else
        say "OK $name"
    fi
    return "$rc"
}

# ------------------------------------------------------------------ 0. the machine and its packages
say "repository $(git rev-parse --short HEAD 2>/dev/null || echo '?'), output in $OUTDIR"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUTDIR/gpu_check.log"
fi
missing=$("$PY" - <<'EOF'
import importlib.util, os
mods = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
        "huggingface_hub": "huggingface_hub", "tokenizers": "tokenizers", "PIL": "pillow", "numpy": "numpy",
        "typer": "typer", "rich": "rich", "pytest": "pytest"}
pretend = os.environ.get("GPU_CHECK_PRETEND_MISSING", "").split()  # to dry-run the wheel install
print(" ".join(dist for mod, dist in mods.items() if dist in pretend or importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    say "missing Python packages: $missing"
    wheels=()
    for dist in $missing; do
        [ "$dist" = torch ] && { say "torch is missing: this is not the GPU image"; exit 2; }
        for w in .whl/"$dist"-*.whl .whl/"${dist//-/_}"-*.whl; do
            [ -f "$w" ] && wheels+=("$w") && break
        done
    done
    if [ ${#wheels[@]} -eq 0 ]; then
        say "no wheels for them in .whl/: run benchmarks/fetch_gpu_wheels.sh here and carry .whl"
        exit 2
    fi
    say "installing ${wheels[*]} into /tmp/site (no index, no deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || { say "wheel install failed"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$OUTDIR/gpu_check.log"
import platform, torch, transformers, safetensors
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, safetensors {safetensors.__version__}, "
      f"cuda available {torch.cuda.is_available()}, cpus {__import__('os').cpu_count()}")
EOF

for g in "${PHI3EMBED_GOLDEN:-}" "$PWD/tests/data/golden"; do
    if [ -n "$g" ] && [ -f "$g/MANIFEST.json" ]; then
        export PHI3EMBED_GOLDEN=$g
        break
    fi
done
[ -n "${PHI3EMBED_GOLDEN:-}" ] && [ -f "$PHI3EMBED_GOLDEN/MANIFEST.json" ] && say "golden data: $PHI3EMBED_GOLDEN" \
    || say "golden data NOT FOUND (see the header of this script): the golden parity tests will fail"

# ------------------------------------------------------------------ 1. a full-size random checkpoint, on the fly
CKPT=${PHI3EMBED_BENCH_CHECKPOINT:-/tmp/phi3v-128k-vision-only}
stage "full-size random checkpoint (vision tensors + embed_tokens, bf16)" 120 make_checkpoint.log -- \
    "$PY" benchmarks/make_checkpoint.py --lm-layers 0 --out "$CKPT"
export PHI3EMBED_BENCH_CHECKPOINT=$CKPT

# ------------------------------------------------------------------ 2. parity tests
if [ "$DEVICE" = cuda ]; then
    read -r -a pytest_args <<<"${GPU_CHECK_PYTEST_ARGS:-}"
else
    export PHI3EMBED_GPU_TESTS_DEVICE=$DEVICE
    read -r -a pytest_args <<<"${GPU_CHECK_PYTEST_ARGS:--k tiny-phi3v-128k-f32/4}"
fi
export PHI3EMBED_GPU_REPORT="$OUTDIR/gpu_parity.json"
stage "parity tests on $DEVICE" 240 gpu_tests.log -- \
    "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu.py "${pytest_args[@]}"

# ------------------------------------------------------------------ 3. benchmark
if [ "$DEVICE" = cuda ]; then
    read -r -a bench_args <<<"${GPU_CHECK_BENCH_ARGS:---device cuda --dtype bfloat16 --images all --batch-sizes 16,32,64,128 --e2e}"
else
    read -r -a bench_args <<<"${GPU_CHECK_BENCH_ARGS:---device $DEVICE --quick --gemm-seconds 1}"
fi
stage "encode benchmark (${bench_args[*]})" "$BENCH_TIMEOUT" bench_cuda_bf16.txt -- \
    "$PY" benchmarks/bench_encode.py "${bench_args[@]}" --checkpoint "$CKPT" --json "$OUTDIR/bench_cuda_bf16.json"

# ------------------------------------------------------------------ 4. the host-side feed alone
if [ "$DEVICE" = cuda ]; then
    read -r -a feed_args <<<"${GPU_CHECK_FEED_ARGS:---device cuda --workers 15 --images all --copies 30 --batch-size 32}"
else
    read -r -a feed_args <<<"${GPU_CHECK_FEED_ARGS:---device $DEVICE --workers 1 --copies 2}"
fi
stage "host-side feed (${feed_args[*]})" 90 bench_pipeline.txt -- \
    "$PY" benchmarks/bench_pipeline.py "${feed_args[@]}" --json "$OUTDIR/bench_pipeline.json"

# ------------------------------------------------------------------ 4b. the output side alone
stage "output files, 1 vs several at a time" 60 bench_writer.txt -- \
    "$PY" benchmarks/bench_writer.py --files 200 --file-threads 1,4,8,1,4,8 --json "$OUTDIR/bench_writer.json"

# ------------------------------------------------------------------ 5. compile=True, if time is left
if [ "$DEVICE" = cuda ] && [ "$(left 170)" -ge 170 ]; then
    stage "encode benchmark, fast path compiled" 170 bench_cuda_bf16_compile.txt -- \
        "$PY" benchmarks/bench_encode.py --device cuda --dtype bfloat16 --images all --paths fast \
        --batch-sizes 64 --compile --checkpoint "$CKPT" --json "$OUTDIR/bench_cuda_bf16_compile.json"
else
    say "compiled run not started (CPU dry run, or under 170 s left)"
fi

# ------------------------------------------------------------------ summary
say "done in $(elapsed)s; figures in $OUTDIR"
for f in gpu_parity.json bench_cuda_bf16.json bench_pipeline.json bench_writer.json bench_cuda_bf16_compile.json; do
    [ -f "$OUTDIR/$f" ] && say "  $OUTDIR/$f"
done
if [ ${#failed[@]} -gt 0 ]; then
    say "FAILED stages: ${failed[*]}"
    exit 1
fi
say "all stages passed"
