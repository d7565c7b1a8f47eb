#!/usr/bin/env bash
# All GPU checks in one device call (the `device` tool runs this from the repository root):
#   GPU correctness tests, the attention-op benchmark, and the synthetic `paper` preset at p = 1.
# Writes logs and JSON under $OUT and prints a short table last.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python3 benchmarks/attention_op.py --device cuda --dtype bfloat16 --T 512 2048 8192 --batch 4 --heads 12 \
    --kv-heads 12 --head-dim 64 --repeats 10 --json "$OUT/attention_op.json" | tee "$OUT/attention_op.txt"
timeout "${SYNTHETIC_SECONDS:-420}" python3 -m myopia.cli synthetic --preset paper --p_values 1 \
    --out "$OUT/synthetic-paper" --train.progress false 2>&1 | tee "$OUT/synthetic.log" | tail -20
echo "== summary =="
tail -1 "$OUT/gpu_tests.log"
tail -16 "$OUT/attention_op.txt"
grep -- "->" "$OUT/synthetic.log" || echo "synthetic: no arm finished within the time limit"
