"""Runtime: the state that ties a model's StreamingSwitch modules to its ExpertCache.

Two ways to route a MoE layer:
- "sync" (per layer): the layer's experts are computed only after the host has read the
  router's indices and loaded what is missing. Through a gate (gates.py) by default: the
  layer is built at once and decided when the next one is built, so graph construction
  does not stop; a batch with more indices than slots is decided on the spot (waves).
  Exact under any caller, including plain `mlx_lm.generate`; costs one host round trip
  per MoE layer whose experts are not all resident.
- "optimistic": remap the indices through the device-side expert->slot table and record
  them; the decode loop in `generate.py` reads all layers' indices back once per token
  and recomputes the token if any expert was absent. Layers whose experts are all resident
  never need either.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import ExpertCache
from .gates import close_gate, open_gate
from .prefetch import predict, score_prediction, submit_guesses, wait_planned
from .verification import SegmentMiss, StepRecord, exact_at_end, verify_segment


@dataclass
class DecodeCounters:
    """What the decode loop measured (zero when the model is driven by plain mlx_lm)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    io_wait_s: float = 0.0  # all time blocked on expert loads (prefill included)
    stall_s: float = 0.0  # the part of it spent while decoding
    sync_wait_s: float = 0.0  # blocked reading routing back (the device computing up to it)
    recovery_wait_s: float = 0.0  # waiting out steps that missed (their work is thrown away)
    decode_sync_wait_s: float = 0.0  # the parts of these two spent while decoding
    decode_recovery_wait_s: float = 0.0
    host_syncs: int = 0
    recomputes: int = 0
    recomputed_layers: int = 0
    # Cache activity while decoding (after the first token), apart from the prefill's.
    decode_hits: int = 0
    decode_misses: int = 0
    decode_bytes_read: int = 0
    decode_prefetch_hits: int = 0


