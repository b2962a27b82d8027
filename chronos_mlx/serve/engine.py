"""The batch engine behind `chronos serve`: one model, one expert cache, one decode batch.

Every request becomes one sequence of mlx_lm's own `BatchGenerator` (continuous batching:
new prompts are prefilled in chunks of `prefill_step_size` tokens between decode steps of the
running batch, finished and cancelled sequences leave it). The model is the one
`chronos_mlx.load` returns; its `StreamingSwitch` modules route every MoE layer per layer
("sync" mode), which is exact under any caller, so a decode step of the whole batch loads the
union of the batch's experts for each layer once and every sequence gets stock mlx_lm's
tokens for the same batch composition.

All MLX work happens on the engine's own thread; callers (HTTP handler threads) talk to it
through queues: `submit()` returns a `RequestHandle` whose `events()` yields `Event`s and
whose `cancel()` removes the sequence from the batch at the next step.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx

DEFAULT_MAX_TOKENS = 512


class EngineError(RuntimeError):
    """The engine cannot serve (its thread died, or it was stopped)."""


@dataclass
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)  # stop strings
    logprobs: bool = False
    top_logprobs: int = 0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    # mlx_lm's logits processors (sample_utils.make_logits_processors); 0 or None: off
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None  # token id -> added logit


@dataclass
class Event:
    """One generated token (text may be empty while a multi-byte character or a possible stop
    string is pending), or the end of the request (finish_reason set)."""

    text: str = ""
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: tuple = ()
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled", "error"
    error: Optional[str] = None


def make_sampler(params: SamplingParams, tokenizer=None):
    """None (the batch's greedy fallback) at temperature 0; else a sampler for this request.

    Without a seed it is mlx_lm's own `make_sampler` (the global random state, as
    mlx_lm.server); with one it draws from its own key, so a seeded request gives the
    same sample whatever else is in the batch."""
    if not params.temperature:
        return None
    if params.seed is None:
        from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

        return mlx_make_sampler(params.temperature, top_p=params.top_p if params.top_p < 1 else 0.0,
                                min_p=params.min_p, top_k=params.top_k)
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    state = {"key": mx.random.key(params.seed)}
    inv_temp = 1.0 / params.temperature
    top_p, min_p, top_k = params.top_p, params.min_p, params.top_k

    def sampler(logprobs):
        # The filters in mlx_lm's order (sample_utils.make_sampler), then this request's own key.
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sampler


def make_logits_processors(params: SamplingParams) -> list:
    """mlx_lm's logits processors for a request (empty: none), as mlx_lm.server makes them."""
    from mlx_lm.sample_utils import make_logits_processors as mlx_make_logits_processors

    return mlx_make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty or None,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


class RequestHandle:
    """A submitted request as its caller sees it."""

    def __init__(self, prompt_ids: list, params: SamplingParams):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self._events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.uid: Optional[int] = None
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens taken from the prompt cache (not prefilled)
        self.keep_at: list = []  # prompt lengths whose KV cache goes into the prompt cache
        self.submitted_at = time.perf_counter()
        self.first_token_at: Optional[float] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self):
        """Stop generating for this request (the client went away)."""
        self.cancelled.set()

    def get(self, timeout: Optional[float] = None) -> Event:
        """The next event; raises queue.Empty after `timeout` seconds without one."""
        return self._events.get(timeout=timeout)

    def events(self, poll: float = 0.1, alive=None) -> Iterator[Event]:
        """Every event up to and including the last one (finish_reason set). `alive()` is
        asked every `poll` seconds while waiting; when it says False, the request is cancelled."""
        while True:
            try:
                ev = self._events.get(timeout=poll)
            except queue.Empty:
                if alive is not None and not alive():
                    self.cancel()
                continue
            yield ev
            if ev.finish_reason is not None:
                return

    def _put(self, ev: Event):
        self._events.put(ev)
        if ev.finish_reason is not None:
            self.done.set()


