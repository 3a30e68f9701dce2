#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call of at most ~9.5 minutes:
#
#   bash bench/gpu_check.sh        # on the device machine, repository root; timeout_s ~580
#   GPU_CHECK_STAGES="tests_gpu bench_kernels" bash bench/gpu_check.sh   # a rerun of some stages
#
# The device image has torch, triton, onnx, onnxruntime (CPU build), pytest; no TensorRT and no
# network: the project runs from the source tree. Logs and JSON go to $OUT (or ./gpu_out); the
# kernel table is appended to bench/RESULTS.md and copied to $OUT/RESULTS_append.md (commit it
# from there). Stages run in order of importance, each under its own time limit; a stage that
# would overrun the total budget is skipped and reported, so the summary always prints.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
BUDGET="${GPU_CHECK_BUDGET:-560}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTSAMPLE_CACHE="$OUT/cache"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
summary="$OUT/summary.txt"
: >"$summary"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [[ -n "${GPU_CHECK_STAGES:-}" && " $GPU_CHECK_STAGES " != *" $name "* ]]; then
    echo "$name: not selected (GPU_CHECK_STAGES=$GPU_CHECK_STAGES)" | tee -a "$summary"
    return
  fi
  if ((SECONDS + limit > BUDGET)); then
    echo "$name: skipped (would pass the ${BUDGET}s budget at ${SECONDS}s)" | tee -a "$summary"
    return
  fi
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "$name: rc=$rc in $((SECONDS - start))s" | tee -a "$summary"
}

{
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$OUT/machine.txt"

# 1. The kernel checks compiled for this GPU (the same files the CPU runs under the interpreter).
stage kernel_checks 180 python -m pytest -q -p no:cacheprovider -o "norecursedirs=.*" -o "python_files=check_*.py" tests/interpreted

# 2. GPU-marked tests: the fast engine's CUDA graphs and streams, AOTInductor on CUDA (the
#    TensorRT ones skip without it).
stage tests_gpu 200 python -m pytest -q -p no:cacheprovider -m gpu tests

# 3. Kernels vs eager torch vs torch.compile at ADM-256 shapes; the table goes to RESULTS.md.
cp bench/RESULTS.md "$OUT/RESULTS_before.md" 2>/dev/null || true
{
  echo
  echo "## $(date -u +%Y-%m-%d) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), commit $commit"
  echo
  echo "Command: \`bash bench/gpu_check.sh\` (stages bench_kernels: \`python -m bench.kernels --batch 4 --dtype fp16\`; bench_sample: \`python -m bench.sample --presets 64x64_diffusion 256x256_diffusion --batch 1 16 --steps ddim25\`)"
} >"$OUT/RESULTS_append.md"
stage bench_kernels 120 python -m bench.kernels --batch 4 --dtype fp16 \
  --json "$OUT/bench_kernels.json" --markdown "$OUT/RESULTS_append.md"

# 4. Guided ddim25 per image: reference-style eager vs the fast engine, ImageNet 64 and 256.
stage bench_sample 240 python -m bench.sample --presets 64x64_diffusion 256x256_diffusion \
  --batch 1 16 --steps ddim25 --json "$OUT/bench_sample.json" --markdown "$OUT/RESULTS_append.md"
cat "$OUT/RESULTS_append.md" >>bench/RESULTS.md

# 5. A guided step on eager vs AOTInductor (CUDA) vs ONNX Runtime (this image's provider).
stage bench_export_demo 150 python -m bench.export --device cuda --batch 1 8 \
  --backends eager aoti onnxruntime --json "$OUT/bench_export_demo.json"

# 6. The same at ImageNet 64 (random weights, fp16 torso as the README runs it), eager vs AOTI.
stage bench_export_64 200 python -m bench.export --device cuda --model 64x64_diffusion \
  --dtype fp16 --batch 1 8 --backends eager aoti --repeats 20 --json "$OUT/bench_export_64.json"

echo "=== summary (${SECONDS}s)"
cat "$summary"
grep -h '^|' "$OUT/RESULTS_append.md" 2>/dev/null | head -n 12
for f in "$OUT"/bench_export_*.log; do
  [ -f "$f" ] && { echo "--- $f"; grep -A 12 '^{' "$f" | tail -n 12; }
done
