"""The kernels of device-wait routing (wait_kernels.py): they compile, and on CUDA they map
resident ids without asking and ask the host for an absent one.

Without a GPU the sources are compiled with NVRTC (the `nvidia-cuda-nvrtc` wheel of the test
extra) wrapped the way `mx.fast.cuda_kernel` wraps them; the protocol itself is exercised with
the host in the kernels' place in tests/test_device_wait.py.
"""

import mlx.core as mx
import numpy as np
import pytest

from chronos_mlx import wait_kernels
from chronos_mlx.device_wait import MissService
from chronos_mlx.wait_kernels import ABSENT, Mailbox

cuda = pytest.mark.skipif(not wait_kernels.available(), reason="needs MLX's CUDA backend")


def _nvrtc():
    """NVRTC from the `nvidia-cuda-nvrtc` wheel (test extra on Linux), or None."""
    import ctypes
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        for lib in sorted(Path(root).glob("*/lib/libnvrtc.so*")):
            if "builtins" not in lib.name:
                return ctypes.CDLL(str(lib))
    return None


def _compile_like_mlx(nvrtc, name, inputs, outputs, consts, body):
    """Compile `body` wrapped as `mx.fast.cuda_kernel` wraps it (signature from the inputs and
    outputs, template arguments as constants) for a Hopper GPU; returns NVRTC's log or ''."""
    import ctypes

    src = ("typedef unsigned int uint32_t; typedef unsigned long long uint64_t;\n"
           "namespace mlx { namespace core { namespace cu {\n"
           f"__global__ void {name}(" + ", ".join([f"const {t}* {n}" for t, n in inputs] + [f"{t}* {n}" for t, n in outputs])
           + ") {\n" + "".join(f"  constexpr int {k} = {v};\n" for k, v in consts) + body + "\n}\n}}}\n")
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * 2)(b"--gpu-architecture=compute_90", b"-std=c++17")
    rc = nvrtc.nvrtcCompileProgram(prog, 2, opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return log.value.decode() if rc else ""


def test_the_shipped_kernels_compile_for_a_hopper_gpu():
    """The CUDA sources compile (NVRTC, sm_90) before any device sees them."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC not installed (the test extra installs it on Linux)")
    ids = [("uint64_t" if name == "box" else "uint32_t", name) for name in wait_kernels.INPUTS]
    for name, inputs, outputs, consts, body in [
        ("wait", ids, [("uint32_t", "slots")], [("N", 8), ("ALWAYS", 0), ("G", 0)], wait_kernels.kernel_source("wait")),
        ("pull", ids, [("uint32_t", "slots"), ("uint64_t", "plan")],
         [("N", 8), ("ALWAYS", 0), ("G", 16), ("MAXC", 128), ("POSTS", 0), ("MAXP", 0)], wait_kernels.kernel_source("pull")),
        ("pull_posts", ids, [("uint32_t", "slots"), ("uint64_t", "plan")],
         [("N", 8), ("ALWAYS", 0), ("G", 16), ("MAXC", 128), ("POSTS", 1), ("MAXP", 128)], wait_kernels.kernel_source("pull")),
        ("copy", [("uint64_t", "plan"), ("uint32_t", "slots")], [("uint32_t", "out")], [("N", 8), ("UNROLL", 1)],
         wait_kernels._PULL_COPY),
        ("copy_unrolled", [("uint64_t", "plan"), ("uint32_t", "slots")], [("uint32_t", "out")], [("N", 8), ("UNROLL", 4)],
         wait_kernels._PULL_COPY),
    ]:
        assert _compile_like_mlx(nvrtc, name, inputs, outputs, consts, body) == "", name


def test_the_copy_kernels_grid_can_be_set_from_the_environment(monkeypatch):
    assert wait_kernels.pull_grid() == (wait_kernels.PULL_BLOCKS, wait_kernels.PULL_THREADS, wait_kernels.PULL_UNROLL)
    monkeypatch.setenv("CHRONOS_PULL_GRID", "264x512x4")
    assert wait_kernels.pull_grid() == (264, 512, 4)
    monkeypatch.setenv("CHRONOS_PULL_GRID", "lots")
    with pytest.raises(ValueError, match="BLOCKSxTHREADSxUNROLL"):
        wait_kernels.pull_grid()


@cuda
def test_pulled_copies_land_whole_whatever_the_grid():
    """Tensors of odd sizes and alignments, copied by the kernel from page-locked memory."""
    from chronos_mlx.cache import _numpy_view

    staging = wait_kernels.pinned_alloc(wait_kernels.driver())(1 << 20)
    staging[:] = np.random.default_rng(0).integers(0, 256, staging.size, dtype=np.uint8)
    for grid in [(64, 256, 1), (132, 512, 4), (1, 32, 8)]:
        dest = mx.zeros((1 << 18,), dtype=mx.uint32)
        mx.eval(dest)
        view = _numpy_view(dest).view(np.uint8)
        pieces = [(0, 0, 300_000), (300_000, 300_016, 4099), (400_003, 500_001, 77)]
        plan = [len(pieces)] + [x for s, d, n in pieces for x in (staging.ctypes.data + s, view.ctypes.data + d, n)]
        out = wait_kernels.pull_copies(mx.array(np.array(plan, dtype=np.uint64)), mx.array([5, 6], dtype=mx.uint32), grid)
        assert np.array(out).tolist() == [5, 6]
        got = np.array(dest).view(np.uint8)
        for s, d, n in pieces:
            assert np.array_equal(got[d : d + n], staging[s : s + n]), (grid, s, d, n)


@cuda
def test_the_kernel_maps_resident_ids_without_asking():
    box = Mailbox.pinned(wait_kernels.driver())
    table = mx.array(np.array([ABSENT, 4, 9, ABSENT, 1], dtype=np.uint32))
    out = wait_kernels.wait_for_experts(mx.array([[1, 2, 4]], dtype=mx.uint32), table, box.box, mx.array([0], dtype=mx.uint32))
    assert np.array(out).tolist() == [[4, 9, 1]]
    assert int(box.words[wait_kernels.PUB]) == 0


@cuda
def test_the_kernel_asks_for_an_absent_id_and_reads_the_table_the_host_wrote():
    from chronos_mlx.cache import _numpy_view

    box = Mailbox.pinned(wait_kernels.driver())
    table = mx.array(np.array([ABSENT, 4, 9, ABSENT, 1], dtype=np.uint32))
    mx.eval(table)
    view = _numpy_view(table)
    asked = []

    def handle(layer, ids, tag):
        asked.append((layer, ids.tolist()))
        view[3] = 7  # managed memory: the host may write it while the kernel waits

    service = MissService(box, handle)
    try:
        out = wait_kernels.wait_for_experts(mx.array([[3, 1]], dtype=mx.uint32), table, box.box, mx.array([6], dtype=mx.uint32))
        assert np.array(out).tolist() == [[7, 4]]
    finally:
        service.stop()
    assert asked == [(6, [3, 1])]


@cuda
def test_kernels_that_share_no_buffer_still_ask_one_at_a_time():
    """Eight layers whose ids are constants (routing that reads no hidden state, like the
    bench's tables): MLX's CUDA graph would start all eight kernels at once, and with one
    mailbox requests would be lost. Each reads the one before it (`after`): every request
    is answered, in order, and no kernel gives up."""
    got = wait_kernels.ask_in_turn(8, chain=True)
    assert got["asked"] == list(range(8))
    assert not got["gave_up"]
    assert got["slots_right"]


@cuda
def test_a_kernel_takes_the_post_for_its_pass_and_layer_and_no_other():
    """A post (the layer's new table and a copy from page-locked staging) left for pass 5,
    layer 2: that kernel takes it without asking — TAKEN names it, the copy is made, the slot
    read from the new table — while the same layer's kernel of pass 6 leaves it alone."""
    from chronos_mlx.cache import _numpy_view

    lib = wait_kernels.driver()
    box = Mailbox.pinned(lib)
    staging = wait_kernels.pinned_alloc(lib)(64)
    staging[:16] = np.arange(16, dtype=np.uint8) + 100
    slots = mx.zeros((4, 16), dtype=mx.uint8)
    table = mx.array(np.array([ABSENT, 0, ABSENT, ABSENT], dtype=np.uint32))
    mx.eval(slots, table)
    from chronos_mlx.upload import slot_address

    dst = slot_address(_numpy_view(slots)) + 3 * 16
    new_table = np.array([ABSENT, 0, 3, ABSENT], dtype=np.uint32)
    pid = wait_kernels.post_id(5, 2)
    box.post(pid, new_table, [(staging.ctypes.data, dst, 16)])
    layer, ids = mx.array([2], dtype=mx.uint32), mx.array([2, 1], dtype=mx.uint32)
    other = wait_kernels.wait_for_experts(ids[1:], table, box.box, layer, mx.array([6], dtype=mx.uint32), pull=True,
                                          posts=True)
    assert np.array(other).tolist() == [0] and int(box.words[wait_kernels.TAKEN]) != pid
    out = wait_kernels.wait_for_experts(ids, table, box.box, layer, mx.array([5], dtype=mx.uint32), pull=True,
                                        posts=True, after=other)
    assert np.array(out).tolist() == [3, 0]
    assert int(box.words[wait_kernels.PUB]) == 0  # nobody asked
    assert box.take_back_post(pid)
    assert np.array(slots)[3].tolist() == list(range(100, 116))
    assert np.array(table).tolist() == new_table.tolist()
    box.close()
