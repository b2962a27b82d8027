"""Why device-wait kernels are chained (CUDA): N layers' waiting kernels whose ids are
constants (routing that reads no hidden state, as the bench's table routers), evaluated at
once, each asking for an absent expert. With --no-chain they share no buffer, MLX's CUDA graph
may start them together, and the one mailbox loses requests (kernels give up after ~10 s).

    python scripts/device_wait_race.py [--layers 8] [--no-chain]"""
import argparse
import sys
import time

sys.path.insert(0, ".")
import mlx.core as mx
import numpy as np

from chronos_mlx import wait_kernels
from chronos_mlx.cache import _numpy_view
from chronos_mlx.device_wait import MissService
from chronos_mlx.wait_kernels import ABSENT, GAVE_UP, Mailbox


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no-chain", action="store_true", help="kernels do not read the one before them")
    args = ap.parse_args()
    if not wait_kernels.available():
        sys.exit("needs MLX's CUDA backend")
    box = Mailbox.pinned(wait_kernels.driver())
    tables = [mx.array(np.full(8, ABSENT, dtype=np.uint32)) for _ in range(args.layers)]
    mx.eval(tables)
    views = [_numpy_view(t) for t in tables]
    asked = []

    def handle(layer, ids, tag):
        asked.append(layer)
        views[layer][ids] = ids + 10

    service = MissService(box, handle)
    t0 = time.perf_counter()
    try:
        outs, after = [], None
        for i in range(args.layers):
            out = wait_kernels.wait_for_experts(mx.array([i % 8], dtype=mx.uint32), tables[i], box.box,
                                                mx.array([i], dtype=mx.uint32), after=None if args.no_chain else after)
            outs.append(out)
            after = out
        mx.eval(outs)
    finally:
        service.stop()
    right = [np.array(o).tolist() for o in outs] == [[i % 8 + 10] for i in range(args.layers)]
    print(f"{'unchained' if args.no_chain else 'chained'}: {len(asked)} of {args.layers} requests answered "
          f"(order {asked}), kernels gave up: {int(box.words[GAVE_UP]) != 0}, slots right: {right}, "
          f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
