"""Calling MLX's gather kernels on part of a layer's rows the way stock calls them on all.

mlx_lm's SwitchGLU / SwitchMLP compute every (token, expert) row of a MoE layer in one
`gather_qmm` / `gather_mm` call. chronos sometimes computes them in parts (waves: a prefill
that needs more experts than the layer has slots) and always against slot arrays that hold
fewer experts than the model. MLX picks a kernel per call from its shape, and on a GPU the
kernels round differently in bfloat16 / float16: a row is exact only if it goes through the
kernel stock's whole call would have used. Rows are independent within any one kernel.

The rules mirror MLX's dispatch (`GatherQMM::eval_gpu` / `GatherMM::eval_gpu`, MLX 0.32):
- CUDA, quantized: the vector kernel when M * B < 8 rows, the matrix kernel otherwise. A part
  of a call of 8 rows or more is padded to 8 rows.
- Metal, quantized: the sorted matrix kernel (`gather_qmm_rhs`) when the indices are sorted,
  B >= 16 and B / E >= 4 (E: experts in the weight array — the model's for stock, the slots'
  for chronos), else the vector kernel. chronos passes `sorted_indices` only where stock's call
  takes that kernel, and pads each part to reach its thresholds.
- Unquantized (`gather_mm`, both GPUs): sorted indices with M == 1 take the grouped kernel,
  whatever B; unsorted take the vector kernel. Only the sort flag has to match.
- CPU: every kernel gives the same rows; the flag follows stock's.
Found on an H200 (session 12): prefill waves of fewer than 8 rows took the vector kernel, and
the next token differed from stock's.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

SORT_AT = 64  # mlx_lm's SwitchGLU / SwitchMLP sort the rows by expert from this many on


@dataclass(frozen=True)
class CallPlan:
    sorted_indices: bool  # what to pass to gather_(q)mm (rows already in expert order)
    min_rows: int = 1  # a call with fewer rows is padded with copies of its last row


def backend() -> str:
    """'cuda', 'metal' or 'cpu': where the default device's kernels come from."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def plan_call(total_rows: int, quantized: bool, num_experts: int, num_slots: int, where: str | None = None) -> CallPlan:
    """How to compute part of (or all) `total_rows` rows of one layer call against slot arrays
    of `num_slots` experts so each row goes through the kernel stock's call over all of them,
    against `num_experts` experts, uses. `where`: a backend() name (default: this one)."""
    where = where or backend()
    stock_sorted = total_rows >= SORT_AT
    if not quantized or where == "cpu":
        return CallPlan(stock_sorted)
    if where == "cuda":
        return CallPlan(stock_sorted, 8 if total_rows >= 8 else 1)
    # Metal: stock takes gather_qmm_rhs only with its own (larger) expert count.
    rhs = stock_sorted and total_rows >= 16 and total_rows // num_experts >= 4
    return CallPlan(True, max(16, 4 * num_slots)) if rhs else CallPlan(False)
