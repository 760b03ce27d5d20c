#!/usr/bin/env bash
# Issue 14, item 5: one run on a machine with a CUDA device (<= 8 minutes), printing
#   1. B5 at 768 px, frames/s at batch 1-64 in fp32, bf16-flow, bf16-blocks and bf16 (all but fp32 +channels-last);
#   2. few-shot adaptation of B5 at 768 px: s/step and peak device memory for 1, 5 and 10 shots;
#   3. the streaming worker against the bare model with a local broker and Redis (frames/s, p99 latency).
# Needs the project's .venv (make install) and ELPV exported to data/elpv for parts 2 and 3.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (figures also written as logs under OUT_DIR, default runs/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
[ -d data/elpv ] || .venv/bin/inspectd export-elpv --out data/elpv

echo "== 1. B5/768 throughput by mode and batch"
timeout 240 "$PY" bench/bench_throughput.py --device cuda --size 768 --batches 1,8,16,32,64 \
    --modes fp32,bf16-flow+cl,bf16-blocks+cl,bf16+cl --seconds 3 2>&1 | tee "$OUT/throughput.log"

echo "== 2. adaptation, B5/768, 1/5/10 shots"
timeout 150 "$PY" bench/bench_adapt.py --device cuda --configs b5:768 --shots 1,5,10 --steps 5 --hidden 1024 \
    --json "$OUT/adapt.json" 2>&1 | tee "$OUT/adapt.log"

echo "== 3. worker vs bare model (local Tansu + Redis)"
timeout 90 "$PY" bench/bench_pipeline.py --device cuda --frames 640 --batch 32 --rounds 2 2>&1 | tee "$OUT/pipeline.log"
