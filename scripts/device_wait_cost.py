"""What a device that waits for the host costs, against one that the host waits for (issue 12, CUDA).

    python scripts/device_wait_cost.py [--model DIR] [--rounds 5] [--max-tokens 48] [--json OUT]

Stock mlx_lm's model and decode loop, the whole model resident, with one change per
configuration inside every MoE layer, just before its experts are computed:
- stock: none;
- remap: the ids go through a device table (`table[ids]`), as optimistic routing does;
- wait, resident: the ids go through `device_wait.wait_for_experts` with every expert in its
  table: the kernel finds them all resident and never asks the host;
- wait, ask every layer: the same kernel made to ask the host at every MoE layer; a service
  thread answers at once (a miss's round trip without its loads);
- host read: the ids read back to the host (`np.array`) and remapped, as per-layer routing does.
Tokens are stock's in every configuration. Round-robin; medians of ms/token and of each round's
ratio to stock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

CONFIGS = ("stock", "remap", "wait, resident", "wait, ask every layer", "host read")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval while decoding (seconds; Python's default 0.005)")
    ap.add_argument("--json", help="write the per-round ms/token here")
    args = ap.parse_args()

    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    from chronos_mlx import device_wait
    from chronos_mlx.loader import compute_dtype, resolve_model_path
    from chronos_mlx.upload import device_upload

    if not device_wait.available():
        sys.exit("needs MLX's CUDA backend")
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    model, _ = load(str(resolve_model_path(args.model)))
    target = compute_dtype(None)
    if target is not None:
        model.set_dtype(target)
    mx.eval(model.parameters())
    lib = device_wait.driver()
    upload = device_upload()
    box = device_wait.Mailbox.pinned(lib)
    service = device_wait.MissService(box, lambda layer, ids, tag: None)
    mode = {"v": 0}
    tables, layer_ids = {}, {}

    def wrap(cls):
        original = cls.__call__

        def call(self, x, indices):
            v = CONFIGS[mode["v"]]
            if v == "stock":
                return original(self, x, indices)
            n = self.num_experts if hasattr(self, "num_experts") else 512
            if n not in tables:
                tables[n] = mx.arange(n).astype(mx.uint32)
                mx.eval(tables[n])
            if id(self) not in layer_ids:
                layer_ids[id(self)] = mx.array([len(layer_ids)], dtype=mx.uint32)
            if v == "remap":
                indices = tables[n][indices]
            elif v.startswith("wait"):
                indices = device_wait.wait_for_experts(indices, tables[n], box.box, layer_ids[id(self)],
                                                       always=v.endswith("every layer"))
            else:
                mx.async_eval(indices)
                np.array(indices)
                indices = tables[n][indices]
            return original(self, x, indices)

        cls.__call__ = call

    for cls in (SwitchGLU, SwitchMLP):
        wrap(cls)
    stream = mx.new_stream(mx.default_device())

    def step(tok, cache):
        with mx.stream(stream):
            return mx.argmax(model(tok[None], cache=cache)[:, -1, :], axis=-1)

    def decode(n: int):
        """ms per token and the tokens, mlx_lm's pipelining."""
        cache = make_prompt_cache(model)
        with mx.stream(stream):
            mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))
        nxt = step(mx.array([5]), cache)
        mx.async_eval(nxt)
        toks = []
        t0 = time.perf_counter()
        for _ in range(n):
            after = step(nxt, cache)
            mx.async_eval(after)
            toks.append(nxt.item())
            nxt = after
        nxt.item()
        return (time.perf_counter() - t0) / n * 1e3, toks

    times = {k: [] for k in CONFIGS}
    tokens = {}
    for i, k in enumerate(CONFIGS):  # warm-up
        mode["v"] = i
        decode(4)
    for _ in range(args.rounds):
        for i, k in enumerate(CONFIGS):
            mode["v"] = i
            ms, toks = decode(args.max_tokens)
            times[k].append(ms)
            tokens.setdefault(k, toks)
    requests = service.requests
    service.stop()
    same = {k: tokens[k] == tokens["stock"] for k in CONFIGS}
    for k in CONFIGS:
        ratio = statistics.median(a / b for a, b in zip(times["stock"], times[k]))
        print(f"{k:>22}: {statistics.median(times[k]):7.2f} ms/token   ratio to stock {ratio:.3f}   "
              f"stock tokens: {same[k]}")
    print(f"requests answered: {requests}; kernels that gave up: {int(box.words[device_wait.GAVE_UP])}")
    if service.error:
        print(f"service error: {service.error!r}")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"device": str(mx.default_device()), "rounds": args.rounds,
                                               "max_tokens": args.max_tokens, "switch_interval": args.switch_interval,
                                               "ms_per_token": times, "stock_tokens": same,
                                               "requests": requests}, indent=1))


if __name__ == "__main__":
    main()
