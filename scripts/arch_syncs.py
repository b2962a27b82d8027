"""Host syncs per token of chronos's decode loop, architecture by architecture (issue 11).

    python scripts/arch_syncs.py [--types qwen3_moe,gpt_oss,...] [--budgets 1.0,0.5] [--tokens 24]

Writes a tiny random-weight checkpoint of each mlx-lm model type (tests/synthetic.py, windows
and chunks shorter than the text), decodes 24 tokens after a 40-token prompt at each budget with
the default routing (optimistic, segment ends chosen per step) and prints host syncs per token
and recomputations: a hybrid or sliding-window model should sync like a plain one.
"""

import argparse
import sys
import tempfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(root), str(root / "tests")]

import mlx.core as mx  # noqa: E402

import chronos_mlx  # noqa: E402
from chronos_mlx.generate import generate_step  # noqa: E402
from synthetic import write_synthetic_moe  # noqa: E402

DEFAULT = ("qwen3_moe,gpt_oss,gemma4_text,mimo_v2_flash,llama4,qwen3_next,qwen3_5_moe,kimi_linear,jamba,"
           "nemotron_h,granitemoehybrid,lfm2_moe,hunyuan,deepseek_v32,dbrx")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=DEFAULT)
    ap.add_argument("--budgets", default="1.0,0.5")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    tokenizer = chronos_mlx.load(None, expert_budget=1.0)[1]
    prompt = tokenizer.encode("The Roman Empire was one of the largest empires of the ancient world. " * 4)[:40]
    print("| model type | budget | MoE layers | host syncs/token | recomputes |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.types.split(","):
            path = write_synthetic_moe(Path(tmp) / model_type, model_type, bits=4, seed=4)
            for budget in args.budgets.split(","):
                model, _, runtime = chronos_mlx.load(path, expert_budget=float(budget))
                for _ in generate_step(mx.array(prompt), model, runtime, max_tokens=args.tokens):
                    pass
                s = runtime.stats()
                print(f"| {model_type} | {budget} | {runtime.info['moe_layers']} | "
                      f"{s['host_syncs_per_token']:.2f} | {s['recomputes']} |", flush=True)


if __name__ == "__main__":
    main()
