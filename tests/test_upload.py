"""DeviceUpload: on CUDA the reads land in page-locked staging and the driver's copy engine
writes the slots. Here (no GPU) the driver is replaced by one that copies with memmove,
so what is tested is chronos's side: which bytes go to which slot address, merged copies,
per-thread staging, and that the tokens stay stock mlx_lm's."""

import ctypes
import threading

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.generate import generate_step
from chronos_mlx.upload import DeviceUpload, device_upload

from conftest import DEMO, stock_greedy


class MemmoveDriver:
    """The few CUDA driver calls DeviceUpload makes, done on host memory."""

    def __init__(self):
        self.buffers, self.copies, self.syncs = [], [], 0
        self.freed, self.destroyed = [], 0
        self.lock = threading.Lock()
        self.threads = set()  # names of the threads that copied

    def cuCtxGetCurrent(self, ctx):
        ctx._obj.value = 1
        return 0

    def cuStreamCreate(self, stream, flags):
        stream._obj.value = 1
        return 0

    def cuMemHostAlloc(self, ptr, size, flags):
        buf = np.zeros(size, dtype=np.uint8)
        self.buffers.append(buf)
        ptr._obj.value = buf.ctypes.data
        return 0

    def cuMemFreeHost(self, ptr):
        self.freed.append(ptr.value)
        return 0

    def cuStreamDestroy_v2(self, stream):
        self.destroyed += 1
        return 0

    def cuMemcpyHtoDAsync_v2(self, dst, src, n, stream):
        ctypes.memmove(dst, src, n)
        with self.lock:
            self.copies.append(n)
            self.threads.add(threading.current_thread().name)
        return 0

    def cuStreamSynchronize(self, stream):
        self.syncs += 1
        return 0


def _with_memmove_upload(rt):
    driver = MemmoveDriver()
    rt.cache.upload = DeviceUpload(driver)
    rt.late_rows = False  # as on CUDA: per-layer routing through gates
    return driver


def test_there_is_no_device_upload_without_a_cuda_gpu(monkeypatch):
    assert device_upload() is None  # this machine: MLX's CPU backend
    monkeypatch.setenv("CHRONOS_DEVICE_COPY", "0")
    assert device_upload() is None


@pytest.mark.parametrize("path", ["lean", "general"])
def test_uploaded_slots_hold_the_experts_bytes_from_the_shard(path):
    # Both read paths: the lean one (small demand loads) and the general one (reads split
    # across threads, O_DIRECT, checks).
    _, _, rt = chronos_mlx.load(None, expert_budget=0.25, dtype="bfloat16")
    driver = _with_memmove_upload(rt)
    cache = rt.cache
    if path == "general":
        cache.reader.plain_reads = lambda nbytes, paths: False
    cache.ensure(3, [7, 8, 9, 40])  # neighbours on disk and one apart
    cache.ensure(3, [1, 60])
    assert driver.copies and driver.syncs == 2
    stock = mx.load(str(DEMO / "model.safetensors"))
    L = cache.layers[3]
    for name, p in L.params.items():
        want = stock[f"model.layers.3.mlp.switch_mlp.{name}"]
        for e in (7, 8, 9, 40, 1, 60):
            got = np.array(mx.view(p.slots[int(L.slot_of[e])], mx.uint16 if p.dtype == mx.bfloat16 else p.dtype))
            ref = np.array(mx.view(want[e], mx.uint16) if want.dtype == mx.bfloat16 else want[e])
            assert np.array_equal(got, ref), (name, e)


def test_a_batch_larger_than_the_staging_is_copied_in_pieces(monkeypatch):
    # A whole layer (start-up at budget 1.0, a prefill wave) goes through the copy engine
    # too, a staging buffer's worth at a time, never through host writes.
    import chronos_mlx.cache as cache_module

    _, _, rt = chronos_mlx.load(None, expert_budget=0.5, dtype="bfloat16")
    driver = _with_memmove_upload(rt)
    cache = rt.cache
    monkeypatch.setattr(cache_module, "MAX_STAGING", 5 * cache.bytes_on_disk_per_expert)
    wanted = [e for e in range(64) if cache.layers[4].slot_of[e] < 0][:23]
    cache.ensure(4, wanted)
    assert driver.syncs == 5  # 23 experts, 5 a piece
    stock = mx.load(str(DEMO / "model.safetensors"))
    L = cache.layers[4]
    for name, p in L.params.items():
        want = stock[f"model.layers.4.mlp.switch_mlp.{name}"]
        for e in wanted:
            got = np.array(mx.view(p.slots[int(L.slot_of[e])], mx.uint16 if p.dtype == mx.bfloat16 else p.dtype))
            ref = np.array(mx.view(want[e], mx.uint16) if want.dtype == mx.bfloat16 else want[e])
            assert np.array_equal(got, ref), (name, e)


