"""Eviction policies. A policy only orders experts of one layer; the cache does the rest.

Interface: `touch(experts)` on every use, `added(e)` / `removed(e)` as slots change, and
`victim(protected)` names the resident expert to evict, never one in `protected`;
`victims(n, protected)` the first n of them at once (a demand batch evicts several).

Policies choose *which* resident expert to evict and nothing else, so every policy gives
exactly the same tokens; only hit rates differ.

- `lru`: least recently used.
- `lfu`: LFU with dynamic aging (LFUDA): key = age + uses since loaded; evicting sets the
  age to the victim's key, so experts hot long ago eventually lose to ones hot now.
- `usage`: decayed frequency. Each expert's uses decay with a half-life (in uses of the
  layer, i.e. decode tokens); the history survives eviction. A profile can seed it (a light
  prior that decays like any history, so a wrong profile costs little and is forgotten) and,
  optionally, pin the profile's hottest experts; a pin is dropped once live use shows the
  expert is not hot after all.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np

from .errors import ChronosError


class LRUPolicy:
    """Evict the least recently used resident expert."""

    name = "lru"

    def __init__(self, num_experts: int):
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, experts):
        for e in experts:
            if e in self._order:
                self._order.move_to_end(e)

    def added(self, e: int):
        self._order[e] = None
        self._order.move_to_end(e)

    def removed(self, e: int):
        self._order.pop(e, None)

    def victim(self, protected) -> int:
        for e in self._order:
            if e not in protected:
                return e
        raise RuntimeError("every resident expert is protected: no victim")

    def victims(self, n: int, protected) -> list:
        """Up to `n` experts to evict, first victim first (as n calls of `victim` would)."""
        out = []
        for e in self._order:
            if len(out) == n:
                break
            if e not in protected:
                out.append(e)
        return out


def _ids(experts) -> np.ndarray:
    return np.fromiter(experts, dtype=np.int64)


class _ScoredPolicy:
    """Shared bookkeeping: a per-expert score, a use clock for tie-breaks, the resident set.

    State is a few numpy arrays indexed by expert id; `victim` is one masked argmin. The
    cache calls `added` from a pre-warm thread too, under its lock; each update here is a
    single array write, so a concurrent `touch` can at worst miscount one use.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.resident = np.zeros(num_experts, dtype=bool)
        self.last_use = np.zeros(num_experts, dtype=np.int64)
        self.clock = 0

    def _candidates(self, protected) -> np.ndarray:
        mask = self.resident.copy()
        if protected:
            mask[_ids(protected)] = False
        return mask

    def _pick(self, mask: np.ndarray, key: np.ndarray) -> int:
        ranked = self._rank(mask, key, 1)
        if not ranked:
            raise RuntimeError("every resident expert is protected: no victim")
        return ranked[0]

    def _rank(self, mask: np.ndarray, key: np.ndarray, n: int, first=None) -> list:
        """The `n` first candidates in eviction order: lowest key, then least recently used
        (`first`, a boolean per expert, goes before everything: evicted first when True)."""
        cand = np.flatnonzero(mask)
        keys = (self.last_use[cand], key[cand]) if first is None else (self.last_use[cand], key[cand], ~first[cand])
        return cand[np.lexsort(keys)[:n]].tolist()

    def victims(self, n: int, protected) -> list:
        """Up to `n` experts to evict, first victim first (as n calls of `victim` would:
        evicting one changes no other's rank). The same order as `_rank`, with few numpy
        calls: this runs at every demand load, right after the device computed, when each
        call's first touch of memory costs tens of microseconds on a small machine."""
        cand = np.flatnonzero(self.resident).tolist()
        if protected:
            cand = [e for e in cand if e not in protected]
        key, lu = self._victim_key().tolist(), self.last_use.tolist()
        first = self._victim_first()
        if first is None:
            return heapq.nsmallest(n, cand, key=lambda e: (key[e], lu[e], e))
        first = first.tolist()
        return heapq.nsmallest(n, cand, key=lambda e: (not first[e], key[e], lu[e], e))

    def _victim_key(self) -> np.ndarray:
        return self.key

    def _victim_first(self):
        return None


class LFUDAPolicy(_ScoredPolicy):
    """LFU with dynamic aging: evict the smallest age + uses-while-resident."""

    name = "lfu"

    def __init__(self, num_experts: int):
        super().__init__(num_experts)
        self.uses = np.zeros(num_experts, dtype=np.float64)
        self.key = np.zeros(num_experts, dtype=np.float64)
        self.age = 0.0

    def touch(self, experts):
        idx = _ids(experts)
        self.clock += 1
        self.uses[idx] += 1
        self.key[idx] = self.age + self.uses[idx]
        self.last_use[idx] = self.clock

    def added(self, e: int):
        self.resident[e] = True
        self.uses[e] = 0
        self.key[e] = self.age  # the use that loaded it is counted by the touch that follows

    def removed(self, e: int):
        if self.resident[e]:
            self.resident[e] = False
            self.age = max(self.age, self.key[e])

    def victim(self, protected) -> int:
        return self._pick(self._candidates(protected), self.key)


