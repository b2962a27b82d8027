"""Guessed experts read into staging ahead of the request that needs them (device-wait).

With a predictor, a device-wait request carries guesses for the next layer. Loaded inside the
request (`DeviceWaiter._prefetch`), their bytes keep the device waiting, right guesses and
wrong ones alike (measured on an H200 in session 17: slower than no guesses). Here the
service hands the guesses to a `PreReader` once it has answered: a thread of its own reads
them into page-locked buffers while the device computes, and a later demand load of one of
them (`ExpertCache._read_experts`, on the service thread) finds its bytes there and only lists
the copies into its slots. Nothing the device reads changes: residency, slots and wait tables
are decided when a layer asks, as without guesses, so exactness does not depend on the
guesses at all. A right guess spares a read inside a request; a wrong one costs a read off
the device's path (counted: `bytes_read`, `prefetch_wasted_bytes`).

A buffer taken by a load stays held until the device has copied it: the copies of one
answer are made before the next layer's kernel runs (they are chained), so `recycle` — at
the next request, and after the last step — frees it.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .shards import ReadRun

ALIGN = 16  # the device copies 16 bytes at a time from aligned addresses


@dataclass
class Staged:
    """One expert's bytes (every parameter, each at `offsets[name]`) in `buf`, or on their way."""

    layer: int
    expert: int
    buf: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    ready: float = 0.0  # when its bytes count as arrived (later under a SimulatedSSD)
    error: BaseException | None = None


