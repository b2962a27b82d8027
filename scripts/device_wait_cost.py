"""What a device that waits for the host costs, against one that the host waits for (issue 12, CUDA).

    python scripts/device_wait_cost.py [--model DIR] [--rounds 5] [--max-tokens 48] [--json OUT]

Stock mlx_lm's model and decode loop, the whole model resident, with one change per
configuration inside every MoE layer, just before its experts are computed:
- stock: none;
- remap: the ids go through a device table (`table[ids]`), as optimistic routing does;
- wait, resident: the ids go through `wait_kernels.wait_for_experts` with every expert in its
  table: the kernel finds them all resident and never asks the host;
- wait, ask every layer: the same kernel made to ask the host at every MoE layer; a service
  thread answers at once (a miss's round trip without its loads);
- wait, load every layer (with --load-mb M): as the last, and the service thread reads M MB
  from the model's shards (page cache) into a managed-memory slab from the host, as device-wait
  routing loads an expert, and the layer's experts wait for the GPU to read that slab back (a
  miss at every layer with its load, host write and fault-back included);
- host read: the ids read back to the host (`np.array`) and remapped, as per-layer routing does.
Tokens are stock's in every configuration. Round-robin; medians of ms/token and of each round's
ratio to stock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from results import save_json  # noqa: E402

CONFIGS = ("stock", "remap", "wait, resident", "wait, ask every layer", "wait, load every layer", "host read")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval while decoding (seconds; Python's default 0.005)")
    ap.add_argument("--load-mb", type=float, default=2.65,
                    help="MB the service reads per request in 'wait, load every layer' (0: leave that configuration out)")
    ap.add_argument("--poll-us", type=float, default=20.0,
                    help="the service's sleep between looks at the mailbox (0: yield the core instead)")
    ap.add_argument("--host-stand-in", action="store_true",
                    help="the host in the kernel's place (any backend: checks this script, measures nothing useful)")
    ap.add_argument("--json", help="write the per-round ms/token here")
    args = ap.parse_args()

    from mlx_lm import load

    from chronos_mlx import device_wait, wait_kernels
    from chronos_mlx.loader import compute_dtype, resolve_model_path

    if not (wait_kernels.available() or args.host_stand_in):
        sys.exit("needs MLX's CUDA backend (or --host-stand-in)")
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    model, _ = load(str(resolve_model_path(args.model)))
    target = compute_dtype(None)
    if target is not None:
        model.set_dtype(target)
    mx.eval(model.parameters())
    box = wait_kernels.Mailbox.host() if args.host_stand_in else wait_kernels.Mailbox.pinned(wait_kernels.driver())
    wait_for_experts = wait_kernels.host_kernel(box) if args.host_stand_in else wait_kernels.wait_for_experts
    import os

    from chronos_mlx.cache import _numpy_view

    configs = [c for c in CONFIGS if args.load_mb > 0 or c != "wait, load every layer"]
    nbytes = int(args.load_mb * 1e6)
    slab = mx.zeros((max(nbytes, 1),), dtype=mx.uint8)
    mx.eval(slab)
    slab_view = _numpy_view(slab)
    shard = sorted(resolve_model_path(args.model).glob("*.safetensors"))[0]
    fd = os.open(shard, os.O_RDONLY)
    span = max(os.fstat(fd).st_size - nbytes, 1)
    loads = {"n": 0}

    def handle(layer, ids, tag):
        if CONFIGS[mode["v"]] == "wait, load every layer":
            off = (loads["n"] * nbytes) % span // 4096 * 4096
            os.preadv(fd, [memoryview(slab_view)[:nbytes]], off)
            loads["n"] += 1

    service = device_wait.MissService(box, handle, poll_s=args.poll_us * 1e-6)
    mode = {"v": 0}
    tables, layer_ids = {}, {}

    def change(module, indices):
        v = CONFIGS[mode["v"]]
        if v == "stock":
            return indices
        n = module.num_experts if hasattr(module, "num_experts") else 512
        if n not in tables:
            tables[n] = mx.arange(n).astype(mx.uint32)
            mx.eval(tables[n])
        if id(module) not in layer_ids:
            layer_ids[id(module)] = mx.array([len(layer_ids)], dtype=mx.uint32)
        if v == "remap":
            return tables[n][indices]
        if v.startswith("wait"):
            indices = wait_for_experts(indices, tables[n], box.box, layer_ids[id(module)],
                                       always=v.endswith("every layer"))
            if v == "wait, load every layer":  # the GPU reads the slab after the load, before the experts
                touched = mx.depends(slab, indices).sum()
                indices = mx.depends(indices, touched)
            return indices
        mx.async_eval(indices)
        np.array(indices)
        return tables[n][indices]

    from stock_loop import patch_switches, stock_decoder

    patch_switches(change)

    decode = stock_decoder(model)

    times = {k: [] for k in configs}
    tokens = {}
    for k in configs:  # warm-up
        mode["v"] = CONFIGS.index(k)
        decode(4)
    for _ in range(args.rounds):
        for k in configs:
            mode["v"] = CONFIGS.index(k)
            ms, toks = decode(args.max_tokens)
            times[k].append(ms)
            tokens.setdefault(k, toks)
    requests = service.requests
    service.stop()
    same = {k: tokens[k] == tokens["stock"] for k in configs}
    for k in configs:
        ratio = statistics.median(a / b for a, b in zip(times["stock"], times[k]))
        print(f"{k:>22}: {statistics.median(times[k]):7.2f} ms/token   ratio to stock {ratio:.3f}   "
              f"stock tokens: {same[k]}")
    print(f"requests answered: {requests} ({loads['n']} with a {args.load_mb:g} MB load); "
          f"kernels that gave up: {int(box.words[wait_kernels.GAVE_UP])}")
    if service.error:
        print(f"service error: {service.error!r}")
    save_json(args.json, {"device": str(mx.default_device()), "rounds": args.rounds,
              "max_tokens": args.max_tokens, "switch_interval": args.switch_interval,
              "load_mb": args.load_mb, "poll_us": args.poll_us, "ms_per_token": times, "stock_tokens": same,
              "requests": requests}, indent=1)


if __name__ == "__main__":
    main()
