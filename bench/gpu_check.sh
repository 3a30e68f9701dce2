#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call (about 8 minutes on an H100):
#
#   bash bench/gpu_check.sh            # run on the device machine, repository root
#
# The device image has torch, triton, onnx, onnxruntime (CPU build), pytest; no TensorRT and no
# network: the project runs from the source tree. Logs and JSON go to $OUT (or ./gpu_out);
# the last lines printed are the summary table. Each stage has its own time limit so that one
# slow stage cannot eat the lease; a stage that fails or times out is reported and the next runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTSAMPLE_CACHE="$OUT/cache"
summary="$OUT/summary.txt"
: >"$summary"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name: rc=$rc in $((SECONDS - start))s" | tee -a "$summary"
}

{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$OUT/machine.txt"

# 1. GPU tests (marked gpu) and the export tests on this torch.
stage tests_gpu 150 python -m pytest -q -x -m gpu -p no:cacheprovider
stage tests_export 240 python -m pytest -q -p no:cacheprovider tests/test_export.py -k "not cache"

# 2. Guided step: eager vs AOTInductor (CUDA) vs ONNX Runtime (this image's provider), demo model.
stage bench_export_demo 180 python -m bench.export --device cuda --batch 1 8 \
  --backends eager aoti onnxruntime --json "$OUT/bench_export_demo.json"

# 3. The same at ImageNet 64 (random weights, fp16 torso as the README runs it), eager vs AOTI.
stage bench_export_64 240 python -m bench.export --device cuda --model 64x64_diffusion \
  --dtype fp16 --batch 1 8 --backends eager aoti --repeats 20 --json "$OUT/bench_export_64.json"

echo "=== summary"
cat "$summary"
for f in "$OUT"/bench_export_*.log; do
  [ -f "$f" ] && { echo "--- $f"; grep -A 12 '^{' "$f" | tail -n 12; }
done
