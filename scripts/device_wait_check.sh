#!/usr/bin/env bash
# One device-machine call that checks and measures device-wait routing (docs/device_wait.md, "Next", 1).
# Every step has its own time limit and writes into $OUT as it goes, so a step that hangs or runs
# long costs only its own limit and the others' output still comes back.
#   OUT=$OUT bash scripts/device_wait_check.sh            (after `source .device/final/install.sh`)
# Q48=/tmp/q48 is written first if missing (~1 min); BUDGETS, TOKENS, MODES, READ_THREADS, SPLIT (auto,threads),
# IO_SIM (bandwidth=5GB/s,latency=80us), REPEATS, CPU_MODES (step cpu16), GUESSES (with MODES ...:table), PHASES=1 shape step bench;
# DUMP=1 writes every thread's stack every 4 s to $OUT/stacks.txt (a run that hangs).
# A device call may run 600 s: split with STEPS, back to back on the warm machine, e.g.
#   STEPS=warm-up,race,make-q48,warm-q48,trace-q48,save-ptx   then   STEPS=bench   then
#   STEPS=phases-q48,tests,exact,exact-guesses,guesses,cost
set -uo pipefail
STEPS=${STEPS:-warm-up,race,trace,tests,fetch,exact,exact-guesses,guesses,make-q48,warm-q48,trace-q48,phases-q48,cost,bench,save-ptx}
OUT=${OUT:-/tmp/out}
Q48=${Q48:-/tmp/q48}
BUDGETS=${BUDGETS:-0.97,0.5,0.25}
TOKENS=${TOKENS:-16}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# MLX's CUDA kernels compile on first use (~85 s for the demo on a fresh machine, every cold start).
# Its compile cache lives in MLX_PTX_CACHE_DIR: seeded from .device/ptx.tar.xz when a call carries it, and
# written back as $OUT/ptx.tar.xz (step save-ptx): copy it to .device/ptx.tar.xz and carry that too.
export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-/tmp/mlx-ptx}
mkdir -p "$MLX_PTX_CACHE_DIR"
[ -f .device/ptx.tar.xz ] && tar xJf .device/ptx.tar.xz -C "$MLX_PTX_CACHE_DIR"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   rc $?" | tee -a "$OUT/summary.txt"
  tail -4 "$OUT/$name.txt" | sed 's/^/   /' | tee -a "$OUT/summary.txt"
}
# A fresh machine JIT-compiles MLX's CUDA kernels on first use: warm them before anything timed.
step warm-up 240 python3 -c "
import mlx.core as mx, chronos_mlx
from mlx_lm import load
from mlx_lm.generate import generate_step
m, t = load(str(chronos_mlx.DEFAULT_MODEL)); m.set_dtype(mx.bfloat16)
print([int(x) for x, _ in generate_step(mx.array(t.encode('The history of')), m, max_tokens=4)])"
# Kernels that share no buffer, chained and not (the unchained run should lose requests: ~10 s).
step race 60 bash -c "python3 scripts/device_wait_race.py && python3 scripts/device_wait_race.py --no-chain"
# Every request timed; if requests stop, every thread's stack (faulthandler) — a hang shows where.
step trace 120 python3 scripts/device_wait_trace.py --budget 0.5 --tokens 8 --limit-s 2
step tests 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -o faulthandler_timeout=60 tests/test_device_wait.py tests/test_wait_kernels.py
# Two MLX streams at once, and kernels of one waiting for a flag set on the other (copies beside compute).
step streams 120 python3 scripts/stream_overlap.py --json "$OUT/streams.json"
# Device-fetch (device_fetch.py): its kernel against the stand-in, its decode against stock, then beside device-wait.
step fetch 300 bash -c "python3 -m pytest -q -p no:cacheprovider -o addopts='' -o faulthandler_timeout=60 \
  tests/test_fetch_kernels.py tests/test_device_fetch.py; python3 scripts/exact_check.py --budgets 0.5,0.25 \
  --max-tokens 16 --ends device-fetch,device-wait --workload python --prompts 2 --json $OUT/exact-fetch.json"
# The CLI on CUDA: every routing this machine runs (device-fetch among them) against stock; a generation by name.
step verify-cli 240 bash -c "python3 -m chronos_mlx.cli verify --tokens --budgets 0.5,0.125 --json > $OUT/verify.json; \
  python3 -m chronos_mlx.cli generate --sync device-fetch --budget 0.5 -p 'The history of the city' --max-tokens 24 --json > $OUT/generate-fetch.json; \
  python3 -c \"import json; d = json.load(open('$OUT/generate-fetch.json')); print({k: d['stats'][k] for k in ('sync', 'device_fetch_setup_s', 'decode_tokens_per_s', 'device_waits', 'decode_misses')})\""
# The demo's trained routing: device-fetch beside device-wait and optimistic (bf16, replayed text).
step fetch-demo 300 python3 scripts/bench_sync.py --dtype bfloat16 --budgets 0.5,0.25 --modes device-fetch,device-wait,optimistic \
  --max-tokens 48 --repeats 3 --prompts 2 --interleave --json "$OUT/fetch-demo.json"
step exact 240 python3 scripts/exact_check.py --budgets 0.5,0.25 --max-tokens 16 --ends planned,device-wait --workload python --prompts 3 \
  --json "$OUT/exact.json"
