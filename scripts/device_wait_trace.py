"""Where does the service thread spend a device-wait request? (CUDA; prints as it goes.)

Decodes a few tokens of the demo model with device-wait routing, timing every request the
service handles; a watchdog prints the service thread's stack whenever one request has run
for longer than --stall seconds. --prealloc allocates the page-locked staging on the main
thread before the first step (a driver allocation inside a request may wait for the device).
  python scripts/device_wait_trace.py [--model DIR] --budget 0.5 --tokens 4 [--prealloc] [--limit-s 2]
                                      [--routing trained] [--quiet] [--profile]
--quiet prints no line a request (printing delays the answer) but their median and spread;
--profile runs the service thread's requests under cProfile and prints where they spent it."""
import argparse
import cProfile
import faulthandler
import pstats
import sys
import threading
import time
import traceback

sys.path.insert(0, ".")
import mlx.core as mx

import chronos_mlx
from chronos_mlx import wait_kernels
from chronos_mlx.generate import generate_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a checkpoint (default: the demo)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--stall", type=float, default=0.5)
    ap.add_argument("--limit-s", type=float, default=2.0, help="a kernel gives up after about this long")
    ap.add_argument("--prealloc", action="store_true")
    ap.add_argument("--routing", choices=["model", "trained"], default="model",
                    help="trained: replay a python text with trained-like routing (as bench_sync.py --routing trained)")
    ap.add_argument("--quiet", action="store_true", help="no line a request: their median and spread at the end")
    ap.add_argument("--profile", action="store_true", help="cProfile the service thread's requests")
    ap.add_argument("--read-threads", type=int, default=None, help="reads in flight for one batch (default: the reader's)")
    ap.add_argument("--switch-ms", type=float, default=None, help="Python's thread switch interval (default 5 ms)")
    ap.add_argument("--min-kb", type=int, default=None, help="KiB a reader thread must have before a batch is split")
    args = ap.parse_args()
    wait_kernels.WAIT_LIMIT_CYCLES = int(args.limit_s * 2e9)
    model, tok, rt = chronos_mlx.load(args.model, expert_budget=args.budget, dtype="bfloat16")
    prompt = mx.array(tok.encode("def fibonacci(n):\n    "))
    kw = {}
    if args.routing == "trained":  # the bench's case: forced text, routers replaced by a table
        from chronos_mlx.bench_routing import replay_one_text

        ids, decoding = replay_one_text(model, args.model, rt.info, max_tokens=args.tokens)
        prompt, kw = mx.array(ids), decoding()
        print(f"trained routing, {len(ids)}-token prompt", flush=True)
    from chronos_mlx import device_wait

    if args.switch_ms:
        sys.setswitchinterval(args.switch_ms / 1e3)
    reader = rt.cache.reader
    reader.threads = args.read_threads or reader.threads
    reader.min_bytes_per_thread = (args.min_kb << 10) if args.min_kb else reader.min_bytes_per_thread
    from chronos_mlx import lio

    print(f"reads: up to {reader.threads} in flight, split from {reader.min_bytes_per_thread >> 10} KiB each, "
          f"{'one lio_listio call' if lio.available() else 'Python threads'}", flush=True)
    rt.waiter = device_wait.DeviceWaiter(rt)
    if args.prealloc:
        rt.waiter.pull.staging(1)
        rt.waiter.pull.take()
        print("staging allocated on the main thread", flush=True)
    svc = rt.waiter.service
    inner = rt.waiter._handle
    state = {"t": None, "n": 0, "times": []}
    prof = cProfile.Profile() if args.profile else None

    def timed(layer, ids, tag):
        # Re-armed at every request (after MLX's compile): fires only when requests stop.
        # faulthandler's watchdog is a C thread: it dumps even while one thread holds Python's lock.
        faulthandler.dump_traceback_later(args.limit_s * 0.75, exit=False)
        state["t"] = time.perf_counter()
        if prof is not None:
            prof.enable()
        try:
            inner(layer, ids, tag)
        finally:
            if prof is not None:
                prof.disable()
            dt = time.perf_counter() - state["t"]
            state["t"] = None
            state["n"] += 1
            state["times"].append(dt)
            if not args.quiet:
                print(f"request {state['n']} at {time.perf_counter() - t_start:.3f} s: layer {layer}, tag {tag}, "
                      f"{len(set(ids.tolist()))} ids, {dt * 1e3:.1f} ms, words[:8] {words[:8].tolist()}", flush=True)

    svc._handle = timed

    words = rt.waiter.mailbox.words
    t_start = time.perf_counter()

    def watchdog():
        printed = None
        gave_up = int(words[4])
        while True:
            time.sleep(0.002)
            if int(words[4]) != gave_up:
                gave_up = int(words[4])
                print(f"--- a kernel gave up at {time.perf_counter() - t_start:.3f} s; words[:8] {words[:8].tolist()}", flush=True)
                for ident, frame in sys._current_frames().items():
                    print(f"thread {ident}:", "".join(traceback.format_stack(frame)[-4:]), flush=True)
            t = state["t"]
            if t is not None and time.perf_counter() - t > args.stall and printed != t:
                printed = t
                frame = sys._current_frames().get(svc._thread.ident)
                print(f"--- service stuck {time.perf_counter() - t:.2f} s in:", flush=True)
                print("".join(traceback.format_stack(frame)), flush=True)

    threading.Thread(target=watchdog, daemon=True).start()
    t0 = time.perf_counter()
    try:
        for i, (t, _) in enumerate(generate_step(prompt, model, rt, max_tokens=args.tokens, sync="device-wait", **kw)):
            faulthandler.cancel_dump_traceback_later()
            print(f"token {i}: {int(t)} at {time.perf_counter() - t0:.2f} s", flush=True)
            faulthandler.dump_traceback_later(args.limit_s * 0.75, exit=False)
    except Exception as e:  # noqa: BLE001
        print("FAILED:", type(e).__name__, e, flush=True)
    faulthandler.cancel_dump_traceback_later()
    print("requests", state["n"], "stats", {k: v for k, v in rt.stats().items() if "wait" in k or "sync" in k}, flush=True)
    times = sorted(state["times"][len(state["times"]) // 4 :])  # past the first quarter (compiles)
    if times:
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3
        print(f"request time, last {len(times)}: median {q(0.5):.2f} ms, p10 {q(0.1):.2f}, p90 {q(0.9):.2f}, "
              f"max {times[-1] * 1e3:.2f}", flush=True)
    if prof is not None:
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(25)
    rt.waiter.close()


if __name__ == "__main__":
    main()