DEFAULT_HALF_LIFE = 32.0  # decode tokens; 8..1024 were within 1 point on the train prompts, short wins slightly
PIN_SHARE = 2.0  # pin experts a profile uses at least this many times the average rate
PIN_FRACTION = 0.25  # ... but never more than this share of the layer's slots
# A seeded profile weighs like this many half-lives of live use. Measured on the train
# prompts (docs/profiles.md): 0.25 keeps nearly all of a right profile's gain (1.0 and 4.0
# gain no more) and a wrong profile costs about 1 point instead of 5 (1.0) or 10 (4.0).
PRIOR_HALF_LIVES = 0.25


class UsagePolicy:
    """Evict the resident expert with the least decayed use (live history plus profile prior).

    Scores are kept multiplied by 2**(clock / half_life) so a use adds one growing number
    instead of decaying every expert on every touch; they are rescaled now and then.

    The state read and written at every MoE layer of a decode step (uses, last use, the
    resident set) is plain Python lists and a set: a layer touches ~8 experts and a demand
    load ranks ~32, where each numpy call's fixed cost, paid right after the device computed
    (cold caches), was ~80 us a load on a 2-core box; these loops take a fraction of that.
    Ties go to the least recently used expert, then the lowest id: the same order as
    before (`tests/test_policy.py`).
    """

    name = "usage"

    def __init__(self, num_experts: int, half_life: float = DEFAULT_HALF_LIFE):
        self.num_experts = num_experts
        self.half_life = float(half_life)
        self.clock = 0
        self.live = [0.0] * num_experts  # decayed live uses (scaled)
        self.prior = np.zeros(num_experts, dtype=np.float64)  # decayed profile prior (scaled)
        self._prior = [0.0] * num_experts  # the same, as the hot path reads it
        self.last_use = [0] * num_experts
        self.pinned = np.zeros(num_experts, dtype=bool)
        self._pinned = None  # list of bools while any expert is pinned
        self._resident: set = set()
        self._base = 0  # clock value at which the scale factor is 1
        self._pin_check = 0  # clock value after which pins must be earned by live use

    def _scale(self) -> float:
        exponent = (self.clock - self._base) / self.half_life
        if exponent > 512:  # keep the scaled numbers far from overflow
            f = 0.5**exponent
            self.live = [v * f for v in self.live]
            self.prior *= f
            self._prior = self.prior.tolist()
            self._base, exponent = self.clock, 0.0
        return 2.0**exponent

    def seed(self, frequencies, num_slots: int, pin: bool = False):
        """Start from a profile: `frequencies[e]` = uses per token in the profile's workload.

        The prior decays like live history (gone after a few half-lives); with `pin`, the
        profile's clearly hot experts (>= PIN_SHARE x average, at most PIN_FRACTION of the
        slots) are never evicted while live use keeps them at least averagely used. Pins are
        off by default: on the demo model they gained nothing with the right profile and cost
        1-2 points of hit rate with a wrong one (docs/profiles.md).
        """
        f = np.asarray(frequencies, dtype=np.float64)
        self.prior = f * (PRIOR_HALF_LIVES * self.half_life) * self._scale()
        self._prior = self.prior.tolist()
        self.pinned[:] = False
        if pin and f.sum() > 0:
            average = f.sum() / self.num_experts
            hot = np.argsort(-f, kind="stable")[: int(num_slots * PIN_FRACTION)]
            self.pinned[hot[f[hot] >= PIN_SHARE * average]] = True
        self._pins_changed()
        self._pin_check = self.clock + int(2 * self.half_life)

    def _pins_changed(self):
        self._pinned = self.pinned.tolist() if self.pinned.any() else None

    def touch(self, experts):
        self.clock += 1
        clock = self.clock
        weight = self._scale()  # may rescale `live`: take the list after it
        live, last = self.live, self.last_use
        for e in experts:
            e = int(e)
            live[e] += weight
            last[e] = clock
        if self._pinned is not None and clock >= self._pin_check:
            # Live use must keep a pin: below the average live use, the pin goes.
            values = np.array(live)
            self.pinned &= values >= values.mean()
            self._pins_changed()
            self._pin_check = clock + max(1, int(self.half_life // 4))

    def added(self, e: int):
        self._resident.add(int(e))

    def removed(self, e: int):
        self._resident.discard(int(e))

    def victim(self, protected) -> int:
        got = self.victims(1, protected)
        if not got:
            raise RuntimeError("every resident expert is protected: no victim")
        return got[0]

    def victims(self, n: int, protected) -> list:
        """Up to `n` experts to evict, first victim first (as n calls of `victim` would:
        evicting one changes no other's rank): unpinned before pinned, then the least
        decayed use, the least recently used, the lowest id."""
        cand = [e for e in self._resident if e not in protected] if protected else list(self._resident)
        live, prior, last, pinned = self.live, self._prior, self.last_use, self._pinned
        if pinned is None:
            def key(e):
                return (live[e] + prior[e], last[e], e)
        else:
            def key(e):
                return (pinned[e], live[e] + prior[e], last[e], e)
        if n == 1:
            return [min(cand, key=key)] if cand else []
        return heapq.nsmallest(n, cand, key=key)


POLICIES = {"lru": LRUPolicy, "lfu": LFUDAPolicy, "usage": UsagePolicy}


def make_policy(name: str, num_experts: int):
    try:
        return POLICIES[name](num_experts)
    except KeyError:
        raise ChronosError(f"unknown cache policy '{name}' (choose from {', '.join(POLICIES)})")