# Requests that carry next-layer guesses (the gate predictor): exact against stock, and how many requests they spare.
step exact-guesses 200 python3 scripts/exact_check.py --budgets 0.5,0.125 --max-tokens 16 --ends device-wait \
  --predictor gate --workload python --prompts 1 --json "$OUT/exact-guesses.json"
step guesses 200 python3 scripts/device_wait_guesses.py --json "$OUT/guesses.json"
[ -f "$Q48/config.json" ] || step make-q48 150 python3 scripts/make_synthetic_moe.py "$Q48" --model-type qwen3_moe \
  --geometry qwen3-30b-a3b --layers 48 --bits 4 --dtype bfloat16
# New shapes JIT-compile again (session 12's bench ran out of time in its first device-wait step).
step warm-q48 240 python3 -c "
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
m, t = load('$Q48'); m.set_dtype(mx.bfloat16)
print([int(x) for x, _ in generate_step(mx.array(t.encode('The history of')), m, max_tokens=4)])"
# The bench's case (replay, table routers) traced request by request before it is timed.
step trace-q48 200 python3 scripts/device_wait_trace.py --model "$Q48" --routing trained --budget 0.5 --tokens 8 --limit-s 3
# Where a request's time goes on the service thread (cProfile), and how the reads' split changes it.
step profile-q48 300 bash -c "for r in '--profile' '--read-threads 1' '--read-threads 16 --min-kb 256'; do
  echo \"=== \$r\"; python3 scripts/device_wait_trace.py --model $Q48 --routing trained --budget 0.5 --tokens 16 --limit-s 3 --quiet \$r; done"
# Reads in flight and Python's switch interval against a request's time (decode time in the token lines).
step threads-q48 300 bash -c "for r in '--read-threads 1' '--read-threads 1 --switch-ms 0.5' '--read-threads 4' '--switch-ms 0.5'; do
  echo \"=== \$r\"; python3 scripts/device_wait_trace.py --model $Q48 --routing trained --budget 0.5 --tokens 16 --limit-s 3 --quiet \$r; done"
# Where a per-layer miss's time goes on this machine (read, copy, bookkeeping), the bench's case.
step phases-q48 200 python3 scripts/decode_load_phases.py --model "$Q48" --routing trained --budget 0.5 --tokens 16 \
  --json "$OUT/phases.json"
step cost 200 python3 scripts/device_wait_cost.py --model "$Q48" --rounds 3 --max-tokens 32 --load-mb 2.65 --json "$OUT/cost.json"
# Guesses on q48: MODES=device-wait,device-wait:table (the `table` predictor, bench_guesses.py: next-layer
# guesses as good as the demo's gate predictor; the gate predictor itself would read the random routers);
# GUESSES=8,16 sets how many a layer; GUESS_READS=stage,post,load how they are read (preread.py; posted to the kernel; inside the request).
step bench ${BENCH_S:-420} env ${READ_THREADS:+CHRONOS_READ_THREADS=$READ_THREADS} python3 scripts/bench_sync.py --model "$Q48" --routing trained --budgets "$BUDGETS" \
  --modes "${MODES:-device-wait,optimistic,per-layer}" --max-tokens "$TOKENS" --repeats "${REPEATS:-1}" --prompts 1 \
  --interleave ${PHASES:+--phases} ${PROBE:-} ${SPLIT:+--split-reads $SPLIT} ${IO_SIM:+--io-sim $IO_SIM} ${GUESSES:+--guesses $GUESSES} ${GUESS_READS:+--guess-reads $GUESS_READS} ${DUMP:+--dump-stacks $OUT/stacks.txt} --json "$OUT/bench.json"
# The same, one configuration at a time (stock too), each token's time split into the model's forward (Python
# building the graph), mx.async_eval (MLX encoding and launching it), mx.eval (waiting) and the rest.
step bench-phases ${BENCH_S:-420} python3 scripts/bench_sync.py --model "$Q48" --routing trained --budgets "$BUDGETS" \
  --modes "${MODES:-device-fetch,optimistic}" --max-tokens "$TOKENS" --repeats "${REPEATS:-1}" --prompts 1 --no-probe \
  --phases --json "$OUT/bench-phases.json"
# MLX's CPU backend on this host's cores (the closest thing here to a Mac's unified memory): own loop,
# per-layer and the plain mlx_lm loop side by side; where a per-layer miss's time goes; a profile of each.
step cpu16 420 bash -c "python3 scripts/bench_sync.py --cpu --dtype float32 --budgets 1.0,0.5,0.25 \
  --modes ${CPU_MODES:-optimistic,per-layer,mlx_lm} --max-tokens 32 --repeats 3 --prompts 2 --interleave --no-probe --json $OUT/cpu16.json
  python3 scripts/decode_cost_split.py --cpu --budget 0.5 --rounds 3 --max-tokens 32 --json $OUT/cpu16-split.json"
step cpu16-profile 300 python3 scripts/bench_sync.py --cpu --dtype float32 --budgets 0.5 --modes optimistic,mlx_lm \
  --max-tokens 32 --repeats 1 --prompts 2 --no-probe --profile 30
# Last in any call that names it: the kernels compiled so far (stock's, chronos's, the wait kernels'),
# ~0.6 MB compressed; copy it to .device/ptx.tar.xz and carry that on the next cold start.
step save-ptx 60 tar cJf "$OUT/ptx.tar.xz" -C "$MLX_PTX_CACHE_DIR" .