class Runtime:
    """Expert cache, routing mode and counters of one streamed model."""

    def __init__(self, cache: ExpertCache | None, info: dict, reader=None):
        self.cache = cache
        self.info = info  # model facts (path, architecture, experts, budget ...)
        self.reader = reader
        self.mode = "sync"
        # Objects with observe(layer, expert_ids) that see every routing decision once it is
        # known on the host (activation statistics, profile recording, Markov predictors).
        # While any is attached, fully resident layers are read back too.
        self.observers: list = []
        # A predictor with `targets` [(layer offset, token offset)] and `scores(layer, x)`
        # [n_targets, num_experts]; its guesses are prefetched in per-layer routing.
        self.predictor = None
        self.intent = None  # IntentClassifier: prefill -> experts the generation will use
        # Set by the decode loop while it builds a step it may discard: per-layer routing
        # is then reported to observers only once the step is kept.
        self.deferred_observations: list | None = None
        self.guesses = 16
        self.predict_stream = mx.new_stream(mx.default_device())
        self._predicted: dict = {}
        # Prefetch decisions (victims, slots, reads) run on their own thread, off the
        # critical path; a layer waits for the decisions that target it before routing.
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chronos-plan")
        self._planned: dict = {}  # target layer -> Future of the latest decision touching it
        self.recall_hits = 0
        self.recall_total = 0
        self.notice = None
        self.counters = DecodeCounters()
        self.layer_syncs = 0
        self._record: StepRecord | None = None
        self.resume = None  # (resume.ResumeState, decoder index per MoE layer) when installable
        self.segment_planner = None  # verification.SegmentPlanner: what the decode loop learned
        # Per-layer routing gates each MoE layer (gates.py) instead of stopping there; the
        # last MoE layer of a pass is routed on the spot unless the caller opens its gate
        # (`defer_last`: chronos's decode loop does, before it starts the step).
        self.pipelined = True
        self.defer_last = False
        self.gate = None  # gates.Gate: the MoE layer built but not yet decided

    @property
    def last_moe_layer(self) -> int:
        return len(self.cache.layers) - 1 if self.cache is not None else -1

    # --- routing (called by StreamingSwitch) -------------------------------------------
    def route(self, layer: int, indices: mx.array, x: mx.array | None = None):
        """Slot indices for the router's expert `indices`, or None when waves are needed.

        `x` is the layer's input hidden state, which a predictor may use to prefetch."""
        L = self.cache.layers[layer]
        self.open_gate()  # the layer before this one loads what it needs before this one runs
        wait_planned(self, layer)
        L.refresh()
        if L.full and not self.observers:  # nothing can miss and nobody watches: no host read
            L.counters.hits += indices.size
            return indices if L.identity else L.table[indices]
        rec = self._record if self.mode == "optimistic" else None
        if rec is None and self.pipelined and indices.size <= L.num_slots and (
            self.defer_last or layer != self.last_moe_layer
        ):
            return close_gate(self, layer, indices, x)
        mapped = indices if L.identity else L.table[indices]
        if rec is not None:
            if layer not in rec.ends:
                rec.layers.append(layer)
                rec.indices.append(indices)
                rec.slot_maps.append(L.table_map)
                return mapped
            verify_segment(rec, indices, self.counters)  # raises SegmentMiss on a miss before here
            rec.loads_before = L.counters.misses
        scores = predict(self, layer, x) if self.predictor is not None and x is not None else None
        if scores is not None:
            mx.eval(indices, scores)  # one host round trip for both
        t0 = time.perf_counter()
        host = np.array(indices).reshape(-1)
        self.counters.sync_wait_s += time.perf_counter() - t0
        self.layer_syncs += 1
        if rec is not None:  # a segment end: reported with the step once it is kept
            pass
        elif self.deferred_observations is not None:  # a decode step that may yet be discarded
            self.deferred_observations.append((layer, host, x))
        else:
            self._observe(layer, host, x)
        uniq = np.unique(host)
        score_prediction(self, layer, uniq)
        if L.full:
            L.counters.hits += host.size
            self.cache.mark_used(layer, uniq)
            submit_guesses(self, layer, scores)
            return exact_at_end(self.cache.layers[layer], rec, layer, indices, host, mapped)
        # Repeated uses of an expert within the batch are hits; load_for counts the rest.
        L.counters.hits += host.size - len(uniq)
        if len(uniq) > L.num_slots:
            if rec is not None:  # only waves can compute it: per-layer routing does
                raise SegmentMiss(layer, {layer: uniq}, rec.known)
            return None  # the module streams the batch through in waves
        self.load_for(layer, uniq)
        self.cache.mark_used(layer, uniq)
        submit_guesses(self, layer, scores)
        L.refresh()
        return exact_at_end(L, rec, layer, indices, host, L.table[indices])

    # --- per-layer routing through gates (gates.py) ------------------------------------------
    def open_gate(self):
        """Decide the pending gated layer (gates.open_gate)."""
        if self.gate is not None:
            open_gate(self)

    def gated(self, layer: int) -> bool:
        """Whether `layer` waits at a gate (its experts must not be evaluated yet)."""
        return self.gate is not None and self.gate.layer == layer

    def drop_gate(self):
        """Forget a gated layer whose forward pass was abandoned (nothing will compute it)."""
        self.gate = None

    def load_for(self, layer: int, experts, protect=None, count_hits: bool = True) -> list:
        """Load the missing ones of `experts` now (the caller waits): an I/O stall.

        Every expert loaded on demand counts as a miss; with `count_hits` the others count
        as hits. Returns the experts loaded."""
        t0 = time.perf_counter()
        wait_planned(self, layer)
        wanted = set(np.asarray(experts).reshape(-1).tolist())
        L = self.cache.layers[layer]
        absent = not all(L.slot_of[e] >= 0 for e in wanted)
        got = self.cache.ensure(layer, experts, protect)
        loaded = len(got)
        L.counters.misses += loaded
        if count_hits:
            L.counters.hits += len(wanted) - loaded
        # A stall whenever something was absent: read now, or waited for while a prefetch
        # read it (which loads nothing here but is time blocked all the same).
        self.counters.io_wait_s += time.perf_counter() - t0 if absent else 0.0
        return got

    # --- optimistic execution (called by the decode loop) ------------------------------
    @contextmanager
    def recording(self, ends=frozenset()):
        """Route optimistically and collect every layer's indices for one later host read;
        at the MoE layers in `ends` the segment so far is verified (see `route`)."""
        prev_mode, prev_rec = self.mode, self._record
        self.mode, self._record = "optimistic", StepRecord(ends=frozenset(ends))
        try:
            yield self._record
        finally:
            self.mode, self._record = prev_mode, prev_rec

    def account_step(self, record: StepRecord, pairs: list, loaded: dict | None = None, before=None):
        """A verified optimistic step (or its layers `before` a miss), as (layer, host
        indices) pairs: uses of experts not loaded for it were hits. Layers routed exactly
        at a segment end were counted there."""
        for layer, inds in pairs:
            if before is not None and layer >= before:
                continue
            if layer in record.routed_exact:
                self._observe(layer, inds)
                continue
            L = self.cache.layers[layer]
            uniq = np.unique(inds)
            got = (loaded or {}).get(layer, ())
            L.counters.hits += inds.size - sum(1 for e in uniq.tolist() if e in got)
            self.cache.mark_used(layer, uniq)
            self._observe(layer, inds)

    def observe_kept(self, observations: list):
        for layer, indices, x in observations:
            self._observe(layer, indices, x)

    def _observe(self, layer: int, indices: np.ndarray, x=None):
        for observer in self.observers:
            observer.observe(layer, indices)
            if x is not None and hasattr(observer, "observe_hidden"):
                observer.observe_hidden(layer, x)

    def cache_totals(self) -> dict:
        """Hits, misses, bytes read and prefetch hits so far, summed over layers."""
        layers = self.cache.layers if self.cache else []
        return {
            "hits": sum(L.counters.hits for L in layers),
            "misses": sum(L.counters.misses for L in layers),
            "bytes_read": sum(L.counters.bytes_read for L in layers),
            "prefetch_hits": sum(L.counters.prefetch_hits for L in layers),
        }

    def total_misses(self) -> int:
        return sum(L.counters.misses for L in self.cache.layers) if self.cache else 0

    # --- reporting ---------------------------------------------------------------------
    def stats(self) -> dict:
        c = self.counters
        layers = self.cache.layers if self.cache else []
        hits = sum(L.counters.hits for L in layers)
        misses = sum(L.counters.misses for L in layers)
        return {
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.generated_tokens,
            "prefill_tokens_per_s": c.prompt_tokens / c.prefill_s if c.prefill_s else 0.0,
            "ttft_s": c.ttft_s,
            "decode_tokens_per_s": c.decode_steps / c.decode_s if c.decode_s else 0.0,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
            "decode_hit_rate": (
                c.decode_hits / (c.decode_hits + c.decode_misses) if c.decode_hits + c.decode_misses else 1.0
            ),
            "decode_misses": c.decode_misses,
            "decode_bytes_read": c.decode_bytes_read,
            "decode_prefetch_hits": c.decode_prefetch_hits,
            "evictions": sum(L.counters.evictions for L in layers),
            "prefetch_hits": sum(L.counters.prefetch_hits for L in layers),
            "prefetch_wasted_bytes": sum(L.counters.prefetch_wasted_bytes for L in layers),
            "prediction_recall": self.recall_hits / self.recall_total if self.recall_total else 0.0,
            "bytes_read": sum(L.counters.bytes_read for L in layers),
            "stall_s": c.stall_s,
            "io_wait_s": c.io_wait_s,
            "decode_sync_wait_s": c.decode_sync_wait_s,
            "decode_recovery_wait_s": c.decode_recovery_wait_s,
            "host_syncs_per_token": c.host_syncs / c.generated_tokens if c.generated_tokens else 0.0,
            "recomputed_layers": c.recomputed_layers,
            "recomputes": c.recomputes,
            "peak_memory_bytes": peak_rss_bytes(),
            "mlx_peak_memory_bytes": mx.get_peak_memory(),
            "expert_budget_bytes": self.cache.resident_bytes if self.cache else 0,
            "slots_per_layer": self.cache.num_slots if self.cache else 0,
            "direct_io": bool(self.reader and self.reader.direct_io_active),
            # CUDA: expert bytes written by the copy engine; why it stopped, if it did (upload.py)
            "device_copy_bytes": self.cache.upload.bytes if self.cache and self.cache.upload else 0,
            "device_copy_error": self.cache.upload_error if self.cache else None,
            "per_layer": [
                {
                    "hits": L.counters.hits,
                    "misses": L.counters.misses,
                    "evictions": L.counters.evictions,
                    "bytes_read": L.counters.bytes_read,
                    "load_s": L.counters.load_s,
                }
                for L in layers
            ],
        }

    def reset_counters(self):
        self.counters = DecodeCounters()
        self.layer_syncs = 0
        self.recall_hits = self.recall_total = 0
        if self.cache:
            from .cache import LayerCounters

            for L in self.cache.layers:
                L.counters = LayerCounters()


def peak_rss_bytes() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
