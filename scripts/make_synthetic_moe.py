#!/usr/bin/env python
"""Write a random-weight MoE checkpoint that mlx_lm.load() loads.

    python scripts/make_synthetic_moe.py /tmp/q3 --geometry qwen3-30b-a3b --layers 2
    python scripts/make_synthetic_moe.py /tmp/mx --model-type mixtral --layout per-expert --bits 0
"""

import argparse
import json
import sys
from pathlib import Path

# The writer is test code (tests/synthetic.py), not part of the package.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))  # chronos_mlx, when run from a checkout without installing
from synthetic import GEOMETRIES, MODEL_TYPES, write_synthetic_moe  # noqa: E402


def _parse_set(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)  # numbers, true/false, null, lists
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory")
    p.add_argument("--model-type", default="qwen3_moe", choices=MODEL_TYPES)
    p.add_argument("--geometry", default="tiny", choices=sorted(GEOMETRIES))
    p.add_argument("--layout", default="stacked", choices=["stacked", "per-expert"])
    p.add_argument("--bits", type=int, default=4, help="4 or 8; 0 for unquantized")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=None, help="reduce the layer count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config.json key (value parsed as JSON if it can be)",
    )
    a = p.parse_args(argv)
    try:
        out = write_synthetic_moe(
            a.out,
            a.model_type,
            layout=a.layout,
            bits=a.bits or None,
            group_size=a.group_size,
            dtype=a.dtype,
            geometry=a.geometry,
            num_layers=a.layers,
            overrides=_parse_set(a.set),
            seed=a.seed,
            max_shard_bytes=int(a.max_shard_gb * 1024**3),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    print(f"{out}  total_bytes={meta['total_size']}  expert_bytes={meta['expert_size']}")


if __name__ == "__main__":
    main()
