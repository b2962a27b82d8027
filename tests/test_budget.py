"""Expert budgets: bytes with units or fractions, and a clear error when too small."""

import pytest

from chronos_mlx.budget import parse_budget, slots_for_budget
from chronos_mlx.errors import BudgetError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.25", ("fraction", 0.25)),
        (0.5, ("fraction", 0.5)),
        ("1", ("fraction", 1.0)),
        ("25%", ("fraction", 0.25)),
        ("6GB", ("bytes", 6e9)),
        ("512MiB", ("bytes", 512 * 1024**2)),
        ("1.5 gb", ("bytes", 1.5e9)),
        ("2000000", ("bytes", 2e6)),
    ],
)
def test_budget_forms(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "-0.5", "0", "150%", "6XB", ""])
def test_unparsable_budgets_are_user_errors(text):
    with pytest.raises(BudgetError):
        parse_budget(text)


def test_fraction_and_bytes_buy_slots_per_layer():
    geo = dict(num_layers=8, num_experts=64, top_k=8, bytes_per_expert=1000)
    assert slots_for_budget("0.5", **geo) == 32
    assert slots_for_budget("1.0", **geo) == 64
    assert slots_for_budget(8 * 1000 * 10, **geo) == 10  # bytes: 10 experts in each of 8 layers
    assert slots_for_budget("1GB", **geo) == 64  # never more slots than experts


def test_budget_below_one_tokens_experts_names_the_minimum():
    geo = dict(num_layers=8, num_experts=64, top_k=8, bytes_per_expert=1000)
    with pytest.raises(BudgetError, match="one token uses 8 per layer.*0.125"):
        slots_for_budget("0.1", **geo)
