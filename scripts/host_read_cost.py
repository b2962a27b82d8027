"""What reading a MoE layer's routing back to the host costs stock mlx_lm itself (issue 12).

    python scripts/host_read_cost.py [--model DIR] [--rounds 5] [--max-tokens 48] [--json OUT]

Stock mlx_lm's model and decode loop (the next token's graph built and started before the
current one is read), the whole model resident, with one change per configuration inside every
MoE layer, just before its experts are computed:
- stock: none;
- async_eval: the router's expert ids are started (`mx.async_eval`);
- host read: ... and read back to the host (`np.array`), as per-layer routing must;
- host read + remap: ... and remapped through a device table (`table[ids]`), as chronos does.
Nothing is loaded and the tokens are stock's: the differences are the cost of knowing the routing,
on this backend. Round-robin over the configurations; medians of ms/token and of each round's
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

CONFIGS = ("stock", "async_eval", "host read", "host read + remap")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", help="write the per-round ms/token here")
    args = ap.parse_args()

    from mlx_lm import load

    from chronos_mlx.loader import compute_dtype, resolve_model_path

    model, _ = load(str(resolve_model_path(args.model)))
    target = compute_dtype(None)
    if target is not None:
        model.set_dtype(target)
    mx.eval(model.parameters())
    mode = {"v": 0}
    tables = {}

    def change(module, indices):
        v = mode["v"]
        if v >= 1:
            mx.async_eval(indices)
        if v >= 2:
            np.array(indices)
        if v == 3:
            n = module.num_experts if hasattr(module, "num_experts") else int(indices.max().item()) + 1
            if n not in tables:
                tables[n] = mx.arange(n).astype(mx.uint32)
                mx.eval(tables[n])
            indices = tables[n][indices]
        return indices

    from stock_loop import patch_switches, stock_decoder

    patch_switches(change)

    decode_with_tokens = stock_decoder(model)

    def decode(n: int) -> float:
        return decode_with_tokens(n)[0]

    times = {k: [] for k in CONFIGS}
    for i, k in enumerate(CONFIGS):  # warm-up
        mode["v"] = i
        decode(4)
    for _ in range(args.rounds):
        for i, k in enumerate(CONFIGS):
            mode["v"] = i
            times[k].append(decode(args.max_tokens))
    for k in CONFIGS:
        ratio = statistics.median(a / b for a, b in zip(times["stock"], times[k]))
        print(f"{k:>18}: {statistics.median(times[k]):6.2f} ms/token   ratio to stock {ratio:.3f}")
    save_json(args.json, {"device": str(mx.default_device()), "rounds": args.rounds,
              "max_tokens": args.max_tokens, "ms_per_token": times}, indent=1)


if __name__ == "__main__":
    main()
