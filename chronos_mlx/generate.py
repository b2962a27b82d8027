"""chronos's decode loop: mlx_lm's generate_step with optimistic routing and exact recovery.

Each decode step is built with its MoE layers routed through the device-side
expert->slot tables, and reads the routing back to the host at *segment ends*
(verification.py picks them per step from measured miss rates and costs; at an end the
layers since the last end are checked and the end layer itself is routed exactly) and once
after the step, while the next step already runs. If some expert was absent, the step
(and the one launched behind it) is rolled back exactly (rollback.py: every cache type),
the missing experts are loaded and the step is recomputed from the decoder layer that
missed (resume.py), so the tokens are exactly stock mlx_lm's. Prefill uses per-layer
routing (one host read per layer per chunk, amortised over the chunk) because it touches
most experts anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from . import device_wait
from .prefetch import prefetch_intent
from .resume import kept_caches, resume_point
from .rollback import Checkpoint, checkpointable
from .runtime import Runtime
from .verification import SegmentMiss, SegmentPlanner, StepRecord

# optimistic: segments chosen per step (verification.py); device-wait: CUDA only (device_wait.py);
# device-fetch: CUDA only, the shards page-locked in host memory (device_fetch.py)
SYNC_MODES = ("optimistic", "per-layer", "device-wait", "device-fetch")
ON_DEVICE = ("device-wait", "device-fetch")  # the device routes a step's layers; the host reads it once
_STREAMS: dict = {}


def available_sync_modes() -> list:
    """The routing modes this machine can run (device-wait, device-fetch: MLX's CUDA backend only)."""
    return [m for m in SYNC_MODES if m not in ON_DEVICE or device_wait.available()]


def resolve_sync(sync: str, runtime: Optional[Runtime] = None) -> str:
    """The routing mode "auto" stands for: device-wait where MLX runs on CUDA and experts
    can miss (on the H200 it decoded 1.1-1.4x faster than optimistic or per-layer whenever
    the budget was below the model: docs/benchmarks.md, session 15), optimistic elsewhere
    (with every expert resident nothing can miss, and optimistic steps read the routing
    once a token). Never device-fetch, faster still on CUDA (session 22): it holds every
    shard page-locked in host memory, which only the user may decide to spend."""
    if sync != "auto":
        return sync
    cache = runtime.cache if runtime is not None else None
    every_expert_fits = cache is not None and all(L.num_slots >= L.num_experts for L in cache.layers)
    return "device-wait" if device_wait.available() and not every_expert_fits else "optimistic"


def _device_router(runtime: Runtime, sync: str):
    """`runtime.waiter` for `sync` (device-wait or device-fetch), made on first use; one of
    the other kind is closed first (its state would no longer match the cache's)."""
    from .device_fetch import DeviceFetcher

    kind = DeviceFetcher if sync == "device-fetch" else device_wait.DeviceWaiter
    if isinstance(runtime.waiter, kind):
        return
    if runtime.waiter is not None:
        runtime.waiter.close()
        runtime.waiter = None
    runtime.waiter = kind(runtime)


def generation_stream():
    """A stream of the default device as it is now (a process may switch to the CPU after import)."""
    device = mx.default_device()
    key = str(device)
    if key not in _STREAMS:
        _STREAMS[key] = mx.new_stream(device)
    return _STREAMS[key]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


MAX_OPTIMISTIC_RETRIES = 2
# A step whose chance of missing after its last segment end is above this is verified
# before the next step is launched on it (see the decode loop).
SETTLE_FIRST_ABOVE = 0.5


@dataclass
class _Step:
    """One launched forward pass: its input, lazy outputs and recorded routing."""

    tokens: mx.array
    y: mx.array
    logprobs: mx.array
    record: Optional[StepRecord]
    flat: Optional[mx.array]
    speculated: bool = False  # the routing chosen at launch (kept through a recovery)
    checkpoint: Optional[Checkpoint] = None  # the caches as they were before this step
    outputs: Optional[dict] = None  # decoder layer -> its output, for resuming a recomputation
    touched: Optional[dict] = None  # decoder layer -> ids of the cache objects it was given
    observations: Optional[list] = None  # per-layer routing, reported once the step is kept
    ends: frozenset = frozenset()  # the segment ends it was launched with
    may_miss: bool = False  # some expert it could use was absent at launch
    misses_at_launch: Optional[list] = None  # per-layer demand loads before a per-layer step
    waited: Optional[tuple] = None  # device-wait routing: (pass, layers, sizes, ids), read once it ran
    token: Optional[mx.array] = None  # device-wait routing: `y` copied on the CPU stream (see `launch`)
    miss: Optional[SegmentMiss] = None  # it stopped at a segment end: this layer missed
    context: Optional[mx.array] = None  # with logits processors: every token up to its input (mlx_lm's `tokens`)


def generate_step(
    prompt: mx.array,
    model,
    runtime: Runtime,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[list] = None,
    prompt_cache=None,
    prefill_step_size: int = 2048,
    sync: str = "auto",
    segment_ends=None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, logprobs) like `mlx_lm.generate.generate_step`, with chronos's counters.

    sync="optimistic" verifies each step in segments whose ends a cost model picks
    (verification.py); `segment_ends` fixes them instead (a set of MoE layer indices;
    empty: one read after the whole step). "auto": see `resolve_sync`.
    `logits_processors`: as mlx_lm's, called with every token so far (the prompt, then each
    step's input) and the step's logits; a step computed again after a miss passes the same
    tokens again, so they must be functions of their arguments (mlx_lm's are)."""
    if sync != "auto" and sync not in SYNC_MODES:
        raise ValueError(f"sync must be 'auto' or one of {SYNC_MODES}, got '{sync}'")
    sync = resolve_sync(sync, runtime)
    if sync in ON_DEVICE and not device_wait.available():
        raise ValueError(f"sync='{sync}' needs MLX's CUDA backend (mx.fast.cuda_kernel)")
    sampler = sampler or greedy
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(model)
    streaming = runtime.cache is not None
    # Optimistic steps must be undoable exactly: every cache object is checkpointed before
    # each step (see rollback.py); one that cannot be makes every step route per layer.
    optimistic = streaming and sync == "optimistic" and checkpointable(prompt_cache)
    waiting = streaming and sync in ON_DEVICE
    # Device-wait's kernels wait for a host thread while steps run, so the host must not touch
    # a GPU buffer then (below); device-fetch's wait for nobody, and its steps are read as stock's.
    served = waiting and sync == "device-wait"
    if waiting:
        _device_router(runtime, sync)
    if streaming:
        runtime.sync_used = sync
    c = runtime.counters
    n_moe = len(runtime.cache.layers) if streaming else 0

    def forward(tokens, after=None, context=None):
        defer_last = runtime.defer_last
        runtime.defer_last = True  # the last MoE layer is gated too: its gate opens below
        try:
            logits = model(tokens[None], cache=prompt_cache)[:, -1, :]
            if streaming:
                runtime.open_gate()  # before anything starts the step
        except BaseException:
            runtime.drop_gate()
            raise
        finally:
            runtime.defer_last = defer_last
            if after is not None:  # before the sampler, which may read the caches (replay)
                after.restore()
        if logits_processors and context is not None:
            for processor in logits_processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y, logprobs = sampler(logprobs), logprobs.squeeze(0)
        if served:
            # The caller gets them in host memory (a copy on the CPU stream, x1.0 is exact): a GPU
            # buffer read while the next step's kernels wait for the service thread would move
            # to the host under Python's lock and wait for the device (docs/device_wait.md).
            logprobs = mx.multiply(logprobs, 1.0, stream=mx.cpu)
        return y, logprobs

    resumable = runtime.resume if optimistic else None  # (ResumeState, decoder index per MoE layer)
    if resumable:
        resumable[0].bind(prompt_cache)

    def can_miss() -> bool:
        return not all(L.full for L in runtime.cache.layers)

    def after_step(step: _Step) -> Optional[mx.array]:
        """The logits processors' tokens for the step fed with `step`'s token."""
        return mx.concatenate([step.context, step.y]) if logits_processors else None

    def launch(tokens, speculate: bool, start=None, ends=frozenset(), behind=None, context=None) -> _Step:
        """`build` a step and start computing it. Like mlx_lm, the graph is built on the
        generation stream but evaluated from outside its context (measured: on MLX's CPU
        backend an async_eval inside the stream context cost ~15 ms per token).
        `context`: every token up to and including `tokens` (with logits processors)."""
        step = build(tokens, speculate, start, ends, behind, context)
        step.context = context
        if step.y is not None:
            extra = [a for a in (step.flat, step.waited[-1] if step.waited else None) if a is not None]
            beside = getattr(runtime.waiter, "beside", None) if waiting else None
            if beside is not None:  # device-fetch: the last step's bookkeeping is done meanwhile
                beside(lambda: mx.async_eval(step.y, step.logprobs, *extra))
            else:
                mx.async_eval(step.y, step.logprobs, *extra)
        if streaming and runtime.cache.deferred:  # inline prefetch reads overlap the step
            runtime.cache.run_deferred()
        return step

    def build(tokens, speculate: bool, start=None, ends=frozenset(), behind=None, context=None) -> _Step:
        """Build and start one forward pass; `speculate` routes it optimistically, reading
        the routing back at the MoE layers in `ends` and after the step.

        `start` = (decoder layer, outputs of the layers below it) resumes a recomputation
        at that layer. `behind`: the unverified step it is built on (if that one misses,
        this one is undone)."""
        state = resumable[0] if resumable else None
        # With every expert resident nothing can miss, and nothing needs undoing.
        # (A per-layer step cannot miss: it needs one only if the step behind it may be undone.)
        undoable = optimistic and ((speculate and can_miss()) or (behind is not None and behind.may_miss))
        checkpoint = Checkpoint(prompt_cache) if undoable else None
        after = None
        with mx.stream(generation_stream()):
            if state is not None:
                state.outputs, state.touched = {}, {}
                state.recording = speculate
                state.start, state.replay, state.replay_touched, after = start if start else (None, None, {}, None)
            try:
                if not (optimistic and speculate):
                    runtime.deferred_observations = [] if optimistic else None
                    misses = [L.counters.misses for L in runtime.cache.layers] if optimistic else None
                    if waiting:
                        mode, runtime.mode = runtime.mode, "device-wait"
                        try:
                            y, lp = forward(tokens, after, context)
                        finally:
                            runtime.mode = mode
                            waited = runtime.waiter.end_pass()
                    else:
                        y, lp = forward(tokens, after, context)  # per-layer routing loads what it needs as it goes
                        waited = None
                    step = _Step(tokens, y, lp, None, None, False, checkpoint, waited=waited)
                    if waited is not None and served:
                        # The token is read through a copy made on the CPU stream, as the ids
                        # are (`DeviceWaiter.end_pass`): reading `y` itself is a host access to
                        # a GPU buffer, done under Python's lock, which may wait for the device
                        # — whose next step may be waiting for the service thread.
                        step.token = mx.add(y, 0, stream=mx.cpu)
                    step.observations = runtime.deferred_observations
                    step.misses_at_launch = misses
                    return step
                try:
                    with runtime.recording(ends) as record:
                        y, lp = forward(tokens, after, context)
                except SegmentMiss as miss:  # stopped at a segment end: redo from `miss.first`
                    step = _Step(tokens, None, None, record, None, True, checkpoint, ends=ends, miss=miss)
                else:
                    flat = record.flat(record.verified)
                    step = _Step(tokens, y, lp, record, flat, True, checkpoint, ends=ends)
                step.may_miss = checkpoint is not None
                if state is not None:
                    step.outputs, step.touched = state.outputs, state.touched
                return step
            finally:
                runtime.deferred_observations = None
                if state is not None:
                    state.recording, state.start, state.replay = False, None, None
                    if after is not None:  # the layers below the resume point keep this step's entries
                        after.restore()

    def settle(step: _Step, speculative: Optional[_Step]):
        """Verify an optimistic step; on a miss roll back, load and recompute until exact.

        The recomputation starts at the decoder layer of the first MoE layer that missed
        (everything before it was exact), or at the first layer when the model's layers
        cannot be resumed. Returns (verified step, whether `speculative` was discarded)."""
        loaded: dict = {}
        discarded = False
        if step.waited is not None:  # device-wait routing: exact unless the service failed
            tag, layers, sizes, flat = step.waited
            t0 = time.perf_counter()
            # Waits without Python's lock; the read below is then of host memory (device-fetch's
            # kernels write their record to host memory themselves: the step's token says it ran).
            mx.eval(flat if flat is not None else step.token if step.token is not None else step.y)
            host = np.array(flat) if flat is not None else None
            c.sync_wait_s += time.perf_counter() - t0
            c.host_syncs += 1
            step.waited = None
            runtime.waiter.check()
            runtime.waiter.account(tag, layers, sizes, host)
            return step, discarded
        for attempt in range(MAX_OPTIMISTIC_RETRIES + 1):
            if step.flat is None and step.miss is None:  # exact as built; now its routing is kept
                if step.observations:
                    runtime.observe_kept(step.observations)
                if step.record is not None:
                    runtime.account_step(step.record, step.record.known, loaded)
                    planner.observe_misses(step.record.layers, step.record.missed_at_end)
                elif step.misses_at_launch is not None:  # routed per layer: which layers loaded
                    layers = runtime.cache.layers
                    missed = {i for i, L in enumerate(layers) if L.counters.misses > step.misses_at_launch[i]}
                    planner.observe_misses(range(len(layers)), missed)
                return step, discarded
            if step.miss is None:
                t0 = time.perf_counter()
                host = np.array(step.flat)
                c.sync_wait_s += time.perf_counter() - t0
                c.host_syncs += 1
                rec = step.record
                tail = rec.split_from(rec.verified, host)
                needed = StepRecord.absent_in(tail, rec.slot_maps[rec.verified :])
                known = rec.known + [(l, h) for l, h in tail if not needed or l < min(needed)]
                if not needed:
                    runtime.account_step(rec, known, loaded)
                    planner.observe_misses(rec.layers, rec.missed_at_end)
                    return step, discarded
                first = min(needed)
            else:
                needed, first, known = step.miss.needed, step.miss.first, step.miss.known
            planner.observe_misses([l for l in step.record.layers if l <= first], {first} | step.record.missed_at_end)
            runtime.account_step(step.record, known, loaded, before=first)  # exact, kept
            t0 = time.perf_counter()
            # Nothing queued may still read a slot about to be overwritten, and the cache
            # entries of the wrong step (and of any launched on its token) must go.
            if speculative is not None and not discarded:
                if speculative.y is not None:
                    mx.eval(speculative.y, speculative.logprobs)
                speculative.checkpoint.restore()
                discarded = True
            if step.y is not None:
                mx.eval(step.y, step.logprobs)
            start = None
            if resumable and step.outputs is not None:
                layer0 = resume_point(resumable[1][first], step.touched)
                if all(i in step.outputs for i in range(layer0)):
                    after = Checkpoint(prompt_cache, only=kept_caches(layer0, step.touched))
                    start = (layer0, step.outputs, step.touched, after)
            step.checkpoint.restore()
            # Waiting out the wrong steps: not I/O, and part of what this plan costs (the
            # planner's step times leave out only the loads).
            c.recovery_wait_s += time.perf_counter() - t0
            # Layers up to the first miss routed exactly; later ones may have routed on
            # wrong inputs, so their loads are guesses (the recompute checks them).
            # A layer that needs more experts than it has slots can only be computed in
            # waves, which per-layer routing does.
            fits = {l: e for l, e in needed.items() if len(e) <= runtime.cache.layers[l].num_slots}
            too_many = len(fits) < len(needed)
            # Every layer's loads at once: the reader threads share them all (one layer's few
            # experts leave most of them idle), and on CUDA they share one stream wait.
            with runtime.cache.one_copy_wait():
                for layer, got in runtime.load_layers(fits).items():
                    loaded.setdefault(layer, set()).update(got)
            c.recomputes += 1
            c.recomputed_layers += n_moe - (first if start else 0)
            # Retry optimistically with the same ends (cheap where a host round trip is
            # dear); the last attempt routes per layer, which is exact in one pass.
            speculate = attempt < MAX_OPTIMISTIC_RETRIES - 1 and not too_many
            step = launch(step.tokens, speculate=speculate, start=start, ends=step.ends, context=step.context)
        return step, discarded

    tic = time.perf_counter()
    whole_prompt = prompt  # the logits processors see all of it (prefill consumes `prompt`)
    c.prompt_tokens += prompt.size
    intent = runtime.intent if streaming else None
    if intent is not None:  # it reads the prompt's routing (and hidden states) during prefill
        intent.reset()
        runtime.observers.append(intent)
    try:
        with mx.stream(generation_stream()):
            while prompt.size > 1:
                n = min(prefill_step_size, prompt.size - 1)
                model(prompt[:n][None], cache=prompt_cache)
                mx.eval([cache.state for cache in prompt_cache])
                prompt = prompt[n:]
                mx.clear_cache()
    finally:
        if intent is not None:
            runtime.observers.remove(intent)
    if intent is not None and not waiting:  # device-wait: only its service thread changes slots
        prefetch_intent(runtime, intent.ranked())
    if waiting:
        runtime.waiter.begin()

    # What the planner learned (miss rates, costs) carries over from one generation to the next.
    planner = getattr(runtime, "segment_planner", None)
    if segment_ends is not None or planner is None or planner.n_layers != n_moe:
        planner = SegmentPlanner(
            n_moe,
            forced=None if segment_ends is None else frozenset(segment_ends),
            # Before anything is measured: a layer misses about as often as experts are absent.
            miss=np.full(n_moe, 1.0 - runtime.info.get("budget_fraction", 1.0)) if streaming else None,
        )
        if segment_ends is None:
            runtime.segment_planner = planner
    ends = planner.ends() if optimistic else frozenset()
    try:
        step = launch(prompt, speculate=optimistic, ends=ends, context=whole_prompt if logits_processors else None)
    except BaseException:
        if waiting:
            runtime.waiter.end(generation_stream())
        raise
    previous_ends = len(ends)
    # Per-layer reads of the decode steps (the first one is launched right below) count too.
    n, t_first, t_last, syncs_at_first, io_at_first = 0, None, 0.0, runtime.layer_syncs, 0.0
    mark = (0.0, 0, 0)  # io wait, recomputed layers, recomputes at the last token
    nxt = None
    try:
        while True:
            # Like mlx_lm, the step after the last yielded token runs too (its KV entries stay).
            # With every expert resident nothing can miss: the step is built like a plain
            # mlx_lm step (no record, no resume outputs, nothing for the planner to learn).
            may_miss = optimistic and can_miss()
            ends = planner.ends() if may_miss else frozenset()
            if step.y is None:  # it stopped at a segment end: finish it before building on it
                step, _ = settle(step, None)
            # Every layer an end is per-layer routing: take that path (no record, no checkpoint).
            speculate = may_miss and len(ends) < n_moe
            serial = False
            if n == max_tokens:
                step, _ = settle(step, None)
            elif step.may_miss and planner.tail_miss(step.ends) > SETTLE_FIRST_ABOVE:
                serial = True
                # Likely to miss: a step launched behind it would mostly be thrown away, and
                # waited for first (a whole step of device time); verify, then launch.
                step, _ = settle(step, None)
                c.settled_first += 1
                nxt = launch(step.y, speculate=speculate, ends=ends, context=after_step(step))
            else:
                nxt = launch(step.y, speculate=speculate, ends=ends, behind=step, context=after_step(step))
                step, discarded = settle(step, nxt)
                if discarded:
                    c.discarded_steps += 1
                    nxt = launch(step.y, speculate=speculate, ends=ends, context=after_step(step))
            if step.token is not None:
                mx.eval(step.token)
                token = int(np.array(step.token).reshape(-1)[0])
            else:
                token = step.y.item()
            c.host_syncs += 1
            now = time.perf_counter()
            if t_first is not None and nxt is not None and may_miss:
                # This interval mostly ran `nxt` (its segment ends block on its compute)
                # and any recovery of `step`; its loads are told apart.
                planner.observe_step(
                    now - t_last - (c.io_wait_s - mark[0]),
                    ends=len(ends),
                    recomputed_layers=c.recomputed_layers - mark[1],
                    recoveries=c.recomputes - mark[2],
                    previous_ends=previous_ends,
                    io_s=c.io_wait_s - mark[0],
                    serial=serial,
                )
            mark = (c.io_wait_s, c.recomputed_layers, c.recomputes)
            t_last, previous_ends = now, len(ends)
            if t_first is None:
                if waiting and hasattr(runtime.waiter, "flush"):  # the decode's figures start after it
                    runtime.waiter.flush()
                t_first = time.perf_counter()
                c.ttft_s = t_first - tic
                c.prefill_s += t_first - tic
                io_at_first = c.io_wait_s
                waits_at_first = (c.sync_wait_s, c.recovery_wait_s)
                cache_at_first = runtime.cache_totals()
            c.generated_tokens += 1
            yield token, step.logprobs
            n += 1
            # (Not under device-wait: freeing cached managed memory waits for the device with
            # Python's lock held, and the next step's kernels may be waiting for the service.)
            if n % 256 == 0 and not served:
                mx.clear_cache()
            if n == max_tokens:
                break
            step, nxt = nxt, None
    finally:
        # Like mlx_lm, the step fed with the last yielded token has run (its KV entries
        # stay, also when the caller stops early): verify it so the cache is exactly stock's.
        try:
            if nxt is not None:
                settle(nxt, None)
        finally:
            if waiting:
                runtime.waiter.end(generation_stream())
        if t_first is not None:
            c.decode_s += time.perf_counter() - t_first
            c.decode_steps += n - 1
            c.stall_s += c.io_wait_s - io_at_first
            c.decode_sync_wait_s += c.sync_wait_s - waits_at_first[0]
            c.decode_recovery_wait_s += c.recovery_wait_s - waits_at_first[1]
            now_totals = runtime.cache_totals()
            c.decode_hits += now_totals["hits"] - cache_at_first["hits"]
            c.decode_misses += now_totals["misses"] - cache_at_first["misses"]
            c.decode_bytes_read += now_totals["bytes_read"] - cache_at_first["bytes_read"]
            c.decode_prefetch_hits += now_totals["prefetch_hits"] - cache_at_first["prefetch_hits"]
        c.host_syncs += runtime.layer_syncs - syncs_at_first


@dataclass
class Response:
    """One streamed piece of text, like mlx_lm's GenerationResponse."""

    text: str
    token: int
    finish_reason: Optional[str] = None


def stream_generate(
    model, tokenizer, prompt, runtime: Runtime, *, max_tokens: int = 256, **kwargs
) -> Generator[Response, None, None]:
    """Detokenised streaming on top of `generate_step`; stops at an end-of-sequence token."""
    if not isinstance(prompt, mx.array):
        if isinstance(prompt, str):
            bos = tokenizer.bos_token
            add_special = bos is None or not prompt.startswith(bos)
            prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
        prompt = mx.array(prompt)
    detok = tokenizer.detokenizer
    detok.reset()
    n = 0
    for n, (token, _) in enumerate(generate_step(prompt, model, runtime, max_tokens=max_tokens, **kwargs), 1):
        if token in tokenizer.eos_token_ids:
            detok.finalize()
            yield Response(detok.last_segment, token, "stop")
            return
        detok.add_token(token)
        yield Response(detok.last_segment, token, "length" if n == max_tokens else None)
    detok.finalize()
    if detok.last_segment:
        yield Response(detok.last_segment, -1, "length")
