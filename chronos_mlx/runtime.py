"""Runtime: the state that ties a model's StreamingSwitch modules to its ExpertCache.

The expert cache, the routing mode ("sync": per layer, or "optimistic" while the decode
loop records a step), the predictor, the pending gate, the step
record and the counters. What is done with them lives beside it: routing.py (a layer's
ids to slots, demand loads), gates.py, late_rows.py, prefetch.py, verification.py and
generate.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import ExpertCache
from .gates import open_gate
from .routing import account_step, load_for, load_layers, route
from .verification import StepRecord


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
    recomputed_rows: int = 0  # late rows: (token, k) rows recomputed once their expert was loaded
    discarded_steps: int = 0  # steps launched behind one that then missed, thrown away
    settled_first: int = 0  # steps verified before the next was launched (a miss was likely)
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
        # While any is attached, fully resident layers are read back too. They keep host-side
        # records (numpy, no MLX): under device-fetch they are told a step late, from the
        # bookkeeping worker that runs while the next step launches (device_fetch.py).
        self.observers: list = []
        # A predictor with `targets` [(layer offset, token offset)] and `scores(layer, x)`
        # [n_targets, num_experts]; its guesses are prefetched in per-layer routing.
        self.predictor = None
        self.intent = None  # IntentClassifier: prefill -> experts the generation will use
        # Set by the decode loop while it builds a step it may discard: per-layer routing
        # is then reported to observers only once the step is kept.
        self.deferred_observations: list | None = None
        self.guesses = 16  # per layer; attach_predictor sets the model's top-k
        # Device-wait requests carry guesses for the next layer: "load" loads them inside the
        # request; "stage" reads them into staging after the answer (preread.py), "post" also
        # leaves them for that layer's kernel to take without asking. On an H200 (session 18)
        # every form decoded slower than no guesses; "load" is the one measured longest.
        self.guess_reads = "load"
        self.predict_stream = mx.new_stream(mx.default_device())
        self._predicted: dict = {}
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
        # ... or, where measured faster (MLX's CPU backend: 0.92x of stock at 0.5 against
        # 0.83x gated), computes each MoE layer at once on its resident experts and recomputes
        # only the rows whose expert was missing (late_rows.py). Off on GPUs: unmeasured on
        # Metal; CUDA decodes with device-wait.
        self.late_rows = mx.default_device() == mx.cpu
        self.defer_last = False
        self.gate = None  # gates.Gate: the MoE layer built but not yet decided
        # device_wait.DeviceWaiter: on CUDA, MoE layers wait on the device for their experts
        # (mode "device-wait", set by the decode loop while it builds a step).
        self.waiter = None
        self.sync_used = None  # the routing mode the last generation ran ("auto" resolved)

    @property
    def last_moe_layer(self) -> int:
        return len(self.cache.layers) - 1 if self.cache is not None else -1

    # --- routing (called by StreamingSwitch) -------------------------------------------
    def route(self, layer: int, indices: mx.array, x: mx.array | None = None):
        """Slot indices for the router's expert `indices`, or None when waves are needed
        (routing.route)."""
        return route(self, layer, indices, x)

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
        """Load the missing ones of `experts` now, the caller waiting (routing.load_for)."""
        return load_for(self, layer, experts, protect, count_hits)

    def load_layers(self, wanted: dict) -> dict:
        """Load the missing experts of several layers as one batch, the caller waiting
        (routing.load_layers)."""
        return load_layers(self, wanted)

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
        """Count a verified optimistic step's hits (routing.account_step)."""
        account_step(self, record, pairs, loaded, before)

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
        pre = self.waiter.prereader if self.waiter is not None else None
        return {
            "sync": self.sync_used,
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
            "prediction_recall": self.recall_hits / self.recall_total if self.recall_total else None,  # None: nothing predicted
            "bytes_read": sum(L.counters.bytes_read for L in layers),
            "stall_s": c.stall_s,
            "io_wait_s": c.io_wait_s,
            "decode_sync_wait_s": c.decode_sync_wait_s,
            "decode_recovery_wait_s": c.decode_recovery_wait_s,
            "host_syncs_per_token": c.host_syncs / c.generated_tokens if c.generated_tokens else 0.0,
            "recomputed_layers": c.recomputed_layers,
            "recomputed_rows": c.recomputed_rows,
            "recomputes": c.recomputes,
            "discarded_steps": c.discarded_steps,
            "settled_first": c.settled_first,
            "device_waits": self.waiter.requests if self.waiter is not None else 0,
            # Guesses read into staging after device-wait answers (preread.py), and those a load used.
            "staged_guess_reads": pre.reads if pre is not None else 0,
            "staged_guesses_used": pre.used if pre is not None else 0,
            # Posts of staged guesses left for a layer's kernel, and those it took (no request).
            "posts": self.waiter.posts if self.waiter is not None else 0,
            "posts_taken": self.waiter.posts_taken if self.waiter is not None else 0,
            # device-fetch: seconds spent mapping and page-locking the shards (once a model)
            "device_fetch_setup_s": getattr(self.waiter, "setup_s", None),
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
        if self.waiter is not None:
            self.waiter.requests = self.waiter.posts = self.waiter.posts_taken = 0
            if self.waiter.prereader is not None:
                self.waiter.prereader.reads = self.waiter.prereader.used = self.waiter.prereader.wasted = 0
        if self.cache:
            from .cache import LayerCounters

            for L in self.cache.layers:
                L.counters = LayerCounters()


def peak_rss_bytes() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
