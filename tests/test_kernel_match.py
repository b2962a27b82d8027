"""kernel_match.py: part of a layer's rows goes through the kernel stock's whole call uses.

On a GPU, MLX picks a gather kernel from the call's shape and the kernels round differently
in bfloat16: prefill waves of fewer than 8 rows took CUDA's vector kernel where stock's call
took the matrix kernel, and the H200 decoded a different second token. The rules are checked
here per backend; the padded and re-flagged calls they lead to run on the CPU (where every
kernel gives the same rows) against stock mlx_lm's tokens.
"""

import mlx.core as mx
import pytest

import chronos_mlx
from chronos_mlx import kernel_match, streaming
from chronos_mlx.kernel_match import CallPlan, plan_call
from conftest import DEMO, stock_greedy


def test_on_cuda_a_part_of_a_matrix_kernel_call_is_padded_to_eight_rows():
    assert plan_call(64, True, 64, 32, "cuda") == CallPlan(True, 8)
    assert plan_call(40, True, 64, 32, "cuda") == CallPlan(False, 8)  # stock does not sort under 64 rows
    assert plan_call(6, True, 64, 32, "cuda").min_rows == 1  # stock's own call takes the vector kernel


def test_on_metal_the_sorted_kernel_is_used_only_where_stock_uses_it():
    # 128 rows against 64 experts: stock's B / E = 2 takes the vector kernel; chronos's slot
    # arrays of 16 experts would make it 8 and take the sorted one, unless not flagged sorted.
    assert plan_call(128, True, 64, 16, "metal") == CallPlan(False)
    # 512 rows: stock takes gather_qmm_rhs; every part of it must reach its thresholds too.
    assert plan_call(512, True, 64, 32, "metal") == CallPlan(True, 128)
    assert plan_call(512, True, 64, 2, "metal") == CallPlan(True, 16)


def test_unquantized_experts_and_the_cpu_only_follow_stocks_sort():
    for where in ("cuda", "metal", "cpu"):
        assert plan_call(64, False, 64, 8, where) == CallPlan(True)
        assert plan_call(63, False, 64, 8, where) == CallPlan(False)
    assert plan_call(5000, True, 64, 8, "cpu") == CallPlan(True)


def test_this_machine_is_named_by_its_default_device():
    assert kernel_match.backend() in ("cpu", "cuda", "metal")
    if mx.default_device() == mx.cpu:
        assert kernel_match.backend() == "cpu"


@pytest.mark.parametrize("where", ["cuda", "metal"])
def test_prefill_waves_called_as_a_gpu_would_still_give_stock_tokens(where, monkeypatch):
    """Waves padded (CUDA; Metal's sorted kernel) or unflagged (Metal's vector kernel) give the
    same rows: padding copies are dropped, each row keeps its own expert."""
    prompt = list(range(200, 460, 3))  # 87 tokens: far more experts per layer than 8 slots
    want_ids, want_lp = stock_greedy(DEMO, prompt, 6)
    monkeypatch.setattr(kernel_match, "backend", lambda: where)
    waves = []
    original = streaming.StreamingSwitch._padded_experts
    monkeypatch.setattr(streaming.StreamingSwitch, "_padded_experts",
                        lambda self, *a: (waves.append(1), original(self, *a))[1])
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.125)
    from chronos_mlx.generate import generate_step

    out = list(generate_step(mx.array(prompt), model, runtime, max_tokens=6))
    assert [int(t) for t, _ in out] == want_ids
    for (_, ours), theirs in zip(out, want_lp):
        assert mx.array_equal(ours, theirs)
    assert waves  # the prefill went in waves


@pytest.mark.parametrize("where,rows_called", [("cuda", 8), ("metal", 32), ("cpu", 3)])
def test_a_short_part_is_computed_padded_and_cut_back(where, rows_called, monkeypatch):
    import numpy as np

    model, _, runtime = chronos_mlx.load(None, expert_budget=0.125)  # 8 slots a layer
    switch = next(m for _, m in model.named_modules() if isinstance(m, streaming.StreamingSwitch))
    x = mx.random.normal((3, 1, model.args.hidden_size))  # rows as waves gather them
    idx = np.array([0, 2, 5])
    monkeypatch.setattr(kernel_match, "backend", lambda: where)
    calls = []
    experts = switch._experts
    object.__setattr__(switch, "_experts", lambda xs, i, total: (calls.append(xs.shape[0]), experts(xs, i, total))[1])
    got = switch._padded_experts(x, idx, 512)  # part of a 512-row call (64 tokens, top-8)
    assert calls == [rows_called]
    assert got.shape[0] == 3
    assert mx.array_equal(got, experts(x, mx.array(idx.astype(np.uint32)), 512))


def _mlx_kernel(where, M, B, E, sorted_indices):
    """Which kernel MLX 0.32's GatherQMM::eval_gpu runs for a call (transposed, affine), written
    from its dispatch independently of kernel_match's plans."""
    if where == "cuda":
        return "qmv" if M * B < 8 else "qmm"
    if M == 1 and B >= 16 and sorted_indices and B // E >= 4:
        return "qmm_rhs"
    return "qmm" if M >= 4 else "qmv"  # Metal's vector limit is at least 4


@pytest.mark.parametrize("where", ["cuda", "metal"])
@pytest.mark.parametrize("budget", [0.5, 0.125])
def test_every_expert_product_uses_the_kernel_stocks_call_would(where, budget, monkeypatch):
    """Every gather_qmm chronos makes — decode steps, prefill waves, recomputed layers — against
    the kernel stock's one call over the same layer invocation picks (M = 1, B = its rows,
    E = the model's experts, sorted from 64 rows)."""
    import numpy as np

    from chronos_mlx.generate import generate_step

    monkeypatch.setattr(kernel_match, "backend", lambda: where)
    model, _, runtime = chronos_mlx.load(None, expert_budget=budget)
    E = runtime.cache.layers[0].num_experts
    seen, total = [], [0]
    call = streaming.StreamingSwitch.__call__

    def invocation(self, x, indices):
        total[0] = indices.size
        return call(self, x, indices)

    real = mx.gather_qmm

    def gather_qmm(x, w, *args, rhs_indices=None, sorted_indices=False, **kw):
        M = x.shape[-2]
        B = int(np.prod(np.broadcast_shapes(x.shape[:-2], rhs_indices.shape)))
        seen.append((_mlx_kernel(where, M, B, w.shape[0], sorted_indices),
                     _mlx_kernel(where, 1, total[0], E, total[0] >= 64), B, total[0]))
        return real(x, w, *args, rhs_indices=rhs_indices, sorted_indices=sorted_indices, **kw)

    monkeypatch.setattr(streaming.StreamingSwitch, "__call__", invocation)
    monkeypatch.setattr(mx, "gather_qmm", gather_qmm)
    for prompt in (list(range(200, 460, 3)), [5, 17, 99]):  # waves, then a short prompt
        list(generate_step(mx.array(prompt), model, runtime, max_tokens=4))
    assert any(rows < whole for _, _, rows, whole in seen)  # some calls were parts (waves)
    assert [s[:2] for s in seen if s[0] != s[1]] == []
