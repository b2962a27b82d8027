"""Does chronos decode stock mlx_lm's greedy tokens on this machine? (`chronos verify --tokens`)

The test suite proves it on MLX's CPU backend. A GPU picks kernels by shape and rounds in
bfloat16, so exactness there also rests on calling MLX's kernels as stock does
(kernel_match.py), whose rules are read from one MLX version's dispatch: after an MLX
upgrade, or on a GPU nobody has checked, this runs the same comparison where the user is.

Where stock mlx_lm is not deterministic itself (measured on CUDA: a random-weight bfloat16
model whose two best logits tie exactly, and stock's own runs part at different tokens),
there is no one reference past the point where two of its runs part: stock decodes every
prompt twice, and chronos's tokens are compared with the prefix both runs share.

Stock mlx_lm loads every weight of the model, so the check refuses a model larger than the
memory this process may use (a small model of the same architecture and quantization checks
the same kernels).

Library code: nothing here prints; each finished comparison goes to a callback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .errors import ChronosError



@dataclass
class TokenCheck:
    prompt: int  # index into the report's prompts
    prompt_tokens: int
    budget: float
    routing: str
    exact: bool
    first_difference: Optional[int]  # index of the first differing token, None when exact
    tokens: int
    compared: int = -1  # tokens compared: stock's repeatable prefix (all `tokens` where stock is deterministic)

    def __post_init__(self):
        if self.compared < 0:
            self.compared = self.tokens


@dataclass
class EquivalenceReport:
    model: Path
    device: str
    dtype: str
    prompts: list
    checks: list = field(default_factory=list)
    predictor: Optional[str] = None  # attached to every chronos run (its guesses prefetched)
    # Per prompt: how many tokens two runs of stock mlx_lm agree on (all of them where it is deterministic).
    stock_repeatable: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.exact for c in self.checks)

    @property
    def stock_deterministic(self) -> bool:
        return all(c.compared == c.tokens for c in self.checks)

    def to_json(self) -> dict:
        return {"model": str(self.model), "device": self.device, "dtype": self.dtype, "ok": self.ok,
                "predictor": self.predictor, "prompts": self.prompts, "stock_repeatable": self.stock_repeatable,
                "stock_deterministic": self.stock_deterministic, "checks": [asdict(c) for c in self.checks]}


def first_difference(a: list, b: list) -> Optional[int]:
    """The index of the first token where `a` and `b` differ (a shorter one differs where it
    ends), None when they are the same."""
    first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return first


def default_prompts() -> list:
    """A short prompt and a long one (it prefills in waves at small budgets)."""
    from .workloads import read_prompts

    return ["The history of the Roman Empire begins", read_prompts("python")[0]]


def check_against_stock(
    model=None,
    *,
    budgets=(0.5, 0.125),
    routings=("optimistic",),
    prompts: Optional[list] = None,
    max_tokens: int = 16,
    dtype=None,
    on_check: Optional[Callable[[TokenCheck], None]] = None,
    memory_bytes: Optional[int] = None,
    predictor: Optional[str] = None,
) -> EquivalenceReport:
    """Greedy tokens of stock mlx_lm and of chronos at each budget and routing, per prompt.

    `memory_bytes`: what stock's full load may take (default: what this process may use now).
    `predictor`: attach it to every chronos run (predict_runtime.attach_predictor), so the
    prefetches it drives — device-wait's next-layer guesses too — are checked as well."""
    import chronos_mlx
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    from .generate import available_sync_modes, generate_step
    from .loader import compute_dtype, plan_model
    from .memory import machine_memory

    modes = available_sync_modes()
    bad = [r for r in routings if r not in modes]
    if bad:
        raise ChronosError(f"routing '{bad[0]}' cannot run here (choose from {', '.join(modes)})")
    if max_tokens < 1:
        raise ChronosError("max_tokens must be at least 1")
    plan = plan_model(model, dtype)
    info = plan.info
    if not plan.switches:
        raise ChronosError(f"{plan.path.name} has no MoE layers: chronos runs it unchanged, there is nothing to compare")
    whole = info["dense_bytes"] + info["expert_bytes_total"]
    room = machine_memory().available_bytes if memory_bytes is None else memory_bytes
    if whole > 0.8 * room:
        raise ChronosError(
            f"stock mlx_lm would hold all {whole / 2**30:.1f} GiB of {plan.path.name} in memory, and this process "
            f"may use {room / 2**30:.1f} GiB: check a smaller model of the same architecture and quantization "
            "(the same kernels), e.g. the embedded demo model"
        )
    path = plan.path
    del plan
    target = compute_dtype(dtype)
    stock, tokenizer = load(str(path))
    if target is not None:
        stock.set_dtype(target)
    texts = list(prompts) if prompts else default_prompts()
    encoded = [mx.array(tokenizer.encode(t)) for t in texts]
    wanted, repeatable = [], []
    for p in encoded:
        runs = [[int(t) for t, _ in stock_step(p, stock, max_tokens=max_tokens)] for _ in range(2)]
        parted = first_difference(*runs)
        wanted.append(runs[0])
        repeatable.append(len(runs[0]) if parted is None else parted)
    report = EquivalenceReport(path, str(mx.default_device()), info["dtype"], texts, predictor=predictor,
                               stock_repeatable=repeatable)
    del stock
    for budget in budgets:
        for routing in routings:
            cm, _, runtime = chronos_mlx.load(str(path), expert_budget=budget, dtype=dtype)
            if predictor:
                from .predict_runtime import attach_predictor

                attach_predictor(cm, runtime, predictor)
            for i, (prompt, want, n) in enumerate(zip(encoded, wanted, repeatable)):
                got = [int(t) for t, _ in generate_step(prompt, cm, runtime, max_tokens=max_tokens, sync=routing)]
                first = first_difference(got[:n], want[:n])
                check = TokenCheck(i, prompt.size, float(budget), routing, first is None, first, len(want), n)
                report.checks.append(check)
                if on_check is not None:
                    on_check(check)
            if runtime.waiter is not None:  # its thread, or the shards it holds page-locked
                runtime.waiter.close()
            del cm, runtime
    return report
