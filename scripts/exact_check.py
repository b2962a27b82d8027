"""Greedy tokens of chronos vs stock mlx_lm on this machine's default device.

    python scripts/exact_check.py [--model DIR] [--budgets 1.0,0.5,0.25] [--max-tokens 24]
                                  [--dtype bfloat16] [--ends planned,none] [--workload it --prompts 3]
                                  [--cpu] [--json OUT]

The test suite checks exactness on MLX's CPU backend; this runs the same comparison where
the suite does not (a CUDA GPU, Metal), through whatever write path the device uses
(on CUDA: the copy engine, upload.py). --ends none also decodes with no segment end
(every miss recovered by recomputing, its layers reloaded as one batch). --prompts N adds the
first N prompts of a bundled workload (long prompts prefill in waves: kernel_match.py). Prints
one line per prompt, budget and segment choice and exits 1 on any difference. Stock decodes
each prompt twice: where its own runs part (exact ties, as stock met on CUDA in bfloat16 with a
random-weight model), only the tokens both runs share are compared, and the line says so.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from results import save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", default="The history of the Roman Empire begins")
    ap.add_argument("--workload", default="en", help="bundled workload (or .jsonl) for --prompts")
    ap.add_argument("--prompts", type=int, default=0, help="also this many prompts of --workload")
    ap.add_argument("--ends", default="planned", help="comma-separated: planned (the planner's segment ends), none (whole-token optimism), device-wait (CUDA: layers wait on the device, which copies the loads the host staged), device-fetch (CUDA: layers copy their misses from the page-locked shards)")
    ap.add_argument("--predictor", default=None, help="attach this predictor (gate, lookahead, ...): with device-wait, requests carry next-layer guesses")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    import chronos_mlx
    from chronos_mlx.generate import generate_step
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    path = args.model or chronos_mlx.DEFAULT_MODEL
    dtype = getattr(mx, args.dtype)
    model, tok = load(str(path))
    model.set_dtype(dtype)
    texts = [args.prompt]
    if args.prompts:
        from chronos_mlx.workloads import read_prompts

        texts += read_prompts(args.workload)[: args.prompts]
    from chronos_mlx.equivalence import first_difference

    # Stock decodes each prompt twice: where it parts from itself (ties, as on CUDA in bfloat16)
    # there is no one reference, and only the prefix both runs share is compared.
    wants = []
    for text in texts:
        prompt = mx.array(tok.encode(text))
        runs = [[int(t) for t, _ in stock_step(prompt, model, max_tokens=args.max_tokens)] for _ in range(2)]
        parted = first_difference(*runs)
        wants.append((prompt, runs[0], args.max_tokens if parted is None else parted))
    del model
    rows, ok = [], True
    for p, (prompt, want, repeatable) in enumerate(wants):
        for b in [float(x) for x in args.budgets.split(",")]:
            for ends in args.ends.split(","):
                cm, _, rt = chronos_mlx.load(str(path), expert_budget=b, dtype=args.dtype)
                if args.predictor:
                    from chronos_mlx.predict_runtime import attach_predictor

                    attach_predictor(cm, rt, args.predictor)
                got = [t for t, _ in generate_step(prompt, cm, rt, max_tokens=args.max_tokens,
                                                   sync=ends if ends in ("device-wait", "device-fetch") else "optimistic",
                                                   segment_ends=frozenset() if ends == "none" else None)]
                if rt.waiter is not None:
                    rt.waiter.close()
                up = rt.cache.upload if rt.cache is not None else None
                first = first_difference(got[:repeatable], want[:repeatable])
                same = first is None
                ok &= same
                rows.append({"prompt": p, "prompt_tokens": prompt.size, "budget": b, "ends": ends, "exact": same,
                             "first_difference": first, "stock_repeatable": repeatable, "recomputes": rt.counters.recomputes,
                             "device_waits": rt.stats()["device_waits"],
                             "device_copies": up.copies if up else 0, "device_copy_bytes": up.bytes if up else 0})
                print(f"prompt {p} ({prompt.size} tokens), budget {b:>5}, ends {ends}: "
                      f"{'exact' if same else f'DIFFERS at token {first}'}"
                      f"{'' if repeatable == args.max_tokens else f' (of the {repeatable} tokens stock repeats)'}"
                      f"  ({rt.counters.recomputes} recomputations, {rows[-1]['device_waits']} device waits,"
                      f" {rows[-1]['device_copies']} device copies, {rows[-1]['device_copy_bytes'] / 1e6:.1f} MB)",
                      flush=True)
                del cm, rt
    save_json(args.json, {"device": str(mx.default_device()), "args": vars(args), "rows": rows}, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
