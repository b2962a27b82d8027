"""Where a resident decode step's time goes, stock mlx_lm against chronos at budget 1.0.

    python scripts/resident_overhead.py [--model DIR] [--tokens 64] [--rounds 3] [--stock-experts] [--json OUT]

With every expert resident nothing can miss, so chronos's only cost is what it adds to
building each step's graph (Python, on the host) and to the graph itself (device). For
stock and chronos alike, each decode step is timed in three parts, unpipelined:
  build  the model call that builds the step's graph (host only; nothing is evaluated),
  eval   evaluating it (the device's work plus MLX's encoding of it),
then both models decode `--tokens` tokens through `mlx_lm.generate_step` (pipelined: the
host builds step n+1 while the device runs step n), interleaved `--rounds` times, who goes
first alternating. Where
the build is close to the eval, the host is the bottleneck of the pipelined loop and every
microsecond chronos adds per layer shows in tok/s (the H200 at 1.0: stock 71 tok/s, 48 MoE
layers). `--stock-experts` adds a chronos model whose expert modules are stock's: a gap it
shares lies outside StreamingSwitch. The tokens must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from own_vs_plain import drive  # noqa: E402
from results import save_json  # noqa: E402


def split_step(model, prompt: mx.array, tokens: int) -> dict:
    """Median build and eval time (µs) of unpipelined greedy decode steps."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)
    tok = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tok)
    builds, evals = [], []
    for _ in range(tokens):
        t0 = time.perf_counter()
        logits = model(tok, cache=cache)
        tok = mx.argmax(logits[:, -1:], axis=-1)
        t1 = time.perf_counter()
        mx.eval(tok)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        evals.append(t2 - t1)
    return {"build_us": statistics.median(builds) * 1e6, "eval_us": statistics.median(evals) * 1e6}


def one_layer_us(switch, x: mx.array, indices: mx.array, calls: int = 200) -> float:
    """Median time (µs) of one MoE layer's expert call, built and evaluated alone."""
    mx.eval(switch(x, indices))
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        mx.eval(switch(x, indices))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def decode(model, prompt: mx.array, tokens: int):
    """(tokens, decode tok/s after the first) of mlx_lm's pipelined loop."""
    from mlx_lm.generate import generate_step

    return drive(generate_step(prompt, model, max_tokens=tokens))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--stock-experts", action="store_true",
                    help="also a chronos model whose expert modules are stock's (bisects a gap)")
    ap.add_argument("--json")
    args = ap.parse_args()

    from mlx_lm import load as stock_load
    from mlx_lm.utils import load_tokenizer

    import chronos_mlx
    from chronos_mlx.loader import compute_dtype, resolve_model_path

    path = resolve_model_path(args.model)
    prompt = mx.array(load_tokenizer(path).encode("The history of the Roman Empire begins"))
    stock, _ = stock_load(str(path))
    target = compute_dtype(args.dtype)
    if target is not None:
        stock.set_dtype(target)
    mx.eval(stock.parameters())
    model, _, runtime = chronos_mlx.load(args.model, expert_budget=1.0, dtype=args.dtype)
    models = {"stock": stock, "chronos": model}
    n_moe = len(runtime.cache.layers)
    from chronos_mlx.traces import moe_modules

    if args.stock_experts:
        # A second chronos model whose expert modules are stock's own (the same weights): the
        # process and the model as chronos makes them, the experts' forward as stock's. Between
        # the two chronos rows is what StreamingSwitch costs; between it and stock, the rest.
        hybrid, _, _ = chronos_mlx.load(args.model, expert_budget=1.0, dtype=args.dtype)
        by_path = dict(moe_modules(stock))
        for name, _ in moe_modules(hybrid):
            parent, attr = name.rsplit(".", 1)
            setattr(dict(hybrid.named_modules())[parent], attr, by_path[name])
        models["chronos-stock-experts"] = hybrid

    # Layer 0's expert call alone, on the same input and ids: the kernels' own time apart from the loop.
    switches = {name: moe_modules(models[name])[0][1] for name in ("stock", "chronos")}
    proj = next(iter(switches["stock"].children().values()))
    x = mx.random.normal((1, 1, stock.args.hidden_size)).astype(proj["scales"].dtype if "scales" in proj
                                                                 else proj["weight"].dtype)
    ids = mx.array([[list(range(runtime.info["top_k"]))]], dtype=mx.uint32)
    layer_us = {name: one_layer_us(sw, x, ids) for name, sw in switches.items()}
    layers = runtime.cache.layers
    print(f"layer 0's expert call alone: stock {layer_us['stock']:.0f} us, chronos {layer_us['chronos']:.0f} us; "
          f"layers full {sum(L.full for L in layers)}/{n_moe}, slot table the identity "
          f"{sum(L.identity for L in layers)}/{n_moe}", flush=True)
    for m in models.values():  # warm-up: kernels compile on first use
        split_step(m, prompt, 4)
        decode(m, prompt, 4)
    out = {"model": str(path), "device": str(mx.default_device()), "moe_layers": n_moe, "tokens": args.tokens,
           "rounds": args.rounds, "split": {}, "one_layer_us": layer_us,
           "identity_layers": sum(L.identity for L in layers), "full_layers": sum(L.full for L in layers), "decode_tokens_per_s": {k: [] for k in models}}
    splits = {k: [] for k in models}
    identical = True
    for r in range(args.rounds):
        # Who goes first alternates: a model run second in every round might pay for the first's garbage.
        order = list(models.items())[:: 1 if r % 2 == 0 else -1]
        for name, m in order:
            splits[name].append(split_step(m, prompt, args.tokens))
        got = {name: decode(m, prompt, args.tokens) for name, m in order}
        identical &= all(toks == got["stock"][0] for toks, _ in got.values())
        for name, (_, tps) in got.items():
            out["decode_tokens_per_s"][name].append(tps)
    for name, rows in splits.items():
        out["split"][name] = {k: statistics.median(r[k] for r in rows) for k in ("build_us", "eval_us")}
    s, c = out["split"]["stock"], out["split"]["chronos"]
    tps = {k: statistics.median(v) for k, v in out["decode_tokens_per_s"].items()}
    out["ratio"] = tps["chronos"] / tps["stock"]
    out["ratios"] = {k: v / tps["stock"] for k, v in tps.items()}
    out["added_build_us_per_moe_layer"] = (c["build_us"] - s["build_us"]) / n_moe
    out["added_eval_us_per_moe_layer"] = (c["eval_us"] - s["eval_us"]) / n_moe
    out["tokens_identical"] = identical
    for name in models:
        print(f"{name:21s} build {out['split'][name]['build_us']:8.0f} us  eval {out['split'][name]['eval_us']:8.0f} us"
              f"  pipelined {tps[name]:6.1f} tok/s ({out['ratios'][name]:.3f}x)")
    print(f"chronos / stock {out['ratio']:.3f}x; chronos adds {out['added_build_us_per_moe_layer']:.1f} us of build "
          f"and {out['added_eval_us_per_moe_layer']:.1f} us of eval per MoE layer ({n_moe}); tokens identical: {identical}")
    save_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
