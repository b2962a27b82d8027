"""Device-wait requests with and without next-layer guesses (issue 12, docs/device_wait.md).

    python scripts/device_wait_guesses.py [--model DIR] [--budgets 0.5,0.25] [--guesses 8,16]
                                          [--tokens 32] [--routing model|trained] [--json OUT]

Decodes the same greedy tokens with `sync="device-wait"` at each budget: without a predictor,
then with the cross-layer gate (the next layer's router on this layer's input) sending
--guesses experts for the next layer along with every request. `--routing trained` (random-weight
checkpoints, e.g. the Qwen3-30B-A3B geometry's 48 layers x 128 experts with tiny experts) replays
a python text with trained-like routing instead, and the guesses come from the `table` predictor
(bench_guesses.py: as good as the demo's gate predictor on the same text). Reports requests per pass,
prefetch hits and MB read, and whether the tokens match the run without guesses. On CUDA the
real kernels run (and the time per token means something); elsewhere the host stand-in of the
kernel (`host_kernel`, pulled loads into numpy staging): the counts are the protocol's, the
times are not a device's.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from results import save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--guesses", default="8,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", default="The history of the Roman Empire begins with the founding of the city")
    ap.add_argument("--routing", choices=["model", "trained"], default="model")
    ap.add_argument("--json")
    args = ap.parse_args()

    import chronos_mlx
    from chronos_mlx import device_wait
    from chronos_mlx.generate import generate_step
    from chronos_mlx.predict_runtime import attach_predictor

    on_device = device_wait.available()
    if not on_device:
        device_wait.available = lambda: True  # the host stand-in takes the kernel's place
    trained = _trained_routing(args) if args.routing == "trained" else None
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        reference = None
        for g in [0] + [int(x) for x in args.guesses.split(",")]:
            model, tok, rt = chronos_mlx.load(args.model, expert_budget=budget)
            decoding = {}
            if trained is not None:
                decoding = trained(model)
            if g and trained is not None:
                from chronos_mlx.bench_guesses import TableGuesses

                rt.predictor = TableGuesses(model._chronos_bench_routing, model._chronos_bench_routing.params.guess_noise)
                rt.guesses = g
            elif g:
                attach_predictor(model, rt, "gate")
                rt.guesses = g
            if not on_device:
                box = device_wait.Mailbox.host()
                rt.waiter = device_wait.DeviceWaiter(rt, mailbox=box, kernel=device_wait.host_kernel(box), pull=True,
                                                     staging_alloc=lambda n: np.zeros(n, dtype=np.uint8))
            prompt = mx.array(decoding.pop("prompt") if decoding else tok.encode(args.prompt))
            before = rt.cache_totals()
            t0 = time.perf_counter()
            ids = [int(t) for t, _ in generate_step(prompt, model, rt, max_tokens=args.tokens, sync="device-wait",
                                                    **decoding)]
            seconds = time.perf_counter() - t0
            after = rt.cache_totals()
            reference = reference or ids
            row = {"budget": budget, "guesses": g, "requests_per_pass": rt.waiter.requests / (args.tokens + 1),
                   "prefetch_hits": after["prefetch_hits"] - before["prefetch_hits"],
                   "mb_read": (after["bytes_read"] - before["bytes_read"]) / 1e6,
                   "ms_per_token": seconds / args.tokens * 1e3, "same_tokens": ids == reference}
            rows.append(row)
            print(f"budget {budget}: {g or 'no':>2} guesses: {row['requests_per_pass']:.2f} requests a pass, "
                  f"{row['prefetch_hits']} prefetch hits, {row['mb_read']:.1f} MB read, "
                  f"{row['ms_per_token']:.1f} ms/token{'' if on_device else ' (stand-in)'}, same tokens: {row['same_tokens']}")
            rt.waiter.close()
    save_json(args.json, {"device": "cuda" if on_device else "host stand-in", "tokens": args.tokens,
                          "routing": args.routing, "rows": rows})


def _trained_routing(args):
    """install(model) -> generate_step keywords (and "prompt"): a python text replayed with
    trained-like routing and its table guesses, calibrated once (bench_sync.py --routing trained)."""
    from mlx_lm.models.cache import make_prompt_cache

    from chronos_mlx.bench import ReplaySampler, replay_texts
    from chronos_mlx.bench_guesses import calibrate_guesses_for_workload
    from chronos_mlx.bench_routing import calibrate_for_workload, install_trained_routing
    from chronos_mlx.loader import plan_model

    info = plan_model(args.model).info
    prompts, forced = replay_texts("python", args.model, limit=1, max_tokens=args.tokens + 1)
    params = calibrate_for_workload("python", prompts, forced, info["num_experts"], info["top_k"], limit=1,
                                    max_tokens=args.tokens + 1)
    params = calibrate_guesses_for_workload(params, "python", prompts, forced, info["top_k"], limit=1,
                                            max_tokens=args.tokens + 1)
    print(f"trained-like routing: LRU decode hit demo / here {params.targets} / {params.fitted}; next-layer "
          f"recall@{info['top_k']} demo gate / table {params.guess_recall['demo']:.3f} / {params.guess_recall['fitted']:.3f}")
    text = prompts[0] + forced[0]

    def install(model):
        install_trained_routing(model, params).set_sequence(text)
        cache = make_prompt_cache(model)
        return {"prompt": prompts[0], "prompt_cache": cache, "sampler": ReplaySampler(text, cache)}

    return install


if __name__ == "__main__":
    main()
