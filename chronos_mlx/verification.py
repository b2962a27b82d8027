"""Where a decode step reads its routing back: segment ends chosen from a cost model.

A decode step runs its MoE layers optimistically (each on whatever experts are resident)
and reads the router's choices back to the host at *segment ends*: at an end, the layers
since the previous end are checked, and the end layer itself is routed exactly (its
missing experts are loaded before it computes, and the predictor's guesses for the next
layers are prefetched there). A miss inside a segment costs a recomputation from the
missed layer; an end costs a host round trip. Per-layer routing (every layer an end) and
whole-token optimism (no end; one read after the step) are the two extremes.

`SegmentPlanner` measures what it needs while decoding:
- each MoE layer's chance of missing in a step (decayed average of verified steps);
- what a step costs, as a linear model of its features fitted online by least squares:
  seconds = base + sync x ends + layer x recomputed layers + recovery x recoveries
  (I/O waits excluded: they go with misses, not with the ends);
- what each kind of step waits for loads, apart: per-layer routing loads one layer at a
  time, a recovery every layer that missed as one batch (at the reader threads' rate), so
  the same misses cost different waits under different plans;
and picks the ends minimising the expected cost with a small dynamic programme over
layers. It also keeps the measured seconds per step for each number of ends (every layer an
end is what per-layer routing costs) and routes per layer while that is faster, so a wrong
model never makes decoding slower than per-layer routing for long; each is re-measured
now and then (the clearly slower kind a quarter as often: exploring costs the gap). A read
is priced at least at what per-layer routing measured over the plan with the fewest ends,
per extra end; a fit that still finds reads free (its samples all per-layer, say) plans an
end at every layer, and then a plan priced with the prior's read cost is measured against
it, so such a fit cannot keep a step that rarely misses reading back every layer; where
misses are so common that the model ends every layer anyway, and per-layer routing waits for
loads at least half as long as it computes, whole-token optimism is measured against it (its
recovery loads every missed layer as one batch). A plan is
compared by its steps without misses plus the recomputation its misses are expected to cost
now: the first steps after a cold start miss far more than later ones, and a plan measured
only then would otherwise lose for good. The plan is redone after 1, 2, 4, 8 and 16 steps
(the estimates move most then), later every `replan_every`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter

import mlx.core as mx
import numpy as np

# Priors until measured (seconds): a host round trip and one MoE layer's compute. A miss
# found only after the step also throws away the step launched behind it.
_PRIOR = np.array([0.0, 1e-4, 1e-3, 5e-4])  # base, sync, layer, recovery


@dataclass
class SegmentPlanner:
    n_layers: int
    decay: float = 0.1  # weight of the newest step in the miss estimates
    replan_every: int = 16
    explore_every: int = 16
    miss: np.ndarray = None  # per MoE layer: chance of missing in a step
    forced: frozenset | None = None  # fixed ends (tests, benchmarks); None: plan
    _xtx: np.ndarray = None
    _xty: np.ndarray = None
    _steps: int = 0
    _plan: frozenset = frozenset()
    _alt: frozenset = frozenset()  # the plan explored against per-layer routing (see `ends`)
    _coef: np.ndarray = field(default_factory=lambda: _PRIOR.copy())
    _measured: dict = field(default_factory=dict)  # number of segment ends -> seconds per step
    _clean: dict = field(default_factory=dict)  # the same, steps that recomputed nothing
    _io: dict = field(default_factory=dict)  # number of segment ends -> load wait per step
    _alt_redo: float = 0.0  # expected recomputation seconds of `_alt` (at its planning)
    _calls: int = 0

    def __post_init__(self):
        if self.miss is None:
            self.miss = np.zeros(self.n_layers)
        # A weak prior that keeps the fit defined before the features vary.
        self._xtx = np.eye(4) * 1e-2
        self._xty = self._xtx @ _PRIOR

    # --- measurements --------------------------------------------------------------------
    def observe_misses(self, checked: list, missed: set):
        """After verifying layers `checked` of a step: which of them missed."""
        for layer in checked:
            self.miss[layer] += self.decay * (float(layer in missed) - self.miss[layer])

    def observe_step(self, seconds: float, ends: int, recomputed_layers: int, recoveries: int,
                     previous_ends: int | None = None, io_s: float = 0.0, serial: bool = False):
        """One decode interval: `seconds` (loads left out) of a step launched with `ends`
        segment ends, after settling the one before it (launched with `previous_ends`);
        `io_s` the interval's waits for loads; `serial`: the step before was verified
        before this one was launched (a miss was likely), so nothing overlapped.

        An interval holds the verification of the step before and the launch of this one;
        a per-layer step does its work while it is launched, an optimistic one while the
        next interval verifies it. So an interval whose two steps are of different kinds
        holds two steps' work or none, and is not a sample of either kind."""
        kind = min(ends, self.n_layers)
        if previous_ends is not None and kind != min(previous_ends, self.n_layers):
            return
        # Measured, not modelled: seconds per step with every layer an end (what per-layer
        # routing costs) and with each number of ends planned (plans of one size cost alike;
        # a plan that recomputed a lot early on does not stand for a different one later).
        # The model can be wrong; this cannot.
        old = self._measured.get(kind)
        self._measured[kind] = seconds if old is None else 0.8 * old + 0.2 * seconds
        old = self._io.get(kind)
        self._io[kind] = io_s if old is None else 0.8 * old + 0.2 * io_s
        if not recomputed_layers and not recoveries and not serial:
            # What the plan costs apart from misses: misses change (the first steps after a
            # prefill miss far more), so a plan is judged by this plus its expected redo. A
            # serial interval is not clean either: it was serial because misses were likely.
            old = self._clean.get(kind)
            self._clean[kind] = seconds if old is None else 0.8 * old + 0.2 * seconds
        x = np.array([1.0, ends, recomputed_layers, recoveries])
        # Recent steps weigh more: the machine and the cache change.
        self._xtx = 0.98 * self._xtx + np.outer(x, x)
        self._xty = 0.98 * self._xty + x * seconds
        self._steps += 1

    def coefficients(self) -> np.ndarray:
        try:
            coef = np.linalg.solve(self._xtx, self._xty)
        except np.linalg.LinAlgError:
            return self._coef
        self._coef = np.maximum(coef, 0.0)
        return self._coef

    # --- decisions -------------------------------------------------------------------------
    def _loads_could_pay(self) -> bool:
        """Whether batching a step's loads could win back a recomputed pass: only if
        per-layer routing waits for loads at least half as long as it computes (on a CPU
        with small experts it waits ~2.5 of ~20 ms: a second pass can never pay there)."""
        every = self.n_layers
        t, io = self._measured.get(every), self._io.get(every)
        return t is not None and io is not None and io >= 0.5 * t

    def tail_miss(self, ends) -> float:
        """The chance that a step with segment `ends` misses after its last end (found only
        once the step is done, when the step launched behind it is thrown away too)."""
        last = max(ends, default=-1)
        return float(1.0 - np.prod(1.0 - np.clip(self.miss[last + 1 :], 0.0, 1.0)))

    def ends(self) -> frozenset:
        """The segment ends for the next step: the cost model's plan, unless every layer as
        an end (per-layer routing inside the step) has measured faster lately."""
        if self.forced is not None:
            return self.forced
        self._calls += 1
        n = self._calls
        # A plan costs ~layers^2 numpy work: early steps only (see the module's docstring).
        if n % self.replan_every == 1 or self.replan_every == 1 or n & (n - 1) == 0:
            _, sync_s, layer_s, recovery_s = self.coefficients()
            # Redoing a layer costs at least its share of a whole step: the fit alone can
            # drift towards "recomputation is free" when few steps recompute.
            measured = [t for t in self._measured.values() if t is not None]
            if measured:
                layer_s = max(layer_s, min(measured) / max(self.n_layers, 1))
            # A read costs at least what per-layer routing measured over the plan with the
            # fewest ends, per extra end (that plan's recomputations only lower the bound).
            t_every = self._measured.get(self.n_layers)
            fewer = [k for k in self._clean if k < self.n_layers]
            if t_every is not None and fewer:
                k = min(fewer)
                sync_s = max(sync_s, (t_every - self._clean[k]) / (self.n_layers - k))
            self._plan = plan_ends(self.miss, sync_s, layer_s, recovery_s)
            # The fit can find host reads free when its samples hardly vary in their number of
            # ends (all per-layer, say): then every layer is an end and, were that the only
            # plan, nothing else would ever be measured. The alternative is planned with at
            # least the prior's cost of a read, and measured like any plan.
            self._alt = self._plan
            every = frozenset(range(self.n_layers))
            if self._plan == every:
                self._alt = plan_ends(self.miss, max(sync_s, _PRIOR[1]), layer_s, recovery_s)
            if self._alt == every and self._loads_could_pay():
                # Misses everywhere: per-layer routing loads each layer on its own, a
                # recovery every missed layer in one batch; only measuring tells which wins
                # (`_io`), so whole-token optimism is what is measured against it.
                self._alt = frozenset()
            self._alt_redo = expected_redo(self.miss, self._alt, layer_s, recovery_s)
        every = frozenset(range(self.n_layers))
        plan = self._alt
        choice = plan
        t_every = self._measured.get(self.n_layers)
        # A plan's steps without misses, plus what its misses are expected to cost now; a
        # plan measured only with recomputations (misses everywhere) by those steps.
        t_plan = self._clean.get(len(plan))
        t_plan = self._measured.get(len(plan)) if t_plan is None else t_plan + self._alt_redo
        if t_every is not None and t_plan is not None:
            # Loads: a kind not measured yet is taken to wait like the other.
            io_every = self._io.get(self.n_layers, self._io.get(len(plan), 0.0))
            t_every, t_plan = t_every + io_every, t_plan + self._io.get(len(plan), io_every)
        # Exploring costs the difference between the two: the clearly slower one is
        # re-measured a quarter as often.
        every_n = self.explore_every
        if t_every is not None and t_plan is not None and max(t_every, t_plan) > 1.25 * min(t_every, t_plan):
            every_n *= 4
            if max(t_every, t_plan) > 2 * min(t_every, t_plan):  # whole-token on a CPU at 0.5: ~3x
                every_n *= 4
        explore = n > 1 and n % every_n in (0, 1)
        if plan != every:
            if t_every is not None and t_plan is not None:
                if t_every < t_plan:
                    choice = every
            elif self._plan == every:  # the fit says per layer; its alternative is measured below
                choice = every
                explore = explore or (t_every is not None and n % 4 in (0, 1))  # soon, not in 16 steps
        # Keep both measurements fresh: two steps in a row the other way (see observe_step).
        if explore and plan != every:
            choice = every if choice != every else plan
        return choice


