#!/usr/bin/env bash
# One device-machine call: write a Qwen3-30B-A3B-geometry 4-bit model on the device's disk and
# benchmark stock mlx_lm vs chronos side by side (see README "Benchmarks"). Writes into $OUT.
#   LAYERS=48 BUDGETS=1.0,0.5,0.25 TOKENS=64 bash scripts/device_bench.sh
# Decoding is replay (the workload's own text, forced token by token) and the random-weight
# routers are replaced by trained-like routing calibrated to the demo model (ROUTING=model to
# keep them); a read probe (1..N threads) gives each chronos row its I/O roofline.
# EXTRA="--io-sim bandwidth=5GB/s,latency=80us" for an M-series SSD; CPU=1 runs MLX's CPU backend
# (DTYPE=float32 there). ENDS=planned,device-wait also checks device-wait routing's tokens. PROFILE=N adds a cProfile of each chronos configuration's decode steps
# (its N most costly functions, in $OUT/bench-*.err). The same with `chronos bench --routing trained` (replay and the probe are its defaults).
set -euo pipefail
LAYERS=${LAYERS:-48}
BUDGETS=${BUDGETS:-1.0,0.5,0.25}
ROUTING=${ROUTING:-trained}
MODES=${MODES:-per-layer,optimistic}
TOKENS=${TOKENS:-64}
REPEATS=${REPEATS:-3}
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/tmp/qwen3-30b-geometry-$LAYERS}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Exactness first, on this device and its write path (the demo model, greedy, vs stock mlx_lm).
python3 scripts/exact_check.py --budgets 1.0,0.5,0.25 --max-tokens 16 ${CPU:+--cpu} ${DTYPE:+--dtype $DTYPE} ${ENDS:+--ends $ENDS} \
  --json "$OUT/exact.json" | tee "$OUT/exact.log"
if [ ! -f "$MODEL/config.json" ]; then
  python3 scripts/make_synthetic_moe.py "$MODEL" --model-type qwen3_moe --geometry qwen3-30b-a3b \
    --layers "$LAYERS" --bits 4 --dtype bfloat16
fi
TAG=$LAYERS-$ROUTING${CPU:+-cpu}
python3 scripts/bench_sync.py --model "$MODEL" --budgets "$BUDGETS" --max-tokens "$TOKENS" \
  --repeats "$REPEATS" --prompts 2 --modes "$MODES" --routing "$ROUTING" ${CPU:+--cpu} ${DTYPE:+--dtype $DTYPE} ${EXTRA:-} \
  ${PROFILE:+--profile $PROFILE} --json "$OUT/bench-$TAG.json" 2> >(tee "$OUT/bench-$TAG.err" >&2) | tee "$OUT/bench-$TAG.md"
