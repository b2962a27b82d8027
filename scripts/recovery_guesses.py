"""How right a recovery's loads are for the layers after the first miss (issue 12).

    python scripts/recovery_guesses.py [--model DIR] [--budget 0.5] [--prompts 2] [--max-tokens 48]
                                       [--domains en,python,de] [--json OUT]

Decodes greedily with whole-token optimism (no segment end: every miss is found after the
step). A failed step is recomputed from its first missed layer, and the recovery loads, as
one batch, what every later layer chose too — on inputs that were wrong from the first miss
on, so those sets are guesses. Each recovery's sets are compared with stock mlx_lm's routing
of the same token (recorded afterwards over the whole text): the share of guessed experts
the exact step used. A synthetic table-routed checkpoint (bench_routing.py) routes by
position, so its guesses are always right; a trained model's are not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from results import save_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--prompts", type=int, default=2, help="per domain")
    ap.add_argument("--domains", default="en,python,de")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()

    from mlx_lm import load as stock_load
    from mlx_lm.models.cache import make_prompt_cache

    import chronos_mlx
    from chronos_mlx.bench_routing import record_routing
    from chronos_mlx.cache import id_list
    from chronos_mlx.generate import generate_step
    from chronos_mlx.loader import resolve_model_path
    from chronos_mlx.workloads import load_prompts

    path = resolve_model_path(args.model)
    model, tok, rt = chronos_mlx.load(str(path), args.budget, dtype="float32")
    stock, _ = stock_load(str(path))
    stock.set_dtype(mx.float32)
    recoveries: list = []
    cache_box: list = []
    real = rt.load_layers

    def load_layers(wanted):
        # Called right after the rollback: the caches hold the tokens before this step.
        first = min(wanted)
        recoveries.append((cache_box[0][0].offset, first, {l: set(id_list(e)) for l, e in wanted.items() if l > first}))
        return real(wanted)

    rt.load_layers = load_layers
    guessed = used = tokens = n_rec = 0
    for domain in args.domains.split(","):
        for ids in load_prompts(domain, str(path), limit=args.prompts, max_prompt_tokens=256):
            ids = [int(t) for t in ids]
            recoveries.clear()
            cache_box[:] = [make_prompt_cache(model)]
            out = [int(t) for t, _ in generate_step(mx.array(ids), model, rt, max_tokens=args.max_tokens,
                                                    prompt_cache=cache_box[0], segment_ends=frozenset())]
            tokens += len(out)
            truth = record_routing(stock, [ids + out])[0]  # [layers, positions, k]
            for pos, _, sets in recoveries:
                n_rec += 1
                for layer, want in sets.items():
                    guessed += len(want)
                    used += len(want & set(truth[layer, pos].tolist()))
    result = {"budget": args.budget, "tokens": tokens, "recoveries_per_token": n_rec / max(tokens, 1),
              "guessed_experts": guessed, "guesses_used": used, "precision": used / max(guessed, 1)}
    print(f"budget {args.budget}: {n_rec / max(tokens, 1):.2f} recoveries a token; of {guessed} experts loaded "
          f"for layers after the first miss, {used / max(guessed, 1):.1%} were used")
    save_json(args.json, result, indent=1)


if __name__ == "__main__":
    main()