class _Sequence:
    """Engine-side state of one request: detokenizer and stop-string matching."""

    def __init__(self, handle: RequestHandle, tokenizer):
        self.handle = handle
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.stops = [s for s in handle.params.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all text so far (for stop matching)
        self.sent = 0  # characters of `text` already delivered

    def feed(self, token: int, finish: Optional[str]):
        """Text to deliver now and whether a stop string ended the request."""
        if finish == "stop":  # EOS / stop tokens: not decoded (as mlx_lm.server)
            self.detok.finalize()
        else:
            self.detok.add_token(token)
            if finish is not None:
                self.detok.finalize()
        self.text += self.detok.last_segment
        if self.stops:
            cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                out = self.text[self.sent : cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                return out, True
        end = len(self.text) if finish is not None else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out, False


class BatchEngine:
    """Serves requests on one loaded chronos model with mlx_lm's BatchGenerator.

    `model, tokenizer, runtime` as returned by `chronos_mlx.load` (or a stock mlx_lm model
    and tokenizer with runtime=None, for comparisons). `prefill_step_size` bounds how long a
    new prompt holds up the running batch (one chunk per decode step);
    `decode_concurrency` is the largest decode batch, `prefill_concurrency` how many prompts
    are prefilled together.

    `prompt_cache_size` finished requests keep their KV cache (mlx_lm's `LRUPromptCache`, as
    mlx_lm.server does; 0: none): a request whose prompt begins with one of them (the next turn
    of a conversation) prefills only the rest. `prompt_cache_bytes` bounds what they and the
    running batch's KV take together (the kept ones are dropped, least recently used first)."""

    def __init__(
        self,
        model,
        tokenizer,
        runtime=None,
        *,
        decode_concurrency: int = 32,
        prefill_concurrency: int = 8,
        prefill_step_size: int = 256,
        max_kv_size: Optional[int] = None,
        prompt_cache_size: int = 0,
        prompt_cache_bytes: Optional[int] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        # MLX streams are per thread: weights still lazy here (e.g. after set_dtype) could not
        # be evaluated on the engine's thread, so evaluate them on the caller's.
        mx.eval(model.parameters())
        self.decode_concurrency = decode_concurrency
        self.prefill_concurrency = prefill_concurrency
        self.prefill_step_size = prefill_step_size
        self.max_kv_size = max_kv_size
        from mlx_lm.models.cache import LRUPromptCache

        self.prompt_cache = LRUPromptCache(prompt_cache_size) if prompt_cache_size > 0 else None
        self.prompt_cache_bytes = prompt_cache_bytes
        self.cached_prompt_tokens = 0  # prompt tokens not prefilled again (counter)
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None
        self.lock = threading.Lock()
        # Counters (read by /health, the bench and tests).
        self.steps = 0
        self.generated_tokens = 0
        self.batch_sizes: list = []  # decode batch size of every decode step
        self.insert_log: list = []  # [(step, [uid, ...])] when sequences joined

    # --- life cycle --------------------------------------------------------------------
    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chronos-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        import gc

        gc.collect()  # see _run

    @property
    def healthy(self) -> bool:
        return self.failure is None and not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # --- requests ----------------------------------------------------------------------
    def submit(self, prompt_ids, params: Optional[SamplingParams] = None, keep_at=()) -> RequestHandle:
        """Queue a request. `keep_at`: prompt lengths at which its KV cache is worth keeping for
        other requests (with a prompt cache): where a chat prompt's system messages end, say,
        which many conversations share (as mlx_lm.server keeps its system and user segments)."""
        if not self.healthy:
            raise EngineError(f"the generation engine is not running ({self.failure!r})")
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("empty prompt")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        handle = RequestHandle(prompt_ids, params)
        handle.keep_at = sorted(n for n in set(keep_at) if 0 < n < len(handle.prompt_ids))
        self._inbox.put(handle)
        return handle

    def generate(self, prompt_ids, params: Optional[SamplingParams] = None) -> tuple[list, str, str]:
        """Blocking helper: (token ids, text, finish_reason)."""
        h = self.submit(prompt_ids, params)
        tokens, text, finish = [], "", None
        for ev in h.events():
            if ev.token is not None:
                tokens.append(ev.token)
            text += ev.text
            finish = ev.finish_reason or finish
        return tokens, text, finish

    # --- the engine thread -------------------------------------------------------------
    def _run(self):
        try:
            self._loop()
        except BaseException as e:  # the thread must not die silently: fail every request
            self.failure = e
            self._fail_all(f"{type(e).__name__}: {e}")
        finally:
            # Arrays made on this thread and caught in reference cycles must be freed before
            # the interpreter exits (else MLX aborts the process at exit).
            import gc

            gc.collect()

    def _fail_all(self, message: str):
        for seq in list(getattr(self, "_active", {}).values()):
            seq.handle._put(Event(finish_reason="error", error=message))
        while True:
            try:
                h = self._inbox.get_nowait()
            except queue.Empty:
                break
            h._put(Event(finish_reason="error", error=message))

    def _loop(self):
        from mlx_lm.generate import BatchGenerator, make_stop_sequences

        # The engine thread's own default stream (as mlx_lm.server): every array of the
        # generation is made and evaluated here.
        stream = mx.default_stream(mx.default_device())
        gen = BatchGenerator(
            self.model,
            stream=stream,
            max_tokens=DEFAULT_MAX_TOKENS,
            completion_batch_size=self.decode_concurrency,
            prefill_batch_size=self.prefill_concurrency,
            prefill_step_size=self.prefill_step_size,
            max_kv_size=self.max_kv_size,
        )
        eos_stops = make_stop_sequences(self.tokenizer)
        self._active: dict = {}
        self._keep: dict = {}  # uid -> prompt segment ends still to be put in the prompt cache
        try:
            while not self._stop.is_set():
                self._admit(gen, eos_stops, block=not self._active)
                self._cancel(gen)
                if not self._active:
                    continue
                prompt_responses, responses = gen.next()
                if self._keep and prompt_responses:
                    self._keep_segment_ends(gen, prompt_responses)
                if responses:
                    self.steps += 1
                    self.batch_sizes.append(len(responses))
                finished = []
                for r in responses:
                    seq = self._active.get(r.uid)
                    if seq is None:
                        continue
                    finished += self._deliver(seq, r)
                if finished:
                    gen.remove([u for u in finished if self._in_batch(gen, u)])
                    for u in finished:
                        self._active.pop(u, None)
                        self._keep.pop(u, None)
                    self._trim_prompt_cache(gen)
        finally:
            self._fail_all("the server is shutting down")
            gen.close()
            del gen
            self._active = {}
            mx.synchronize(stream)

    @staticmethod
    def _in_batch(gen, uid) -> bool:
        return uid in gen._find_uids([uid])

    def _admit(self, gen, eos_stops, block: bool):
        new = []
        try:
            h = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            new.append(h)
            while True:
                new.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        new = [h for h in new if not self._drop_if_cancelled(h)]
        if not new:
            return
        caches, rests = zip(*(self._cached(h) for h in new))
        segments = [self._segments(h, rest) for h, rest in zip(new, rests)]
        uids = gen.insert_segments(
            [seg for seg, _ in segments],
            max_tokens=[h.params.max_tokens for h in new],
            caches=list(caches),
            all_tokens=[h.prompt_ids[: h.cached_tokens] for h in new],
            samplers=[make_sampler(h.params, self.tokenizer) for h in new],
            logits_processors=[make_logits_processors(h.params) for h in new],
            stop_sequences=[eos_stops] * len(new),
        )
        for uid, h, (_, kept) in zip(uids, new, segments):
            h.uid = uid
            self._active[uid] = _Sequence(h, self.tokenizer)
            if kept:
                self._keep[uid] = kept
        self.insert_log.append((self.steps, list(uids)))
        self._trim_prompt_cache(gen)

    def _trim_prompt_cache(self, gen):
        """Drop kept caches (least recently used first) until they and the batch's fit."""
        if self.prompt_cache is not None and self.prompt_cache_bytes is not None:
            self.prompt_cache.trim_to(n_bytes=self.prompt_cache_bytes - gen.prompt_cache_nbytes)

    _CACHE_KEY = "model"  # one model an engine

    def _segments(self, h: RequestHandle, rest: list) -> tuple:
        """(the prompt still to prefill cut where its cache is to be kept, how many of those
        ends to keep): the last segment is the rest of the prompt and is kept at the end of
        the request, with the reply."""
        if self.prompt_cache is None:
            return [rest], 0
        cuts = [n - h.cached_tokens for n in h.keep_at if n > h.cached_tokens]
        bounds = [0] + cuts + [len(rest)]
        segments = [rest[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return segments, len(segments) - 1

    def _keep_segment_ends(self, gen, prompt_responses):
        """Put the KV cache of a prompt at a segment end it was to be kept at into the cache."""
        ends = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt and self._keep.get(r.uid)]
        if not ends:
            return
        for uid, (cache, tokens) in gen.extract_cache(ends).items():
            self._keep[uid] -= 1
            self.prompt_cache.insert_cache(self._CACHE_KEY, list(tokens), cache, cache_type="system")

    def _cached(self, h: RequestHandle) -> tuple:
        """(KV cache to start from or None, prompt tokens still to prefill) for a request: the
        longest cached prefix of its prompt (`LRUPromptCache.fetch_nearest_cache`). At least the
        last prompt token is prefilled: its logits give the first generated token."""
        ids, cache = h.prompt_ids, None
        if self.prompt_cache is not None:
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            cache, rest = self.prompt_cache.fetch_nearest_cache(self._CACHE_KEY, ids)
            if cache is not None and not rest:
                if can_trim_prompt_cache(cache):
                    trim_prompt_cache(cache, 1)
                else:
                    cache = None
            if cache is not None:
                h.cached_tokens = len(ids) - max(len(rest), 1)
                self.cached_prompt_tokens += h.cached_tokens
        return cache, ids[h.cached_tokens :]

    @staticmethod
    def _drop_if_cancelled(h: RequestHandle) -> bool:
        if h.cancelled.is_set():
            h._put(Event(finish_reason="cancelled"))
            return True
        return False

    def _cancel(self, gen):
        gone = [u for u, s in self._active.items() if s.handle.cancelled.is_set()]
        if gone:
            gen.remove(gone)
            for u in gone:
                self._active.pop(u).handle._put(Event(finish_reason="cancelled"))
                self._keep.pop(u, None)

    def _deliver(self, seq: _Sequence, r) -> list:
        h = seq.handle
        if h.first_token_at is None:
            h.first_token_at = time.perf_counter()
        text, stopped = seq.feed(r.token, r.finish_reason)
        finish = "stop" if stopped else r.finish_reason
        eos = r.finish_reason == "stop"
        logprob = top = None
        if h.params.logprobs and not eos:
            logprob = r.logprobs[r.token].item()
            if h.params.top_logprobs > 0:
                top = _top_logprobs(r.logprobs, h.params.top_logprobs, self.tokenizer)
        if not eos:
            h.completion_tokens += 1
            self.generated_tokens += 1
        h._put(
            Event(
                text=text,
                token=None if eos else int(r.token),
                logprob=logprob,
                top_logprobs=top or (),
                finish_reason=finish,
            )
        )
        if finish is not None:
            if self.prompt_cache is not None and getattr(r, "prompt_cache", None) is not None:
                # Finished by the generator itself (end of sequence, length): the conversation so far.
                self.prompt_cache.insert_cache(self._CACHE_KEY, list(r.all_tokens), r.prompt_cache)
            return [r.uid]
        return []


def _top_logprobs(logprobs, n: int, tokenizer) -> tuple:
    n = min(n, logprobs.shape[-1])
    idx = mx.argpartition(-logprobs, kth=n - 1)[:n]
    vals = logprobs[idx]
    order = mx.argsort(-vals)
    idx, vals = idx[order].tolist(), vals[order].tolist()
    toks = tokenizer.convert_ids_to_tokens(idx)
    return tuple({"id": i, "token": t, "logprob": v} for i, t, v in zip(idx, toks, vals))
