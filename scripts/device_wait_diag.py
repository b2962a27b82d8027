"""Quick check of device_wait's kernel and service on CUDA (prints as it goes)."""
import sys, time
sys.path.insert(0, ".")
import mlx.core as mx
import numpy as np
from chronos_mlx import device_wait, wait_kernels
from chronos_mlx.upload import device_upload

def p(*a):
    print(*a, flush=True)

wait_kernels.WAIT_LIMIT_CYCLES = 2_000_000_000
lib = wait_kernels.driver()
up = device_upload()
box = wait_kernels.Mailbox.pinned(lib)
p("mailbox", hex(box.device_address))
table = mx.arange(128).astype(mx.uint32)
lay = mx.array([3], dtype=mx.uint32)
ids = mx.array([[5, 9, 77, 100]], dtype=mx.uint32)
t0 = time.perf_counter()
out = wait_kernels.wait_for_experts(ids, table, box.box, lay)
mx.eval(out)
p("resident:", np.array(out).tolist(), "%.3f s" % (time.perf_counter() - t0), "words", box.words[:5].tolist())
seen = []
def handle(layer, got, tag):
    seen.append((layer, got.tolist()))
svc = device_wait.MissService(box, handle)
time.sleep(0.5)
p("service error after start:", svc.error)
t0 = time.perf_counter()
out = wait_kernels.wait_for_experts(ids, table, box.box, lay, always=True)
mx.eval(out)
p("always, eval:", np.array(out).tolist(), "%.3f s" % (time.perf_counter() - t0), "words", box.words[:5].tolist(), "seen", seen, "err", svc.error)
# many in a row, one eval
t0 = time.perf_counter()
x = ids
for i in range(48):
    x = wait_kernels.wait_for_experts(x, table, box.box, lay, always=True)
mx.eval(x)
dt = time.perf_counter() - t0
p("48 asks in one graph: %.2f ms" % (dt * 1e3), "requests", svc.requests, "gave up", int(box.words[4]))
# async_eval then busy python
t0 = time.perf_counter()
x = ids
for i in range(48):
    x = wait_kernels.wait_for_experts(x, table, box.box, lay, always=True)
mx.async_eval(x)
s = 0
for i in range(200000):
    s += i
mx.eval(x)
p("48 asks, async_eval + busy python: %.2f ms" % ((time.perf_counter() - t0) * 1e3), "requests", svc.requests, "gave up", int(box.words[4]))
for si in (0.005, 0.0002):
    sys.setswitchinterval(si)
    t0 = time.perf_counter()
    x = ids
    for i in range(48):
        x = wait_kernels.wait_for_experts(x, table, box.box, lay, always=True)
    mx.async_eval(x)
    t1 = time.perf_counter()
    s = 0
    while time.perf_counter() - t1 < 0.05:
        s += 1
    mx.eval(x)
    p("switchinterval", si, "48 asks with 50 ms busy python after: %.2f ms" % ((time.perf_counter() - t0) * 1e3), "gave up", int(box.words[4]))
svc.stop()
p("stopped; error", svc.error)