def test_several_layers_loaded_together_are_staged_in_pieces_across_layers(monkeypatch):
    import chronos_mlx.cache as cache_module

    _, _, rt = chronos_mlx.load(None, expert_budget=0.5, dtype="bfloat16")
    driver = QueueingDriver()
    rt.cache.upload = DeviceUpload(driver)
    cache = rt.cache
    cache.reader.min_bytes_per_thread = 1
    monkeypatch.setattr(cache_module, "MAX_STAGING", 5 * cache.bytes_on_disk_per_expert)
    wanted = {layer: [e for e in range(64) if cache.layers[layer].slot_of[e] < 0][:4] for layer in (1, 4, 7)}
    with cache.one_copy_wait():
        cache.ensure_layers(wanted)
    assert driver.syncs == 3  # 12 experts, 5 a piece: each piece waits for the one before
    stock = mx.load(str(DEMO / "model.safetensors"))
    for layer, experts in wanted.items():
        L = cache.layers[layer]
        for name, p in L.params.items():
            want = stock[f"model.layers.{layer}.mlp.switch_mlp.{name}"]
            for e in experts:
                got = np.array(mx.view(p.slots[int(L.slot_of[e])], mx.uint16 if p.dtype == mx.bfloat16 else p.dtype))
                ref = np.array(mx.view(want[e], mx.uint16) if want.dtype == mx.bfloat16 else want[e])
                assert np.array_equal(got, ref), (layer, name, e)


def test_copies_that_continue_each_other_on_both_sides_go_as_one():
    driver = MemmoveDriver()
    up = DeviceUpload(driver)
    stage = up.staging(64)
    stage[:48] = np.arange(48, dtype=np.uint8)
    dst = np.zeros(48, dtype=np.uint8)
    base = dst.ctypes.data
    up.copy([(base, base + 16, 16, 16), (base, base, 0, 16), (base, base + 32, 40, 8)])
    assert driver.copies == [32, 8]  # slots 0 and 1 from rows 0 and 1: one copy
    assert dst[:32].tolist() == list(range(32)) and dst[32:40].tolist() == list(range(40, 48))


def test_copies_into_two_slot_arrays_that_happen_to_be_neighbours_stay_apart():
    # MLX may allocate two slot arrays back to back; the CUDA driver refuses a copy that
    # spans two allocations (seen on the H200 at budget 1.0).
    driver = MemmoveDriver()
    up = DeviceUpload(driver)
    up.staging(64)[:32] = 7
    dst = np.zeros(32, dtype=np.uint8)
    a, b = dst.ctypes.data, dst.ctypes.data + 16  # "two arrays", adjacent in memory
    up.copy([(a, a, 0, 16), (b, b, 16, 16)])
    assert driver.copies == [16, 16]


def test_each_reading_thread_stages_into_its_own_page_locked_buffer_given_back_when_it_ends():
    driver = MemmoveDriver()
    up = DeviceUpload(driver)
    mine = up.staging(1 << 20)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(up.staging(1 << 20)))
    t.start()
    t.join()
    assert mine.ctypes.data != theirs[0].ctypes.data
    assert up.staging(100).ctypes.data == mine.ctypes.data  # reused, not reallocated
    theirs.clear()
    import gc

    gc.collect()
    assert driver.freed == [driver.buffers[1].ctypes.data] and driver.destroyed == 1  # the ended thread's


def test_a_larger_batch_replaces_the_staging_and_gives_the_old_one_back():
    driver = MemmoveDriver()
    up = DeviceUpload(driver)
    small = up.staging(100).ctypes.data
    big = up.staging(3 << 20)
    assert len(big) == 4 << 20 and driver.freed == [small]


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_decoding_through_device_copies_equals_stock_mlx_lm(budget, demo_prompt_ids):
    model, _, rt = chronos_mlx.load(None, expert_budget=budget)
    driver = _with_memmove_upload(rt)
    ids, _ = stock_greedy(DEMO, demo_prompt_ids, 12)
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, rt, max_tokens=12)]
    assert got == ids
    assert driver.copies  # the misses were written by the copies, not by the host


def test_gate_tables_are_written_by_the_copy_engine_too(demo_prompt_ids):
    # Per-layer routing rewrites a layer's gate table whenever its experts moved; on CUDA a
    # host write there would bounce the page between host and GPU every token.
    model, _, rt = chronos_mlx.load(None, expert_budget=0.25)
    driver = _with_memmove_upload(rt)
    table_bytes = rt.cache.layers[0].gate_view.nbytes
    ids, _ = stock_greedy(DEMO, demo_prompt_ids, 12)
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, rt, max_tokens=12, sync="per-layer")]
    assert got == ids
    assert table_bytes in driver.copies
    for L in rt.cache.layers:  # each table as the host would have written it
        if not L.gate_stale:
            assert np.array_equal(np.array(L.gate_table), np.maximum(L.slot_of, 0))


def test_prefetch_threads_copy_through_their_own_staging_beside_demand_loads(demo_prompt_ids):
    # The gate predictor's guesses are loaded on pool threads while the main thread loads
    # what a layer missed: each copies from its own staging, and the tokens stay stock's.
    from chronos_mlx.predict_runtime import attach_predictor

    model, _, rt = chronos_mlx.load(None, expert_budget=0.25, io_sim="bandwidth=2GB/s,latency=200us")
    attach_predictor(model, rt, "gate")
    driver = _with_memmove_upload(rt)
    ids, _ = stock_greedy(DEMO, demo_prompt_ids, 12)
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, rt, max_tokens=12, sync="per-layer")]
    assert got == ids
    assert rt.stats()["prefetch_hits"] > 0
    assert threading.main_thread().name in driver.threads and len(driver.threads) >= 2