def _first_miss_weights(miss: np.ndarray, start: int) -> np.ndarray:
    """For layers start.. : the chance that the first miss from `start` on is at that layer
    (independent layers). One recovery loads every layer that missed and recomputes from
    the first, so only the first miss of a segment costs a redo."""
    m = np.clip(np.asarray(miss[start:], dtype=float), 0.0, 1.0)
    log_none = np.concatenate([[0.0], np.cumsum(np.log1p(-np.minimum(m, 1 - 1e-12)))[:-1]])
    return np.exp(log_none) * m


def expected_redo(miss: np.ndarray, ends, layer_s: float, recovery_s: float) -> float:
    """Expected seconds of recomputation a step with segment `ends` pays for its misses
    (the cost `plan_ends` minimises, less the round trips): a segment whose first miss is
    at layer l redoes l up to the segment's end, and a recovery; after the last end, to the
    step's end and the step launched behind it."""
    miss = np.asarray(miss, dtype=float)
    n = len(miss)
    total, start = 0.0, 0
    for end in sorted(e for e in ends if 0 <= e < n) + [None]:
        stop = n if end is None else end  # an end layer is routed exactly: it cannot miss
        last = 2 * n - 1 if end is None else end
        w = _first_miss_weights(miss[:stop], start)
        layers = np.arange(start, stop)
        total += float(np.sum(w * ((last - layers + 1) * layer_s + recovery_s)))
        if end is None:
            break
        start = end + 1
    return total


