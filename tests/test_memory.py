"""Loading never materialises the experts: peak RSS stays near dense weights + budget."""

import json
import subprocess
import sys

import pytest

from synthetic import write_synthetic_moe

PROBE = r"""
import json, sys, resource
import mlx.core as mx
import chronos_mlx
from chronos_mlx.generate import generate_step
model, tok, runtime = chronos_mlx.load(sys.argv[1], expert_budget=sys.argv[2])
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
list(generate_step(mx.array(list(range(1, 40))), model, runtime, max_tokens=4))
info = runtime.info
print(json.dumps({"after_load": after_load,
                  "after_generate": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "experts": info["expert_bytes_total"], "budget": info["expert_budget_bytes"],
                  "dense": info["dense_bytes"]}))
"""

BASELINE = r"""
import resource, mlx.core as mx, mlx_lm, chronos_mlx
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    # 8 layers x 32 experts of 3 x 1024 x 2048 4-bit weights: ~430 MB of experts on disk.
    return write_synthetic_moe(
        tmp_path_factory.mktemp("big") / "m",
        "qwen3_moe",
        bits=4,
        geometry={"hidden_size": 1024, "moe_intermediate_size": 2048, "num_experts": 32,
                  "top_k": 2, "num_layers": 8},
    )


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units checked on Linux")
def test_load_at_budget_0_1_keeps_peak_rss_far_below_the_experts(big_experts):
    base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(big_experts), "0.1"], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["experts"] > 400e6
    allowed = base + m["dense"] + m["budget"] + 64e6  # interpreter + dense + slots + slack
    assert m["after_load"] < allowed, m
    assert m["after_generate"] < allowed + 32e6, m
    assert m["after_generate"] < base + 0.35 * m["experts"], m