class QueueingDriver(MemmoveDriver):
    """Copies happen when the stream is waited for, as on a GPU: a slot read before that
    wait, or a staging rewritten before it, gives wrong bytes."""

    def __init__(self):
        super().__init__()
        self.queued = []

    def cuMemcpyHtoDAsync_v2(self, dst, src, n, stream):
        with self.lock:
            self.queued.append((dst, src, n))
            self.copies.append(n)
            self.threads.add(threading.current_thread().name)
        return 0

    def cuStreamSynchronize(self, stream):
        with self.lock:
            for dst, src, n in self.queued:
                ctypes.memmove(dst, src, n)
            self.queued.clear()
        return super().cuStreamSynchronize(stream)


def test_copies_left_queued_are_waited_for_once_and_before_the_staging_is_rewritten():
    driver = QueueingDriver()
    up = DeviceUpload(driver)
    slots = np.zeros(8, dtype=np.uint8)
    staged = up.staging(8)
    staged[:4] = 7
    up.copy([(slots.ctypes.data, slots.ctypes.data, 0, 4)], wait=False)
    assert driver.syncs == 0 and not slots.any()  # queued: nothing computes with it yet
    table = up.table_staging(4)  # its own buffer: staging it does not wait
    table[:4] = 9
    up.copy([(slots.ctypes.data + 4, slots.ctypes.data + 4, 0, 4)], wait=False, source=table)
    assert driver.syncs == 0
    up.staging(8)[:4] = 1  # staging again waits for the copies still reading it
    assert driver.syncs == 1 and slots.tolist() == [7] * 4 + [9] * 4
    up.wait()  # nothing queued: no second wait
    assert driver.syncs == 1


@pytest.mark.parametrize("sync", ["per-layer", "optimistic", "optimistic, no segment ends",
                                  "optimistic, no segment ends, layers read together", "per-layer, late rows"])
def test_a_loading_layer_waits_for_its_copies_once_and_decodes_stock_tokens(sync, demo_prompt_ids):
    # Copies run only at the stream wait here: any computation started before it would
    # read stale slots or a stale gate table, and the tokens would differ.
    model, _, rt = chronos_mlx.load(None, expert_budget=0.25)
    driver = QueueingDriver()
    rt.cache.upload = DeviceUpload(driver)
    rt.late_rows = sync.endswith("late rows")  # CUDA gates; late rows recompute only after the wait
    ids, _ = stock_greedy(DEMO, demo_prompt_ids, 12)
    batches = []
    copy = rt.cache.upload.copy
    rt.cache.upload.copy = lambda copies, **kw: (batches.append(len(copies)), copy(copies, **kw))[1]
    ends = () if "no segment ends" in sync else None  # every miss recovered by recomputing
    if sync.endswith("together"):  # a recovery's layers as one read submission, shared by threads
        rt.cache.reader.min_bytes_per_thread = 1
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, rt, max_tokens=12, sync=sync.split(",")[0],
                                       segment_ends=ends)]
    assert got == ids
    if ends == ():
        assert rt.counters.recomputes > 0
    # Fewer waits than copy batches: experts and gate tables (per-layer), or every layer a
    # recomputed step reloads (optimistic), share one. Late rows write no gate table: one each.
    if rt.late_rows:
        assert 0 < driver.syncs == len(batches)
    else:
        assert 0 < driver.syncs < len(batches)


class RefusingDriver(MemmoveDriver):
    """A driver that refuses copies (or page-locked memory) after the first `allow` calls."""

    def __init__(self, allow_copies=10**9, allow_alloc=True):
        super().__init__()
        self.allow_copies, self.allow_alloc = allow_copies, allow_alloc

    def cuMemcpyHtoDAsync_v2(self, dst, src, n, stream):
        if len(self.copies) >= self.allow_copies:
            return 1  # CUDA_ERROR_INVALID_VALUE
        return super().cuMemcpyHtoDAsync_v2(dst, src, n, stream)

    def cuMemHostAlloc(self, ptr, size, flags):
        return super().cuMemHostAlloc(ptr, size, flags) if self.allow_alloc else 2  # out of memory


@pytest.mark.parametrize("refusal", ["copies", "page-locked memory"])
def test_a_driver_that_refuses_leaves_the_loads_to_the_host_and_the_tokens_stock(refusal, demo_prompt_ids):
    model, _, rt = chronos_mlx.load(None, expert_budget=0.25)
    driver = RefusingDriver(allow_copies=5) if refusal == "copies" else RefusingDriver(allow_alloc=False)
    rt.cache.upload = DeviceUpload(driver)
    ids, _ = stock_greedy(DEMO, demo_prompt_ids, 12)
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, rt, max_tokens=12)]
    assert got == ids
    assert rt.cache.upload is None  # host writes from the first refusal on
    assert "error" in rt.stats()["device_copy_error"]
