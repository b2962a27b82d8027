#!/usr/bin/env bash
# One device-machine call: write a Qwen3-30B-A3B-geometry 4-bit model on the device's disk and
# benchmark stock mlx_lm vs chronos side by side (see README "Benchmarks"). Writes into $OUT.
#   LAYERS=48 BUDGETS=1.0,0.5 TOKENS=64 bash scripts/device_bench.sh
set -euo pipefail
LAYERS=${LAYERS:-48}
BUDGETS=${BUDGETS:-1.0,0.5}
TOKENS=${TOKENS:-64}
REPEATS=${REPEATS:-3}
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/tmp/qwen3-30b-geometry-$LAYERS}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ ! -f "$MODEL/config.json" ]; then
  python3 scripts/make_synthetic_moe.py "$MODEL" --model-type qwen3_moe --geometry qwen3-30b-a3b \
    --layers "$LAYERS" --bits 4 --dtype bfloat16
fi
python3 scripts/bench_sync.py --model "$MODEL" --budgets "$BUDGETS" --max-tokens "$TOKENS" \
  --repeats "$REPEATS" --prompts 2 ${EXTRA:-} --json "$OUT/bench-$LAYERS.json" | tee "$OUT/bench-$LAYERS.md"