def expert_layout(params: dict) -> tuple[dict, int]:
    """({parameter name: byte offset}, bytes) of one expert staged whole, each parameter
    16-byte aligned."""
    offsets, pos = {}, 0
    for name, p in params.items():
        offsets[name] = pos
        pos += (p.source.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return offsets, pos


class PreReader:
    """Reads experts into at most `capacity` staging buffers (from `alloc(nbytes)`) on a
    thread of its own; `take` hands one to a demand load. Oldest staged experts make room
    for new ones; a buffer whose copies may still be pending is never reused."""

    def __init__(self, cache, alloc, capacity: int, on_ready=None):
        """`on_ready(layer, experts)`: called on the reading thread once a batch's bytes are in."""
        self.cache = cache
        self.on_ready = on_ready
        self.capacity = max(0, int(capacity))
        self._alloc = alloc
        layouts = [expert_layout(L.params) for L in cache.layers]
        self._offsets = [o for o, _ in layouts]
        self._nbytes = max((n for _, n in layouts), default=0)
        self._free: list = []
        self._block = None
        self._made = 0
        self._staged: OrderedDict = OrderedDict()  # (layer, expert) -> Staged, oldest first
        self._held: list = []  # buffers taken since the last `recycle`
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self.reads = self.used = self.wasted = 0  # experts
        self.error = None  # what `on_ready` raised, if it did
        self._thread = threading.Thread(target=self._run, name="chronos-preread", daemon=True)
        self._thread.start()

    def offsets(self, layer: int) -> dict:
        return self._offsets[layer]

    def submit(self, layer: int, experts) -> int:
        """Read those of `experts` not resident in `layer` and not staged already (they become
        the newest). Returns how many reads were queued: fewer when every buffer is busy."""
        L = self.cache.layers[layer]
        batch = []
        with self._lock:
            for e in dict.fromkeys(int(x) for x in experts):
                key = (layer, e)
                if key in self._staged:
                    self._staged.move_to_end(key)
                    continue
                if L.slot_of[e] >= 0:
                    continue
                buf = self._buffer()
                if buf is None:
                    break
                s = Staged(layer, e, buf)
                self._staged[key] = s
                batch.append(s)
        if batch:
            self._work.put(batch)
        return len(batch)

    def _buffer(self):
        """A free buffer (under the lock): a new one up to `capacity`, else the oldest staged
        expert's once its read has finished."""
        if self._free:
            return self._free.pop()
        if self._made < self.capacity:
            if self._block is None:  # one allocation for all: page-locking is dear, and done once
                self._block = self._alloc(self.capacity * self._nbytes)
            self._made += 1
            return self._block[(self._made - 1) * self._nbytes : self._made * self._nbytes]
        for key, s in self._staged.items():
            if s.done.is_set():
                del self._staged[key]
                self._count_wasted(s)
                return s.buf
        return None

    def _count_wasted(self, s: Staged):
        if s.error is None:
            self.wasted += 1
            c = self.cache.layers[s.layer].counters
            c.bytes_read += self.cache.bytes_on_disk_per_expert
            c.prefetch_wasted_bytes += self.cache.bytes_on_disk_per_expert

    def take(self, layer: int, expert: int) -> Staged | None:
        """The staged bytes of `expert`, waiting for a read still under way; None if it is not
        staged (or its read failed: the caller reads it itself). Its buffer is held until
        `recycle`."""
        with self._lock:
            s = self._staged.pop((layer, expert), None)
        if s is None:
            return None
        s.done.wait()
        with self._lock:
            if s.error is not None:
                self._free.append(s.buf)
                return None
            self._held.append(s.buf)
            self.used += 1
        return s

    def take_ready(self, layer: int, experts) -> list:
        """Those of `experts` staged for `layer` whose bytes are in, taken without waiting and
        not held: the caller `hold`s or `restage`s each."""
        got = []
        with self._lock:
            for e in experts:
                s = self._staged.get((layer, int(e)))
                if s is not None and s.done.is_set() and s.error is None:
                    del self._staged[(layer, int(e))]
                    got.append(s)
        return got

    def hold(self, staged: list):
        """These buffers' copies are pending (a post taken): free at the next `recycle`."""
        with self._lock:
            self._held += [s.buf for s in staged]
            self.used += len(staged)

    def restage(self, staged: list):
        """Give back what `take_ready` took and nothing copied from (a post not taken)."""
        with self._lock:
            for s in staged:
                if (s.layer, s.expert) in self._staged:  # read again meanwhile: one copy is enough
                    self._free.append(s.buf)
                else:
                    self._staged[(s.layer, s.expert)] = s

    def recycle(self):
        """The device has made every copy listed so far: the buffers taken are free again."""
        with self._lock:
            self._free += self._held
            self._held = []

    def clear(self):
        """Forget every staged expert (reads under way finish first)."""
        with self._lock:
            staged, self._staged = list(self._staged.values()), OrderedDict()
        for s in staged:
            s.done.wait()
        with self._lock:
            for s in staged:
                self._count_wasted(s)
                self._free.append(s.buf)

    def _run(self):
        while True:
            batch = self._work.get()
            if batch is None:
                return
            try:
                self._read(batch)
            except BaseException as e:  # noqa: BLE001 - kept for the decode loop (`error`)
                self.error = self.error or e

    def _read(self, batch: list):
        runs, owners = [], []
        for s in batch:
            L = self.cache.layers[s.layer]
            view = memoryview(s.buf)
            for name, p in L.params.items():
                at, n = self._offsets[s.layer][name], p.source.nbytes
                runs.append(ReadRun(p.paths[s.expert], p.offsets[s.expert], [view[at : at + n]], n))
                owners.append(s)
        try:
            done = self.cache.reader.read_runs(runs)
        except BaseException as e:  # noqa: BLE001 - a failed guess is read again by its demand load
            for s in batch:
                s.error = e
                s.done.set()
            return
        for s, t in zip(owners, done):
            s.ready = max(s.ready, t)
        self.reads += len(batch)
        for s in batch:
            s.done.set()
        if self.on_ready is not None:  # after `done`: a load waiting in `take` goes on meanwhile
            self.on_ready(batch[0].layer, [s.expert for s in batch])

    def stop(self):
        self._work.put(None)
        self._thread.join(timeout=5)
