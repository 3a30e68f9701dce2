#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call (bench/gpu_check.py says what and how):
#
#   bash bench/gpu_check.sh --prepare        # here, first: the commit into .gpu_data/
#   bash bench/gpu_check.sh                  # on the device: run(command=..., carry=[".gpu_data"],
#                                            #   timeout_s=590); 3 files come back in $OUT
#   bash bench/gpu_check.sh --stages kernel_checks,engine_gpu --budget 200   # a partial rerun
#   bash bench/gpu_check.sh --rehearse       # here: the device run's set-up, no GPU needed
#
# Python's output is unbuffered so that a stage killed at its limit still leaves its log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
