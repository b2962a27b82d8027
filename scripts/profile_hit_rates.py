"""Expert-cache hit rates of the cache policies and of workload profiles (issue 4).

    python scripts/profile_hit_rates.py [--prompts 3] [--max-tokens 32] [--budgets 0.5,0.25,0.125]
                                        [--short 16] [--workloads en,de,...] [--json OUT]

For each workload, the first `--prompts` held-out prompts (second half of the file; the
shipped profiles in profiles/ were recorded from the first half) are run once through stock
mlx_lm (float32, greedy, `--max-tokens` new tokens) to record their routing. Because chronos
gives exactly stock's tokens under every policy and budget, that routing is what chronos's
cache sees; it is replayed through chronos's own ExpertCache (real policy objects, real
reads from the shards) pass by pass, the way chronos's decode loop drives it: the prompt as
one prefill pass (waves when it needs more experts than slots), then one pass per token.

Reported, per workload and budget:
- session hit rate (prefill and decode uses, as `runtime.stats()` counts them) and decode
  hit rate, the prompts run one after another on one cache that starts empty, for
  lru, lfu, usage (no profile), usage + the workload's profile (seeded, pre-warmed), and
  usage + the profile least like the workload's (the wrong-workload case);
- cold start: a fresh cache per prompt, hit rate of the first 32 decode tokens and expert
  loads before the first token, without and with pre-warm, for the full prompt and for its
  first `--short` tokens (a chat-sized prompt);
- reads merged by `chronos pack`: read calls (one per expert parameter today, or one per
  run of experts adjacent on disk) for the cache's loads, in the original layout and in the
  layout `chronos pack --profile <workload>` writes.
Also the cost of the activation-statistics observer per routing decision.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import chronos_mlx  # noqa: E402
from chronos_mlx.cache import ExpertCache  # noqa: E402
from chronos_mlx.loader import plan_model  # noqa: E402
from chronos_mlx.pack import count_reads, expert_order  # noqa: E402
from chronos_mlx.profiles import apply_profile, compare_profiles, load_profile  # noqa: E402
from chronos_mlx.runtime import Runtime  # noqa: E402
from chronos_mlx.shards import ShardIndex, ShardReader  # noqa: E402
from chronos_mlx.traces import record_traces  # noqa: E402
from chronos_mlx.usage import ActivationStats  # noqa: E402
from chronos_mlx.workloads import read_prompts  # noqa: E402
from results import save_json  # noqa: E402

PROFILES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "python": "python", "c": "c"}
PREFILL_STEP = 2048  # chronos generate_step's default prefill chunk


def passes_of(seq) -> list:
    """The forward passes chronos makes for one traced sequence: (first, end) token ranges."""
    n = len(seq.tokens)
    out, pos = [], 0
    while seq.n_prompt - pos > 1:  # prefill: all prompt tokens but the last, in chunks
        step = min(PREFILL_STEP, seq.n_prompt - 1 - pos)
        out.append((pos, pos + step))
        pos += step
    out += [(t, t + 1) for t in range(pos, n)]  # the last prompt token, then one per token
    return out


class Sim:
    """A fresh chronos expert cache of `slots` per layer, driven pass by pass."""

    def __init__(self, plan, reader, slots, policy):
        self.cache = ExpertCache(plan.layers, slots, reader, policy)  # inline reads: deterministic
        self.runtime = Runtime(self.cache, dict(plan.info), reader)
        self.loads = []  # (layer, experts loaded by one cache fill, in a decode pass?)

    def run(self, seq):
        """Replay one sequence; per pass (is decode, hits, misses) summed over layers."""
        rows = []
        experts = seq.experts.astype(np.int64)  # [layers, tokens, k]
        for a, b in passes_of(seq):
            decode = b - a == 1 and a >= seq.n_prompt - 1
            hits = misses = 0
            for layer in range(experts.shape[0]):
                ids = experts[layer, a:b].reshape(-1)
                uniq = np.unique(ids)
                L = self.cache.layers[layer]
                hits += ids.size - len(uniq)  # repeats within a batch are hits, as in Runtime.route
                for w in range(0, len(uniq), L.num_slots):  # waves, as in StreamingSwitch._waves
                    wave = uniq[w : w + L.num_slots]
                    got = self.cache.ensure(layer, wave)
                    if got:
                        self.loads.append((layer, got, decode))
                    misses += len(got)
                    hits += len(wave) - len(got)
                    self.cache.mark_used(layer, wave)
            rows.append((decode, hits, misses))
        return rows


class Belady:
    """Offline optimal eviction (the bound): evict the expert whose next use is furthest.

    Knows the layer's future uses: `uses[i]` is the set the cache's i-th fill of this
    layer protects and then touches (one per pass, or per wave); `touch` advances."""

    def __init__(self, uses: list):
        self.uses, self.i = uses, 0
        self.resident = set()
        far = len(uses)
        # next_at[i][e]: first j >= i with e in uses[j] (computed backwards once)
        self.next_at, nxt = [None] * (far + 1), {}
        self.next_at[far] = {}
        for j in range(far - 1, -1, -1):
            nxt = dict(nxt)
            for e in uses[j]:
                nxt[e] = j
            self.next_at[j] = nxt

    def touch(self, experts):
        self.i += 1

    def added(self, e):
        self.resident.add(e)

    def removed(self, e):
        self.resident.discard(e)

    def victim(self, protected):
        upcoming = self.next_at[min(self.i, len(self.uses))]
        cand = [e for e in self.resident if e not in protected]
        return max(cand, key=lambda e: (upcoming.get(e, len(self.uses) + 1), e))


def fills(seqs, num_layers: int, slots: int) -> list:
    """Per layer, the expert sets the Sim protects-then-touches, in order (policy independent)."""
    out = [[] for _ in range(num_layers)]
    for seq in seqs:
        experts = seq.experts.astype(np.int64)
        for a, b in passes_of(seq):
            for layer in range(num_layers):
                uniq = np.unique(experts[layer, a:b].reshape(-1))
                out[layer] += [set(uniq[w : w + slots].tolist()) for w in range(0, len(uniq), slots)]
    return out


def rate(rows, decode_only=False, first=None):
    sel = [r for r in rows if r[0] or not decode_only]
    sel = sel[:first] if first else sel
    h, m = sum(r[1] for r in sel), sum(r[2] for r in sel)
    return h / (h + m) if h + m else 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--budgets", default="0.5,0.25,0.125")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--workloads", default=",".join(PROFILES))
    ap.add_argument("--json", default="bench-out/profile_hit_rates.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    workloads = args.workloads.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]

    from mlx_lm import load as stock_load

    stock, tokenizer = stock_load(str(chronos_mlx.DEFAULT_MODEL))
    stock.set_dtype(mx.float32)
    model, _, _ = chronos_mlx.load(None, expert_budget=1.0)  # apply_profile checks its fingerprint
    plan = plan_model(None)
    reader = ShardReader(ShardIndex.open(plan.path))
    tensors = [[t for t, _ in layer.values()] for layer in plan.layers]
    E, k = plan.info["num_experts"], plan.info["top_k"]
    profiles = {w: load_profile(PROFILES[w]) for w in PROFILES}
    # The wrong-workload profile: the one whose hot sets overlap least with the workload's own.
    wrong = {}
    for w in workloads:
        overlap = {o: np.mean([r["jaccard"] for r in compare_profiles(profiles[w], profiles[o])]) for o in PROFILES if o != w}
        wrong[w] = min(overlap, key=overlap.get)

    traces, shorts = {}, {}
    for w in workloads:
        texts = read_prompts(w, "heldout")[: args.prompts]
        t0 = time.perf_counter()
        traces[w] = record_traces(stock, tokenizer, texts, args.max_tokens, keep_hidden=False).sequences
        shorts[w] = record_traces(stock, tokenizer, texts, args.max_tokens, keep_hidden=False,
                                  max_prompt_tokens=args.short).sequences
        print(f"  traced {w}: {sum(len(s.tokens) for s in traces[w])} tokens in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)

    def session(w, budget, policy, profile=None, seqs=None, pin=False):
        slots = int(budget * E + 1e-9)
        sim = Sim(plan, reader, slots, policy)
        if profile is not None:
            apply_profile(sim.runtime, model, profile, pin=pin).join()
        rows = []
        for seq in seqs or traces[w]:
            rows += sim.run(seq)
        return rows, sim

    def belady(w, budget):
        slots = int(budget * E + 1e-9)
        sim = Sim(plan, reader, slots, "lru")
        for L, uses in zip(sim.cache.layers, fills(traces[w], len(sim.cache.layers), slots)):
            L.policy = Belady(uses)
        rows = []
        for seq in traces[w]:
            rows += sim.run(seq)
        return rows

    def reads(loads, decode_only=False):
        return count_reads([(l, e) for l, e, d in loads if d or not decode_only], tensors)

    def cold(w, budget, seqs, profile=None):
        """Fresh cache per prompt: first-32 decode hit rate, loads before the first token."""
        slots = int(budget * E + 1e-9)
        first, before = [], []
        for seq in seqs:
            sim = Sim(plan, reader, slots, "usage")
            if profile is not None:
                apply_profile(sim.runtime, model, profile).join()
            rows = sim.run(seq)
            first += [r for r in rows if r[0]][:32]
            n_prefill = sum(1 for r in rows if not r[0])
            before.append(sum(r[2] for r in rows[: n_prefill + 1]))  # prefill and the pass giving token 1
        return rate(first), float(np.mean(before))

    results = []
    for w in workloads:
        own, other = profiles[w], profiles[wrong[w]]
        for budget in budgets:
            row = {"workload": w, "budget": budget, "slots": int(budget * E + 1e-9), "wrong_profile": PROFILES[wrong[w]]}
            n_last = len(passes_of(traces[w][-1]))
            for label, policy, prof in (("lru", "lru", None), ("lfu", "lfu", None), ("usage", "usage", None),
                                        ("usage+profile", "usage", own), ("usage+wrong", "usage", other),
                                        ("usage+profile+pins", "usage", own)):
                rows, sim = session(w, budget, policy, prof, pin=label.endswith("pins"))
                row[label] = rate(rows)
                row[label + "_decode"] = rate(rows, decode_only=True)
                # Recovery from a wrong profile shows in the session's last prompt.
                row[label + "_last_prompt_decode"] = rate(rows[-n_last:], decode_only=True)
                if label == "usage+profile":
                    # The packed checkpoint has the same headers, so expert i of a layer sits where
                    # expert i sat before; its router numbers the experts by position. The same
                    # session on it is the trace renumbered, with the profile renumbered too (the
                    # fingerprint is left as is only so apply_profile accepts it on this model).
                    perms = [expert_order(own.coactivation[l], own.counts[l], seed=0)[0] for l in range(own.num_layers)]
                    inverse = np.stack([np.argsort(p) for p in perms])
                    packed_seqs = [replace(q, experts=np.stack([inverse[l][q.experts[l]] for l in range(len(perms))]))
                                   for q in traces[w]]
                    _, packed = session(w, budget, "usage", own.permuted(perms, own.fingerprint), packed_seqs)
                    row["reads"] = {
                        "expert_loads": sum(len(e) for _, e, _ in sim.loads),
                        "decode_expert_loads": sum(len(e) for _, e, d in sim.loads if d),
                        "before": reads(sim.loads),
                        "after_pack": reads(packed.loads),
                        "decode_before": reads(sim.loads, True),
                        "decode_after_pack": reads(packed.loads, True),
                    }
            rows = belady(w, budget)
            row["belady"], row["belady_decode"] = rate(rows), rate(rows, decode_only=True)
            for kind, seqs in (("full", traces[w]), ("short", shorts[w])):
                for label, prof in (("none", None), ("profile", own), ("wrong", other)):
                    r32, loads = cold(w, budget, seqs, prof)
                    row[f"first32_{kind}_{label}"] = r32
                    row[f"loads_to_first_token_{kind}_{label}"] = loads
            results.append(row)
            print(f"  {w} @ {budget}: lru {row['lru']:.3f} lfu {row['lfu']:.3f} usage {row['usage']:.3f} "
                  f"+profile {row['usage+profile']:.3f} +wrong {row['usage+wrong']:.3f}", file=sys.stderr, flush=True)

    # Observer cost: one decode pass (k ids) and one 512-token prefill pass per call.
    stats = ActivationStats(plan.info["moe_layers"], E, k)
    rng = np.random.default_rng(0)
    dec = [rng.permutation(E)[:k].astype(np.uint32) for _ in range(20000)]
    t0 = time.perf_counter()
    for i, d in enumerate(dec):
        stats.observe(i % stats.num_layers, d)
    stats.flush()
    per_decode = (time.perf_counter() - t0) / len(dec)
    pre = np.stack([rng.permutation(E)[:k] for _ in range(512)]).reshape(-1).astype(np.uint32)
    t0 = time.perf_counter()
    for i in range(100):
        stats.observe(i % stats.num_layers, pre)
    stats.flush()
    per_prefill = (time.perf_counter() - t0) / 100

    out = {
        "command": " ".join(["python"] + sys.argv),
        "model": str(chronos_mlx.DEFAULT_MODEL.name),
        "prompts_per_workload": args.prompts,
        "max_tokens": args.max_tokens,
        "short_prompt_tokens": args.short,
        "observer_us_per_decode_pass": per_decode * 1e6,
        "observer_us_per_512_token_prefill_pass": per_prefill * 1e6,
        "seconds": time.perf_counter() - t_start,
        "results": results,
    }
    print_tables(out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_json(args.json, out, indent=1)


def print_tables(out):
    rows = out["results"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    print("\n### Session hit rate, % (decode-only in parentheses)\n")
    cols = ("lru", "lfu", "usage", "usage+profile", "usage+profile+pins", "usage+wrong", "belady")
    print("| workload | budget | lru | lfu | usage | usage+profile | usage+profile, pins | usage+wrong profile | optimal (Belady) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{pct(r[c])} ({pct(r[c + '_decode'])})" for c in cols]
        cells[5] += f" {r['wrong_profile']}"
        print(f"| {r['workload']} | {r['budget']} | " + " | ".join(cells) + " |")
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["budget"] == budget]
        m = lambda c: np.mean([r[c] for r in sel])  # noqa: E731
        cells = [f"{pct(m(c))} ({pct(m(c + '_decode'))})" for c in cols]
        print(f"| **mean** | {budget} | " + " | ".join(cells) + " |")

    print("\n### Cold start: hit rate of the first 32 decode tokens, % (expert loads before the first token)\n")
    print("| workload | budget | full prompt: no pre-warm | pre-warm | wrong pre-warm | "
          f"first {out['short_prompt_tokens']} tokens: no pre-warm | pre-warm | wrong pre-warm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for kind in ("full", "short"):
            for label in ("none", "profile", "wrong"):
                cells.append(f"{pct(r[f'first32_{kind}_{label}'])} ({r[f'loads_to_first_token_{kind}_{label}']:.0f})")
        print(f"| {r['workload']} | {r['budget']} | " + " | ".join(cells) + " |")
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["budget"] == budget]
        cells = []
        for kind in ("full", "short"):
            for label in ("none", "profile", "wrong"):
                cells.append(f"{pct(np.mean([r[f'first32_{kind}_{label}'] for r in sel]))} "
                             f"({np.mean([r[f'loads_to_first_token_{kind}_{label}'] for r in sel]):.0f})")
        print(f"| **mean** | {budget} | " + " | ".join(cells) + " |")

    print("\n### Wrong-workload profile: decode hit rate of the session's last prompt, %\n")
    print("| workload | wrong profile | budget | lru | usage, no profile | usage + own profile | usage + wrong profile |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [pct(r[c + "_last_prompt_decode"]) for c in ("lru", "usage", "usage+profile", "usage+wrong")]
        print(f"| {r['workload']} | {r['wrong_profile']} | {r['budget']} | " + " | ".join(cells) + " |")

    print("\n### Reads merged by `chronos pack` (usage+profile session; all loads, then decode-time loads)\n")
    print("| workload | budget | loads | read calls today | merged, original layout | merged, packed layout | "
          "decode loads | calls today | merged, original | merged, packed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    kb = lambda r: f"{r['calls_merged']} ({r['bytes_per_call_merged'] / 1e3:.0f} KB/call)"  # noqa: E731
    for r in rows:
        x = r["reads"]
        print(f"| {r['workload']} | {r['budget']} | {x['expert_loads']} | {x['before']['calls_per_expert']} "
              f"({x['before']['bytes_per_call_per_expert'] / 1e3:.0f} KB/call) | {kb(x['before'])} | {kb(x['after_pack'])} | "
              f"{x['decode_expert_loads']} | {x['decode_before']['calls_per_expert']} | {kb(x['decode_before'])} | "
              f"{kb(x['decode_after_pack'])} |")
    print(f"\nobserver: {out['observer_us_per_decode_pass']:.1f} us per decode pass, "
          f"{out['observer_us_per_512_token_prefill_pass']:.0f} us per 512-token prefill pass; "
          f"{out['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
