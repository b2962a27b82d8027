"""How many decode misses could a better eviction policy save? (issue 12, "fewer bytes")

    python scripts/eviction_bounds.py [--budget 0.5] [--workload en] [--prompts 8] [--greedy] [--json OUT]

Records the demo model's (or --model's) routing on replayed workload text (every layer's
experts at every step, all experts resident), then replays it per layer through a cache of
the budget's slots with chronos's own policies (lru, lfu, usage), an offline guess of each
expert's next use from its own intervals (`reuse`), and with four that know
the future: the next token's experts (what a perfect next-token predictor could tell an
eviction), the next two tokens', the set used in the rest of the generation but not when
(`rest-set`: what a perfect intent predictor could tell it), and Belady's (every future use). A step's experts are
never evicted for each other; the prefill's experts fill the cache first. Prints decode
misses per token (summed over layers).
"""

from __future__ import annotations

import argparse

import numpy as np
from results import save_json


class _Recorder:
    def __init__(self):
        self.steps = []

    def observe(self, layer, experts):
        self.steps.append((layer, sorted(set(np.asarray(experts).reshape(-1).tolist()))))


def record(model_path, workload, prompts, max_prompt_tokens, max_tokens, greedy=False):
    """Per prompt, per MoE layer: the experts of each step (the prefill first). Replayed
    workload text, or with `greedy` the model's own greedy continuation of the prompt (what
    `chronos chat` decodes: a small model's greedy text often cycles)."""
    import chronos_mlx
    from chronos_mlx import bench

    texts, forced = bench.replay_texts(workload, model_path, limit=prompts, max_prompt_tokens=max_prompt_tokens,
                                       max_tokens=max_tokens)
    model, _, rt = chronos_mlx.load(model_path, expert_budget=1.0)
    out = []
    for p, f in zip(texts, forced):
        rec = _Recorder()
        rt.observers = [rec]
        bench._chronos_run(model, rt, p, max_tokens, "per-layer", None if greedy else f)
        layers = [[] for _ in rt.cache.layers]
        for layer, experts in rec.steps:
            layers[layer].append(experts)
        out.append(layers)
    return out, rt.cache.layers[0].num_experts


class _Future:
    """Eviction that knows the experts of the next `horizon` steps (None: all of them)."""

    def __init__(self, policy, horizon):
        self.policy, self.horizon = policy, horizon

    def victim(self, candidates, t, seq):
        if self.horizon == "set":  # only whether each is used again in this generation, not when
            rest = set().union(*seq[t + 1 :]) if t + 1 < len(seq) else set()
            unused = [e for e in candidates if e not in rest]
            if unused:
                return self.policy.victims(1, (set(candidates) - set(unused)) | self._others)[0]
            return self.policy.victims(1, self._others)[0]
        end = len(seq) if self.horizon is None else min(len(seq), t + 1 + self.horizon)

        def next_use(e):
            for u in range(t + 1, end):
                if e in seq[u]:
                    return u
            return 1 << 30

        # Furthest next use first; among those never used in the horizon, the policy's choice.
        far = max(next_use(e) for e in candidates)
        ties = [e for e in candidates if next_use(e) == far]
        if len(ties) == 1:
            return ties[0]
        protected = set(candidates) - set(ties)
        return self.policy.victims(1, protected | self._others)[0]


class _ReuseInterval:
    """Offline only (`reuse`): Belady with guessed times. Each expert's next use is guessed from
    its own history: an average of its intervals between uses (EMA), plus the time since its last
    use spread over its uses; evict the one guessed furthest away."""

    def __init__(self, num_experts: int, alpha: float = 0.2):
        self.t, self.alpha, self.resident = 0, alpha, set()
        self.last = np.full(num_experts, -1.0)
        self.interval = np.full(num_experts, 8.0)
        self.uses = np.zeros(num_experts)

    def touch(self, experts):
        self.t += 1
        for e in experts:
            if self.last[e] >= 0:
                self.interval[e] += self.alpha * (self.t - self.last[e] - self.interval[e])
            self.last[e], self.uses[e] = self.t, self.uses[e] + 1

    def added(self, e):
        self.resident.add(int(e))

    def removed(self, e):
        self.resident.discard(int(e))

    def victims(self, n, protected):
        def guess(e):
            since = self.t - self.last[e] if self.last[e] >= 0 else 1e6
            return since / max(self.uses[e], 1) + self.interval[e]

        return sorted((e for e in self.resident if e not in protected), key=guess, reverse=True)[:n]


def misses(seq, slots, num_experts, name):
    from chronos_mlx.policy import make_policy

    oracle = {"next-token": 1, "next-2-tokens": 2, "rest-set": "set", "belady": None}
    if name == "reuse":
        policy = _ReuseInterval(num_experts)
    else:
        policy = make_policy("usage" if name in oracle else name, num_experts)
    future = _Future(policy, oracle[name]) if name in oracle else None
    cache, count = [], 0
    for t, used in enumerate(seq):
        if t == 0 and len(used) > slots:  # prefill: the cache ends up holding some of its experts
            used = used[-slots:]
        for e in used:
            if e in cache:
                continue
            if t:
                count += 1
            if len(cache) >= slots:
                candidates = [c for c in cache if c not in used]
                if future is not None:
                    future._others = set(cache) - set(candidates)
                    v = future.victim(candidates, t, seq)
                else:
                    v = policy.victims(1, set(used))[0]
                cache.remove(v)
                policy.removed(v)
            cache.append(e)
            policy.added(e)
        policy.touch(set(used))
    return count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--workload", default="en")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--greedy", action="store_true", help="the model's greedy continuation instead of the workload text")
    ap.add_argument("--policies", default="lru,lfu,usage,next-token,next-2-tokens,rest-set,belady")
    ap.add_argument("--json")
    args = ap.parse_args()
    traces, num_experts = record(args.model, args.workload, args.prompts, args.max_prompt_tokens, args.max_tokens,
                                 args.greedy)
    slots = max(1, round(args.budget * num_experts))
    tokens = sum(len(layers[0]) - 1 for layers in traces)
    names = args.policies.split(",")
    out = {"budget": args.budget, "slots": slots, "decode_tokens": tokens, "misses_per_token": {}}
    for name in names:
        total = sum(misses(seq, slots, num_experts, name) for layers in traces for seq in layers)
        out["misses_per_token"][name] = total / tokens
        print(f"{name:>14}: {total / tokens:6.2f} decode misses per token", flush=True)
    save_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
