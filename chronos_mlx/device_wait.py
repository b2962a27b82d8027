"""The device waits for the host, and only on a miss (CUDA).

Per-layer routing reads every MoE layer's expert ids back to the host before its experts are
computed: the host waits for the device 48 times a token, and the device drains its queue each
time. Here the host never waits. A small kernel sits in front of each layer's expert products:
it looks the layer's ids up in the layer's *wait table* (device memory: the slot of each
resident expert, `ABSENT` for the rest). When every id is resident it writes their slots and
the layer computes at once, with no host involvement at all. When one is absent it publishes
the ids to a *mailbox* in page-locked host memory and spins until the host answers; a service
thread (`MissService`), polling the mailbox while steps run, loads the missing experts, writes
the table, and answers. The kernel then reads the slots from the table it now trusts. With
pulled loads (`DevicePull`) the host only reads the experts into page-locked staging; the
kernel takes the new table from the answer and the device copies the experts itself.

Exact by construction: an expert's product is computed only from a slot the table says holds
it, and the host changes a layer's slots and table only while that layer's kernel is waiting
for it (nothing queued after it has run yet). A kernel that waits too long (the service died)
gives up, marks the mailbox, and the decode loop refuses the step.

With a predictor, requests carry guesses for the next layer: loaded inside the request
("load", the default form), or read into staging after the answer (preread.py, "stage") and
posted for that layer's kernel to take without asking ("post"); `runtime.guess_reads`.

`available()` says whether this backend can do it: MLX's CUDA backend with `mx.fast.cuda_kernel`.
The kernels and the mailbox are in wait_kernels.py; this module is the host's side.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import mlx.core as mx
import numpy as np

from .errors import ChronosError, DeviceWaitError
from .wait_kernels import (
    ABSENT,
    ACK,
    COUNT,
    GAVE_UP,
    GUESS_LAYER,
    GUESSES_AT,
    IDS,
    LAYER,
    MAX_COPIES,
    MAX_IDS,
    MAX_POST_LAYERS,
    N_COPIES,
    N_GUESSES,
    N_TABLE,
    PUB,
    TAG,
    Mailbox,
    available,
    driver,
    host_kernel,
    max_copies,
    max_post_copies,
    pinned_alloc,
    post_id,
    wait_for_experts,
)

# The kernel side's names that callers of this module use, besides its own.
__all__ = ["ABSENT", "GAVE_UP", "MAX_COPIES", "MAX_IDS", "Mailbox", "available", "host_kernel", "max_copies",
           "wait_for_experts", "MissService", "DevicePull", "DeviceWaiter"]

def _drain(stream=None):
    """Wait until everything queued on `stream` (default: the default device's) has run,
    without Python's lock: `mx.synchronize` keeps it, so a kernel still waiting for the service
    thread would never be answered. A new op on the stream is done only after everything
    queued before it; `mx.eval` lets go of the lock while it waits."""
    stream = stream if stream is not None else mx.default_stream(mx.default_device())
    mx.eval(mx.zeros((1,), dtype=mx.uint32, stream=stream))


class MissService:
    """A thread that answers the device's requests: `handle(layer, ids, tag)` loads what is
    missing and writes the layer's wait table (returning once both are where the device
    reads them); then the request is answered.

    The thread polls the mailbox while active (`resume` / `pause`), sleeping `poll_s`
    between looks (Python's lock is free while it sleeps). A CUDA stream waiting on the mailbox (`cuStreamWaitValue32`) would
    spare the polling but can deadlock: it may share a hardware queue with MLX's stream and
    hold back the very kernel that would publish the request."""

    def __init__(self, mailbox: Mailbox, handle, poll_s: float = 20e-6, active: bool = True, answered=None):
        """`answered()`, if given, runs after each answer (work that must not delay it)."""
        self.mailbox, self._handle, self.poll_s = mailbox, handle, poll_s
        self._answered = answered
        self.requests = 0
        self.error: BaseException | None = None
        self._stop = False
        self._active = threading.Event()
        if active:
            self._active.set()
        self._thread = threading.Thread(target=self._run, name="chronos-miss-service", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int:
        return self._thread.ident

    def resume(self):
        """Poll the mailbox (while steps run)."""
        self._active.set()

    def pause(self):
        """Stop polling (nothing may be waiting for an answer): an idle model costs no CPU."""
        self._active.clear()

    def _run(self):
        words = self.mailbox.words
        # poll_s 0: yield the core instead of sleeping (~1 us a look while the main thread
        # waits on the device; Python's lock still decides when it is busy building).
        rest = os.sched_yield if self.poll_s <= 0 and hasattr(os, "sched_yield") else (lambda: time.sleep(self.poll_s))
        served = int(words[PUB])
        while not self._stop:
            if not self._active.is_set():
                self._active.wait(0.5)
                continue
            if int(words[PUB]) == served:
                rest()
                continue
            served = int(words[PUB])
            layer, n, tag, g = int(words[LAYER]), int(words[COUNT]), int(words[TAG]), int(words[N_GUESSES])
            ids = words[IDS : IDS + n].copy()
            try:
                if g:  # guesses for another layer came with it
                    self._handle(layer, ids, tag, guesses=(int(words[GUESS_LAYER]), words[GUESSES_AT : GUESSES_AT + g].copy()))
                else:
                    self._handle(layer, ids, tag)
            except BaseException as e:  # noqa: BLE001 - the decode loop raises it after the step
                if self.error is None:
                    self.error = e
            self.requests += 1
            words[ACK] = served
            if self._answered is not None:
                try:
                    self._answered()
                except BaseException as e:  # noqa: BLE001
                    if self.error is None:
                        self.error = e

    def where(self) -> str:
        """What the thread is doing now: the request it serves and its innermost frames (for an
        error that says why a kernel stopped waiting)."""
        import sys
        import traceback

        words = self.mailbox.words
        asked, answered = int(words[PUB]), int(words[ACK])
        state = (f"request {asked} from layer {int(words[LAYER])} of pass {int(words[TAG])} unanswered"
                 if asked != answered else "no request outstanding")
        frame = sys._current_frames().get(self._thread.ident)
        if frame is None:
            return f"{state}; the loading thread has ended"
        at = "; ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                       for f in traceback.extract_stack(frame)[-4:])
        return f"{state}; the loading thread is in {at}"

    def stop(self):
        """End the thread (call only while no request is outstanding)."""
        self._stop = True
        self._thread.join(timeout=5)


class DevicePull:
    """Takes the copy engine's place (`upload.DeviceUpload`'s calls) on the service thread:
    expert bytes are read into page-locked staging, and the copies into the slots are listed
    (`take`) for the waiting kernel, which makes them itself. Staging is handed out in turn
    until the list is taken: nothing is reused before the device has copied it."""

    def __init__(self, alloc):
        self._alloc = alloc  # nbytes -> uint8 array (page-locked on CUDA)
        self._bufs: list = []
        self._at = (0, 0)  # (buffer, byte) where the next staging starts
        self._last = 0  # address of the last staging handed out
        self._pending: list = []
        self.copies = self.bytes = 0
        self.failed = None

    def staging(self, nbytes: int) -> np.ndarray:
        i, pos = self._at
        while True:
            if i == len(self._bufs):
                self._bufs.append(self._alloc(max(64 << 20, nbytes)))
            buf = self._bufs[i]
            if pos + nbytes <= len(buf):
                break
            i, pos = i + 1, 0
        out = buf[pos : pos + nbytes]
        self._at = (i, pos + (nbytes + 15) // 16 * 16)  # 16-byte aligned: the device copies 16 at a time
        self._last = out.ctypes.data
        return out

    def copy(self, copies: list, wait: bool = True, source: np.ndarray | None = None):
        base = self._last if source is None else source.ctypes.data
        merged = []
        for array, dst, off, n in sorted(copies):
            last = merged[-1] if merged else None
            if last and last[0] == array and last[2] + last[3] == dst and last[1] + last[3] == base + off:
                last[3] += n
            else:
                merged.append([array, base + off, dst, n])
        self._pending += [(src, dst, n) for _, src, dst, n in merged]
        self.copies += len(merged)
        self.bytes += sum(n for *_, n in merged)

    def wait(self):
        pass  # the device copies after the answer

    def table_staging(self, nbytes: int):
        raise RuntimeError("a pulled load writes no table through staging (the mailbox carries it)")

    def take(self) -> list:
        """The copies listed since the last take, as [(source, destination, bytes)]."""
        out, self._pending, self._at = self._pending, [], (0, 0)
        return out


class DeviceWaiter:
    """Device-wait routing's state for one streamed model (`Runtime.waiter`): the mailbox,
    the service thread, one wait table per MoE layer, and the ids of the pass being built.

    While the decode loop builds a step, `route` puts each MoE layer's ids through
    `wait_for_experts`; `end_pass` gives back every layer's ids as one array, which the loop
    reads once the step has run and hands to `account` (hits, the policy, observers). The
    service thread is the only one that changes slots while steps run (`begin` waits out
    every load in flight and starts no prefetch)."""

    def __init__(self, runtime, mailbox: Mailbox | None = None, kernel=None, pull: bool | None = None,
                 staging_alloc=None):
        """`mailbox`, `kernel`, `staging_alloc`: a host stand-in (`Mailbox.host()`,
        `host_kernel`, numpy buffers) where there is no CUDA (tests); by default page-locked
        memory and the CUDA kernels. `pull`: loads are copied by the waiting kernel from
        page-locked staging (`DevicePull`) instead of written by the host — always so with
        the CUDA kernels (default): on an H200 a host write into MLX's managed memory while a
        kernel spins never completed (the page cannot migrate), nor did a copy-engine copy.
        Host writes remain for the stand-in (and memory both sides truly share)."""
        self.runtime = runtime
        cache = runtime.cache
        if pull is None:
            pull = mailbox is None
        needs_driver = mailbox is None or (pull and staging_alloc is None)
        lib = driver() if needs_driver else None
        self.mailbox = mailbox if mailbox is not None else Mailbox.pinned(lib)
        self._kernel = kernel or wait_for_experts
        self.pull = DevicePull(staging_alloc or pinned_alloc(lib)) if pull else None
        self.tables, self.views, self.layer_ids = [], [], []
        from .cache import _numpy_view

        for i, L in enumerate(cache.layers):
            t = mx.full((L.num_experts,), ABSENT, dtype=mx.uint32)
            mx.eval(t)
            self.tables.append(t)
            self.views.append(_numpy_view(t))
            self.layer_ids.append(mx.array([i], dtype=mx.uint32))
            L.wait_stale = True
        mx.eval(self.layer_ids)
        self._loaded: dict = {}  # (pass, layer) -> experts loaded at its request, until accounted
        self._passes = 0
        self._tag = None
        self._lock = threading.Lock()
        self.requests = 0
        self._warmed: set = set()  # id counts the kernels ran for (`warm`)
        self._gave_up = int(self.mailbox.words[GAVE_UP])
        self._pass: list = []
        self._after = None  # the last kernel's output (`route`)
        self.resident = frozenset()  # layers that hold every expert (`begin`): routed with no kernel
        self._collector = None  # whether the cyclic collector was on before `begin`
        # How long the service sleeps between looks at the mailbox: a round trip costs about
        # that plus the wake-up (~0.1 ms at 20 us on an H200 host); 0 yields the core instead
        # (a core busy while steps run; not measured on a GPU yet).
        poll_us = float(os.environ.get("CHRONOS_WAIT_POLL_US", "20"))
        # Guesses read into staging after the answer (preread.py; pulled loads, "stage"/"post").
        self.prereader = None
        self._to_stage = None  # (pass, layer, guesses) of the request just answered
        # "post": staged guesses posted to their layer's kernel, which takes them without asking.
        self._posting = False  # decided at `begin`
        self._post = None  # the post left in the mailbox, until settled (`_settle_post`)
        self._guess_pass: dict = {}  # layer -> the pass its staged guesses were read for
        self._last_asked = (0, -1)  # (pass, layer) of the latest request
        # The service's handling of a request and the making or settling of a post, one at a time.
        self._decide = threading.Lock()
        self.posts = self.posts_taken = 0
        self.service = MissService(self.mailbox, self._handle, poll_s=poll_us * 1e-6, active=False,
                                   answered=self._stage_guesses)

    def begin(self):
        """Before steps are launched (nothing queued): from now on every thread writes slots
        from the host (a copy-engine copy would wait for a kernel that waits for it), no
        load is in flight, every table is current, and Python's cyclic collector is off
        until `end` (`_hold_collector`)."""
        cache = self.runtime.cache
        self._hold_collector()
        self._posting = (self.pull is not None and getattr(self.runtime, "guess_reads", "load") == "post"
                         and self.runtime.predictor is not None and len(cache.layers) <= MAX_POST_LAYERS)
        self._last_asked = (0, -1)
        self.warm()
        cache.copy_engine_paused = True
        cache.wait_for_loads()
        self.resident = cache.resident_layers()
        for i, view in enumerate(self.views):
            cache.write_wait_table(i, view)
        cache.deciding_thread = self.service.ident  # the only thread that loads while steps run: the lean path
        self.service.resume()

    def warm(self, n: int | None = None):
        """Run the kernels once for `n` ids (default: the model's top-k, one decode token's)
        with every id resident, so MLX compiles them now and not inside the first timed step
        (a fresh machine's compile can take seconds)."""
        n = n or int(self.runtime.info.get("top_k") or 1)
        if (n, self._posting) in self._warmed:
            return
        ids = mx.arange(n, dtype=mx.uint32)
        out = self._kernel(ids, mx.arange(n, dtype=mx.uint32), self.mailbox.box, self.layer_ids[0], self.layer_ids[0],
                           pull=self.pull is not None, posts=self._posting)
        mx.eval(out)
        self._warmed.add((n, self._posting))

    def end(self, stream=None):
        """After the last step: once everything queued on `stream` has run (the service still
        answering), the service stops polling and the copy engine writes slots again. Raises
        (`check`) if a kernel of those last steps stopped waiting: the KV cache they wrote is
        not stock's."""
        try:
            _drain(stream)
        finally:
            with self._decide:
                self._settle_post()  # every kernel has run
                if self.prereader is not None:  # every copy listed has been made
                    self.prereader.recycle()
            self._after = None
            self.service.pause()
            self.runtime.cache.copy_engine_paused = False
            self.runtime.cache.deciding_thread = None
            self._release_collector()
        self.check()

    def _hold_collector(self):
        """Collect the young generations now, while no kernel waits, then keep the cyclic
        collector off while steps run. A collection frees whatever garbage it finds (a
        model's module tree, a step's arrays) on the thread that triggered it, holding
        Python's lock; an MLX buffer freed
        past the allocator's cache limit is a device free, which waits for the device — and a
        kernel there may be waiting for the service thread, which needs the lock: it gives
        up after ~10 s (session 13's deadlock, through another door). Suspected, not traced,
        in a bench on an H200 whose first device-wait step failed so, twice, with other
        models and a calibration's garbage in the process (session 17)."""
        if self._collector is None:
            self._collector = gc.isenabled()
            gc.collect(1)  # the young generations (~1 ms; a full collection costs tens): only a
            gc.disable()   # collection during the steps is the hazard, and none runs until `end`

    def _release_collector(self):
        held, self._collector = self._collector, None
        if held:
            gc.enable()

    def route(self, layer: int, indices: mx.array, guesses: tuple | None = None) -> mx.array:
        """Slot ids for `indices`, through `layer`'s waiting kernel. `guesses` = (another
        layer, expert ids guessed for it): sent along if the kernel asks, so the service can
        load them there while the device waits (`_prefetch`)."""
        if not self._pass:  # a new pass: its requests carry its number
            self._passes = (self._passes + 1) & 0xFFFFFFFF
            self._tag = mx.array([self._passes], dtype=mx.uint32)
        self._pass.append((layer, indices))
        extra = {} if guesses is None else {"guesses": guesses[1], "guess_layer": self.layer_ids[guesses[0]]}
        # Each kernel reads the one before it (of this pass or the last): the device runs them
        # in turn even where the routing does not wait for the layer below (one mailbox).
        if self._posting:
            extra["posts"] = True
        out = self._kernel(indices, self.tables[layer], self.mailbox.box, self.layer_ids[layer], self._tag,
                           pull=self.pull is not None, after=self._after, **extra)
        self._after = out
        return out

    def end_pass(self):
        """(pass, layers, sizes, every id as one flat array) of the pass just built, or None."""
        got, self._pass = self._pass, []
        if not got:
            return None
        # Joined on the CPU stream: the result is host memory. Reading a GPU buffer moves it to
        # host memory with Python's lock held (MLX's CUDA allocator), and that copy waits for
        # the device: a kernel waiting for the service thread (which needs the lock) never
        # ended (H200, session 13). On the CPU stream the wait happens inside `eval`, unlocked.
        flat = mx.concatenate([i.reshape(-1) for _, i in got], stream=mx.cpu)
        return self._passes, [l for l, _ in got], [i.size for _, i in got], flat

    def _handle(self, layer: int, ids: np.ndarray, tag: int = 0, guesses: tuple | None = None):
        """On the service thread, while layer `layer`'s kernel waits: load, then the table;
        and the experts guessed for another layer, if the request carried guesses."""
        with self._decide:
            self._handle_now(layer, ids, tag, guesses)

    def _handle_now(self, layer: int, ids: np.ndarray, tag: int, guesses: tuple | None):
        runtime, cache = self.runtime, self.runtime.cache
        uniq = sorted(set(ids.tolist()))
        self._last_asked = (tag, layer)
        if self.pull is not None:  # read into staging; the waiting kernel copies and takes the table
            if self.prereader is not None:  # the last answer's copies are made (its layer's kernels ran)
                self.prereader.recycle()
            self._settle_post()  # this layer's kernel took it or not; either way before deciding
            if guesses is not None and self._staging_guesses():  # read after the answer, not in it
                self._to_stage, guesses = (tag, *guesses), None
            got = self._pulled_load(layer, uniq, ids, guesses)
        else:
            with cache.uploading_with(None):  # host writes (already so while steps run: begin)
                try:
                    got = runtime.load_for(layer, uniq, count_hits=False)
                finally:  # also after a failed load: the table says what the slots hold
                    cache.write_wait_table(layer, self.views[layer], force=True)
                if guesses is not None:
                    try:
                        self._prefetch(*guesses, room=None)
                    finally:
                        cache.write_wait_table(guesses[0], self.views[guesses[0]], force=True)
        with self._lock:
            self._loaded.setdefault((tag, layer), set()).update(got)
            self.requests += 1

    def _staging_guesses(self) -> bool:
        """Whether guesses are read into staging after the answer (`runtime.guess_reads`
        "stage", pulled loads): the `PreReader` is made at the first request with guesses."""
        if getattr(self.runtime, "guess_reads", "load") not in ("stage", "post"):
            return False
        if self.prereader is None:
            from .preread import PreReader

            # Twice a layer's guesses: one layer's still being read while the next one's arrive.
            self.prereader = PreReader(self.runtime.cache, self.pull._alloc, 2 * max(1, int(self.runtime.guesses)),
                                       on_ready=self._post_staged)
            self.runtime.cache.prereader = self.prereader
        return True

    def _stage_guesses(self):
        """After an answer (service thread): queue the reads of the guesses it came with."""
        got, self._to_stage = self._to_stage, None
        if got is not None:
            tag, layer, guesses = got
            self._guess_pass[layer] = tag
            self.prereader.submit(layer, guesses)

    def _post_staged(self, layer: int, experts: list):
        """Once guesses for `layer` are staged (the pre-reader's thread): post them to that
        layer's kernel of the pass they were guessed in, if it may still be ahead — no request
        of that pass from it or a later layer, nor of a later pass, has come. Its table and
        copies are chosen now (victims evicted on the host, nothing mapped); the kernel takes
        the post or passes without it, and `_settle_post` makes the host agree."""
        if not self._posting:
            return
        # Not waiting: a request is being handled, from this layer or a later one (guesses are
        # read after the answer that brought them) — too late to post — and it may itself be
        # waiting for a read queued behind this call.
        if not self._decide.acquire(blocking=False):
            return
        try:
            self._post_now(layer, experts)
        finally:
            self._decide.release()

    def _post_now(self, layer: int, experts: list):
        tag = self._guess_pass.get(layer)
        if self._post is not None or tag is None or self._last_asked[0] != tag or self._last_asked[1] >= layer:
            return
        cache, pre = self.runtime.cache, self.prereader
        staged = pre.take_ready(layer, experts)
        if not staged:
            return
        L = cache.layers[layer]
        room = max_post_copies(int(self.runtime.info.get("top_k") or 1)) // len(L.params)
        items, victims, table = cache.reserve_post(layer, [s.expert for s in staged], room)
        by_expert = {s.expert: s for s in staged}
        posted = [by_expert[e] for e, _ in items]
        pre.restage([s for s in staged if s not in posted])
        if not items:
            return
        at = pre.offsets(layer)
        copies = [(s.buf.ctypes.data + at[name], p.addr + slot * p.source.nbytes, p.source.nbytes)
                  for (e, slot), s in zip(items, posted) for name, p in L.params.items()]
        pid = post_id(tag, layer)
        self._post = (pid, tag, layer, items, victims, posted)
        self.mailbox.post(pid, table.astype(np.uint32), copies)
        self.posts += 1

    def _settle_post(self):
        """Withdraw the post, if one is left (its kernel has run or passed: the caller knows),
        and make the host's slots say what the device did with it. `_decide` held."""
        post, self._post = self._post, None
        if post is None:
            return
        pid, _, layer, items, victims, posted = post
        taken = self.mailbox.take_back_post(pid)
        self.runtime.cache.settle_post(layer, items, victims, taken)
        if taken:
            self.prereader.hold(posted)  # the device may not have copied them yet
            self.posts_taken += 1
        else:
            self.prereader.restage(posted)

    def _pulled_load(self, layer: int, uniq: list, ids: np.ndarray, guesses: tuple | None = None) -> list:
        """Read into staging and answer with the layer's table and the copies. On any failure
        the layer is emptied and the answer says every expert is absent: experts mapped whose
        bytes never reached their slots must not look resident to any later step."""
        runtime, cache, words = self.runtime, self.runtime.cache, self.mailbox.words
        words[N_TABLE] = words[N_COPIES] = 0  # nothing of an earlier answer may be applied again
        L = cache.layers[layer]
        limit = max_copies(len(ids), 0 if guesses is None else len(guesses[1]))
        try:
            with cache.uploading_with(self.pull):
                got = runtime.load_for(layer, uniq, count_hits=False)
                listed = len(self.pull._pending)
                if listed > limit:  # the kernel would drop some
                    raise RuntimeError(f"layer {layer}: {listed} copies for {len(ids)} ids do not fit the kernel's plan")
                if guesses is not None:  # last, with the room the plan has left: it never overflows it, and
                    self._prefetch(*guesses, room=limit - listed)  # what it changes is always in the answer
            copies = self.pull.take()
            with cache._lock:
                table = L.slot_of.astype(np.uint32)
                L.wait_stale = False
            self.mailbox.answer_pull(table, copies)
            return got
        except BaseException:
            self.pull.take()
            cache.forget_layer(layer)
            self.mailbox.answer_pull(np.full(L.num_experts, ABSENT, dtype=np.uint32), [])
            raise

    def _prefetch(self, layer: int, guesses: np.ndarray, room: int | None):
        """Load the guessed experts of `layer` that are absent, while another layer's kernel
        waits: every kernel of this pass before that one has run, none after it (nor of a
        pass queued behind) has started, so `layer`'s slots and table may change — provided
        the device makes the writes (pulled: more copies in the same answer, `layer`'s new
        table among them) before anything later reads them. A wrong guess costs its bytes and
        an eviction; a layer whose experts all arrived this way never asks.

        `room`: copies the answer may still list (None: host writes, the caller writes the
        table). Best effort: a load that fails empties the layer (every entry absent), which
        is exact, only slower; the request it came with is answered as usual."""
        cache = self.runtime.cache
        L = cache.layers[layer]
        want = [int(e) for e in dict.fromkeys(guesses.tolist()) if L.slot_of[int(e)] < 0]
        staged = None
        if room is not None:  # nine copies an expert at most, and one for the table
            want = want[: max(0, (room - 1) // len(L.params))]
            if not want:
                return
            staged = self.pull.staging(4 * L.num_experts)  # first: the table's copy is listed whatever happens
        try:
            if want:
                cache.ensure(layer, want, prefetch=True)
        except Exception:  # noqa: BLE001 - a guess may fail; the request it rode on may not
            cache.forget_layer(layer)
        if staged is not None:
            with cache._lock:
                table = L.slot_of.astype(np.uint32)
                L.wait_stale = False
            staged[:] = table.view(np.uint8)
            dst = self.views[layer].ctypes.data
            self.pull.copy([(dst, dst, 0, table.nbytes)], source=staged)

    def account(self, tag: int, layers: list, sizes: list, host: np.ndarray):
        """A step's routing, read once it ran: uses of experts not loaded for it are hits;
        the policy and observers hear of every layer."""
        runtime, cache = self.runtime, self.runtime.cache
        if self._post is not None:
            with self._decide:  # a post of this pass (or before) is decided: its kernel ran
                if self._post is not None and ((tag - self._post[1]) & 0xFFFFFFFF) < 0x80000000:
                    self._settle_post()
        pos = 0
        for layer, n in zip(layers, sizes):
            inds = host[pos : pos + n]
            pos += n
            uniq = np.unique(inds)
            with self._lock:
                got = self._loaded.pop((tag, layer), set())
            L = cache.layers[layer]
            L.counters.hits += inds.size - sum(1 for e in uniq.tolist() if e in got)
            cache.mark_used(layer, uniq)
            runtime._observe(layer, inds)

    def check(self):
        """Raise if a request failed or a kernel stopped waiting: that step is not exact."""
        err = self.service.error
        if err is not None:
            self.service.error = None
            if isinstance(err, ChronosError):  # a shard gone or changed: said as the host-read modes say it
                raise err
            raise DeviceWaitError(f"loading experts for the device failed: {err}") from err
        gave_up = int(self.mailbox.words[GAVE_UP])
        if gave_up != self._gave_up:
            self._gave_up = gave_up
            raise DeviceWaitError("a MoE layer stopped waiting for its experts (the loading thread did not answer "
                                  "within ~10 s); the step was refused. `--sync per-layer` routes without the "
                                  f"device waiting. ({self.service.where()})")

    def close(self):
        self._release_collector()  # a `begin` never ended
        if self.runtime.cache.deciding_thread == self.service.ident:
            self.runtime.cache.deciding_thread = None
        self.service.stop()
        if self.prereader is not None:
            if self.runtime.cache.prereader is self.prereader:
                self.runtime.cache.prereader = None
            self.prereader.stop()
        self.mailbox.close()
