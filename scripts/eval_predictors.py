#!/usr/bin/env python
"""How well can a MoE layer's experts be predicted before its router runs? Held-out evaluation.

Trains on the first half of each workload file (`{"prompt": ...}` per line), evaluates on
the second half, on routing traces recorded from the model itself (greedy generation):

- per predictor and lookahead distance (next layer, 2 layers ahead, next token, 2 tokens
  ahead): recall and precision of the top-8 and top-16 guesses against the true top-k;
- the intent classifier's recall / precision / activation coverage of the set of experts the
  whole generation uses, per layer, at a few set sizes, against "the prompt's most-used".

Writes a markdown report (default docs/predictors.md); optionally saves the trained
predictors (`--save-predictors DIR`, e.g. profiles/demo-moe-4bit/predictors).

    python scripts/eval_predictors.py                      # ~7-10 min on 2 CPU cores
    python scripts/eval_predictors.py --test-per-file 0    # every held-out prompt (~+5 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chronos_mlx.predictors import (  # noqa: E402
    INTENT_FILE,
    LOOKAHEAD_FILE,
    LOOKAHEAD_TARGETS,
    MARKOV_FILE,
    CrossLayerGatePredictor,
    MarkovPredictor,
    PreviousTokenPredictor,
    evaluate_intent,
    evaluate_predictors,
    prompt_baseline_scores,
    target_name,
    train_intent,
    train_lookahead,
)
from chronos_mlx.traces import RoutingTrace, find_routers, record_traces  # noqa: E402

DEFAULT_WORKLOADS = Path("/work/shared/workloads")
KS = (8, 16)
SIZES = (8, 16, 24, 32)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def split_workloads(directory: Path, train_per_file: int, test_per_file: int):
    """First half of each file -> train, second half -> test (each capped; 0 = no cap)."""
    train, test, files = [], [], []
    for f in sorted(directory.glob("*.jsonl")):
        prompts = [json.loads(line)["prompt"] for line in f.read_text().splitlines() if line.strip()]
        h = (len(prompts) + 1) // 2  # as chronos_mlx.workloads: the first half has the odd one
        tr, te = prompts[:h], prompts[h:]
        tr = tr[:train_per_file] if train_per_file else tr
        te = te[:test_per_file] if test_per_file else te
        train += tr
        test += te
        files.append((f.stem, len(prompts), len(tr), len(te)))
    return train, test, files


def traces_for(name, model, tok, prompts, args):
    """Record (or reuse from --traces-cache, keyed by the settings) the traces of `prompts`."""
    cache = None
    if args.traces_cache:
        key = f"{name}-p{len(prompts)}-mp{args.max_prompt_tokens}-n{args.max_tokens}-tp{args.train_per_file}-te{args.test_per_file}"
        cache = Path(args.traces_cache) / f"{key}.npz"
        if cache.exists():
            log(f"{name}: traces from {cache}")
            return RoutingTrace.load(cache), 0.0
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 15 or done == total:
            last[0] = now
            log(f"  {name}: {done}/{total} positions, {now - t0:.0f} s")

    trace = record_traces(
        model, tok, prompts, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, progress=progress
    )
    dt = time.perf_counter() - t0
    if cache is not None:
        trace.save(cache)
    return trace, dt


def fmt_recall_table(res: dict) -> list[str]:
    head = "| predictor | " + " | ".join(f"{target_name(t)} R@8 | R@16 | P@16" for t in LOOKAHEAD_TARGETS) + " |"
    sep = "|---|" + "---:|" * (3 * len(LOOKAHEAD_TARGETS))
    rows = [head, sep]
    for name, per in res.items():
        cells = []
        for t in LOOKAHEAD_TARGETS:
            r = per.get(t)
            if r is None:
                cells += ["–", "–", "–"]
            else:
                cells += [f"{r[8]['recall']:.3f}", f"{r[16]['recall']:.3f}", f"{r[16]['precision']:.3f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def fmt_intent_table(res: dict) -> list[str]:
    names = [n for n in res if not n.startswith("_")]
    head = "| prefill intent, per layer | " + " | ".join(f"{m} experts: recall | precision | coverage" for m in SIZES) + " |"
    rows = [head, "|---|" + "---:|" * (3 * len(SIZES))]
    for n in names:
        cells = []
        for m in SIZES:
            r = res[n][m]
            cells += [f"{r['recall']:.3f}", f"{r['precision']:.3f}", f"{r['coverage']:.3f}"]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the embedded demo model)")
    ap.add_argument("--workloads", type=Path, default=DEFAULT_WORKLOADS)
    ap.add_argument("--train-per-file", type=int, default=0, help="prompts of each file's first half to train on (0: all)")
    ap.add_argument("--test-per-file", type=int, default=6, help="prompts of each file's second half to test on (0: all)")
    ap.add_argument("--max-prompt-tokens", type=int, default=128, help="keep the first N tokens of each prompt")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (greedy)")
    ap.add_argument("--epochs", type=int, default=8, help="lookahead router epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "predictors.md", help="markdown report ('-': none)")
    ap.add_argument("--save-predictors", type=Path, default=None, help="save the trained predictors here")
    ap.add_argument("--traces-cache", type=Path, default=None, help="reuse/save recorded traces in this directory")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    args = ap.parse_args(argv)

    import chronos_mlx

    t_start = time.perf_counter()
    model, tok, runtime = chronos_mlx.load(args.model, expert_budget=1.0)
    info = runtime.info
    train_p, test_p, files = split_workloads(args.workloads, args.train_per_file, args.test_per_file)
    log(f"{len(train_p)} training prompts, {len(test_p)} held-out prompts from {len(files)} files")

    train_tr, t_rec_train = traces_for("train", model, tok, train_p, args)
    test_tr, t_rec_test = traces_for("test", model, tok, test_p, args)

    routers = find_routers(model)
    t0 = time.perf_counter()
    last = [0.0]

    def tprog(step, total, loss):
        if time.perf_counter() - last[0] > 15 or step == total:
            last[0] = time.perf_counter()
            log(f"  lookahead: step {step}/{total}, loss {loss:.3f}")

    lookahead, hist = train_lookahead(train_tr, routers=routers, epochs=args.epochs, seed=args.seed, progress=tprog)
    t_la = time.perf_counter() - t0
    t0 = time.perf_counter()
    markov = MarkovPredictor(train_tr.num_layers, train_tr.num_experts, train_tr.top_k).fit(train_tr)
    t_mk = time.perf_counter() - t0
    t0 = time.perf_counter()
    intent, ihist = train_intent(train_tr, seed=args.seed)
    t_in = time.perf_counter() - t0
    log(f"trained: lookahead {t_la:.0f} s (loss {hist['initial_loss']:.3f} -> {hist['final_loss']:.3f}), "
        f"markov {t_mk:.0f} s, intent {t_in:.0f} s")

    preds = {
        "previous token": PreviousTokenPredictor.for_trace(train_tr),
        "cross-layer gate (router of layer l+j on x_l)": CrossLayerGatePredictor.from_model(model, top_k=train_tr.top_k),
        "Markov, 2nd order": markov,
        "lookahead router (learned)": lookahead,
    }
    res_gen = evaluate_predictors(preds, test_tr, KS, positions="generated")
    res_all = evaluate_predictors(preds, test_tr, KS, positions="all")
    ires = evaluate_intent({"prompt's most-used experts": prompt_baseline_scores, "intent classifier": intent.predict}, test_tr, SIZES)
    total_s = time.perf_counter() - t_start

    if args.save_predictors:
        d = args.save_predictors
        d.mkdir(parents=True, exist_ok=True)
        lookahead.save(d / LOOKAHEAD_FILE)
        markov.save(d / MARKOV_FILE, fingerprint=train_tr.fingerprint)
        intent.save(d / INTENT_FILE)
        log(f"saved predictors to {d}")

    cmd = "python scripts/eval_predictors.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    n_gen = sum(int(s.generated.sum()) for s in test_tr.sequences)
    lines = [
        "# Expert predictors: held-out evaluation",
        "",
        f"Generated by `{cmd}` in {total_s / 60:.1f} min on {platform.machine()} "
        f"({mx.default_device()}, float32; recording traces {t_rec_train + t_rec_test:.0f} s, "
        f"training the lookahead router {t_la:.0f} s).",
        "",
        f"- Model: `{Path(info['path']).name}` ({info['moe_layers']} MoE layers, {info['num_experts']} experts, "
        f"top-{info['top_k']}).",
        f"- Workloads: `{args.workloads}` ({', '.join(f'{n} {a}' for n, a, _, _ in files)} prompts). "
        f"Training: {f'the first {args.train_per_file}' if args.train_per_file else 'all'} prompts of each file's first half "
        f"({len(train_tr)} prompts, {train_tr.num_tokens} positions); test: "
        f"{f'the first {args.test_per_file}' if args.test_per_file else 'all'} of each file's second half ({len(test_tr)} prompts, {test_tr.num_tokens} positions, "
        f"{n_gen} generated tokens). Prompts cut to their first {args.max_prompt_tokens} tokens, "
        f"{args.max_tokens} tokens generated greedily.",
        f"- Lookahead router: {lookahead.num_parameters():,} parameters (rank {lookahead.config.rank}), "
        f"{args.epochs} epochs, seed {args.seed}, started from the routers (SVD).",
        "",
        "R@k = recall: the fraction of the true top-k experts among the k best guesses (8 or 16);",
        "P@16 = precision of 16 guesses (with 8 guesses and top-8 routing precision equals recall).",
        "",
        "## Decode positions (the prediction's target is a generated token)",
        "",
        *fmt_recall_table(res_gen),
        "",
        "## All positions (prompt and generated)",
        "",
        *fmt_recall_table(res_all),
        "",
        "## Prefill intent: the experts the whole generation will use",
        "",
        "Per layer, a set of m experts picked at prefill versus the experts used by the "
        f"{args.max_tokens} generated tokens at that layer: recall of that set, precision, and "
        "coverage (the fraction of the generated tokens' expert activations that fall in the set).",
        "",
        *fmt_intent_table(ires),
        "",
    ]
    text = "\n".join(lines)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        marker = "<!-- end of generated report -->"
        tail = ""
        if args.out.exists() and marker in args.out.read_text():
            tail = args.out.read_text().split(marker, 1)[1]
        args.out.write_text(text + "\n" + marker + tail)
        log(f"wrote {args.out}")
    if args.json:
        payload = {
            "generated": {n: {f"{t[0]},{t[1]}": v for t, v in per.items()} for n, per in res_gen.items()},
            "all": {n: {f"{t[0]},{t[1]}": v for t, v in per.items()} for n, per in res_all.items()},
            "intent": {n: v for n, v in ires.items() if not n.startswith("_")},
            "seconds": total_s,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