def plan_ends(miss: np.ndarray, sync_s: float, layer_s: float, recovery_s: float) -> frozenset:
    """The segment ends minimising the expected step cost (O(layers^2), vectorised).

    A segment [i, j] ending at layer j costs one round trip, plus, if a layer l < j of it
    misses first, redoing layers l..j and a recovery. Without an end the last segment runs
    to the step's end, where a miss also discards the next step."""
    miss = np.asarray(miss, dtype=float)
    n = len(miss)
    if not miss.any():
        return frozenset()
    best = np.zeros(n + 1)
    choice = [None] * (n + 1)
    for i in range(n - 1, -1, -1):
        w = _first_miss_weights(miss, i)  # layers i..n-1
        layers = np.arange(i, n)
        tail = float(np.sum(w * ((2 * n - layers) * layer_s + recovery_s)))
        # redo(i, j) for ends j = i..n-1: first misses at l in [i, j)
        a = np.concatenate([[0.0], np.cumsum(w)[:-1]])
        b = np.concatenate([[0.0], np.cumsum(w * layers)[:-1]])
        redo = ((layers + 1) * layer_s + recovery_s) * a - layer_s * b
        cost = sync_s + redo + best[layers + 1]
        j = int(np.argmin(cost))
        if cost[j] < tail:
            best[i], choice[i] = cost[j], i + j
        else:
            best[i], choice[i] = tail, None
    ends, i = [], 0
    while i < n and choice[i] is not None:
        ends.append(choice[i])
        i = choice[i] + 1
    return frozenset(ends)


