"""lio.py: many reads in flight from one call, the same bytes as pread."""

import os

import numpy as np
import pytest

from chronos_mlx import lio

pytestmark = pytest.mark.skipif(not lio.available(), reason="lio_listio: Linux glibc only")


@pytest.fixture()
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    path = tmp_path / "data.bin"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    fds = [fd] + [os.dup(fd) for _ in range(3)]
    yield data, fds
    for f in fds:
        os.close(f)


def test_pieces_over_several_descriptors_read_the_same_bytes_as_pread(data_file):
    data, fds = data_file
    out = np.zeros_like(data)
    view = memoryview(out).cast("B")
    step = 1 << 16
    pieces = [(fds[i % 4], i * step, view[i * step : (i + 1) * step]) for i in range(len(data) // step)]
    assert lio.read_pieces(pieces) == [step] * len(pieces)
    assert np.array_equal(out, data)


def test_a_piece_past_the_end_of_the_file_reads_short(data_file):
    data, fds = data_file
    out = bytearray(100)
    assert lio.read_pieces([(fds[0], len(data) - 40, memoryview(out))]) == [40]
    assert bytes(out[:40]) == data[-40:].tobytes()


def test_a_failed_read_raises_after_every_piece_has_ended(data_file):
    _, fds = data_file
    ok, bad = bytearray(16), bytearray(16)
    with pytest.raises(OSError):
        lio.read_pieces([(fds[0], 0, memoryview(ok)), (-1, 0, memoryview(bad))])


def test_the_calling_threads_signal_mask_is_as_it_was_after_a_call_and_after_a_failure(data_file):
    import signal

    _, fds = data_file
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    lio.read_pieces([(fds[0], 0, memoryview(bytearray(16)))])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    with pytest.raises(OSError):
        lio.read_pieces([(-1, 0, memoryview(bytearray(16)))])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_no_pieces_is_no_call():
    assert lio.read_pieces([]) == []


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setattr(lio, "_tried", False)
    monkeypatch.setattr(lio, "_fn", None)
    monkeypatch.setenv("CHRONOS_LIO", "0")
    assert not lio.available()
    monkeypatch.undo()
    assert lio.available()


def test_signals_during_the_wait_neither_crash_nor_cut_the_reads_short(tmp_path):
    # glibc's wait list lives on lio_listio's stack: a wait ended by EINTR while the I/O threads
    # still wrote to it crashed the process before signals were blocked around the call.
    import signal
    import threading
    import time

    data = np.random.default_rng(1).integers(0, 255, 16 << 20, dtype=np.uint8)
    path = tmp_path / "big.bin"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    fds = [fd, os.dup(fd)]
    seen, stop = [], threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))

    def pester():
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.0005)

    thread = threading.Thread(target=pester)
    thread.start()
    try:
        for _ in range(10):
            out = np.zeros_like(data)
            view, step = memoryview(out).cast("B"), 1 << 18
            lio.read_pieces([(fds[i % 2], i * step, view[i * step : (i + 1) * step]) for i in range(len(data) // step)])
            assert np.array_equal(out, data)
    finally:
        stop.set()
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
        for f in fds:
            os.close(f)
    assert seen  # the signals did arrive meanwhile