# --- what a step records for its host reads -------------------------------------------------
@dataclass
class StepRecord:
    """The router indices of one forward pass, by MoE layer, for one host read."""

    layers: list = field(default_factory=list)
    indices: list = field(default_factory=list)
    # Each layer's expert->slot map as the computation saw it: loads made after the
    # launch (by a step built meanwhile) must not make a wrong computation look right.
    slot_maps: list = field(default_factory=list)
    # Segmented verification: MoE layers that end a segment (their indices and those of
    # the segment before them are read back there), how many entries are verified, and
    # the layers routed exactly at an end (counted and loaded there, not at the end).
    ends: frozenset = frozenset()
    verified: int = 0
    routed_exact: set = field(default_factory=set)
    known: list = field(default_factory=list)  # (layer, host indices) read back at ends
    missed_at_end: set = field(default_factory=set)  # end layers that had to load experts
    loads_before: int | None = None

    def flat(self, start: int = 0):
        """The indices of the entries from `start` on, for one host read (None: none)."""
        if len(self.indices) <= start:
            return None
        return mx.concatenate([i.reshape(-1) for i in self.indices[start:]])

    def split(self, host: np.ndarray):
        return self.split_from(0, host)

    def split_from(self, start: int, host: np.ndarray):
        """(layer, its indices) for the entries from `start` on, out of `flat(start)` read back."""
        out, pos = [], 0
        for layer, inds in zip(self.layers[start:], self.indices[start:]):
            out.append((layer, host[pos : pos + inds.size]))
            pos += inds.size
        return out

    def absent(self, host: np.ndarray) -> dict:
        """{layer: experts it used} for every layer that used an expert absent at launch."""
        return self.absent_in(self.split(host), self.slot_maps)

    @staticmethod
    def absent_in(pairs, slot_maps) -> dict:
        out = {}
        for (layer, inds), slot_of in zip(pairs, slot_maps):
            if (slot_of[inds] < 0).any():
                out[layer] = np.unique(inds)
        return out


class SegmentMiss(Exception):
    """Raised at a segment end inside a forward pass: an earlier layer of the segment ran
    on an absent expert, so the pass stops there and is redone from that layer."""

    def __init__(self, first: int, needed: dict, known: list):
        super().__init__(first)
        self.first = first  # first MoE layer that missed
        self.needed = needed  # {layer: experts it asked for} from the first miss on
        self.known = known  # (layer, host indices) of the exact layers before it

# --- at a segment end (called by Runtime.route) ----------------------------------------------
def verify_segment(rec: StepRecord, indices: mx.array, counters=None):
    """At a segment end: read back the indices of the layers since the last end (with
    this layer's, one round trip) and stop the pass if any of them missed. The wait is
    added to `counters.sync_wait_s`."""
    pending = rec.indices[rec.verified :]
    t0 = perf_counter()
    mx.eval(*pending, indices)
    if counters is not None:
        counters.sync_wait_s += perf_counter() - t0
    pairs = [(l, np.array(i).reshape(-1)) for l, i in zip(rec.layers[rec.verified :], pending)]
    needed = StepRecord.absent_in(pairs, rec.slot_maps[rec.verified :])
    if needed:
        first = min(needed)
        rec.known += [(l, h) for l, h in pairs if l < first]
        # From the first miss on, layers ran on wrong inputs: their experts are guesses.
        raise SegmentMiss(first, {l: np.unique(h) for l, h in pairs if l >= first}, rec.known)
    rec.known += pairs
    rec.verified = len(rec.layers)


def exact_at_end(L, rec, layer, indices, host, mapped):
    """A segment-end layer (`L`, its LayerSlots) was routed exactly: it joins the step's
    record as verified. Returns `mapped` (its slot ids)."""
    if rec is None:
        return mapped
    rec.layers.append(layer)
    rec.indices.append(indices)
    rec.slot_maps.append(L.table_map)
    rec.routed_exact.add(layer)
    if rec.loads_before is not None and L.counters.misses > rec.loads_before:
        rec.missed_at_end.add(layer)  # it would have missed: for the segment planner
    rec.known.append((layer, host))
    rec.verified = len(rec.layers)
    return mapped
