"""StreamingSwitch: a MoE layer's experts computed from cache slots equal stock mlx_lm's
SwitchGLU on the same inputs, also when a batch needs more experts than the layer has slots."""

import mlx.core as mx
import numpy as np
from mlx_lm import load as stock_load

import chronos_mlx
from chronos_mlx.streaming import StreamingSwitch

from conftest import DEMO


def _batch(rng, tokens, experts, hot):
    """Router ids [1, tokens, 8]: every token picks the `hot` experts first, then others."""
    ids = np.empty((1, tokens, 8), dtype=np.uint32)
    for t in range(tokens):
        rest = rng.choice([e for e in range(experts) if e not in hot], 8 - len(hot), replace=False)
        ids[0, t] = list(hot) + list(rest)
    return mx.array(ids)


def test_a_batch_wider_than_the_slots_is_computed_in_waves_like_stock_and_keeps_the_hot_experts():
    stock, _ = stock_load(str(DEMO))
    stock.set_dtype(mx.float32)
    model, _, rt = chronos_mlx.load(None, expert_budget=0.25)  # 16 slots of 64 per layer
    rt.pipelined = False
    layer = 3
    ours = model.model.layers[layer].mlp.switch_mlp
    assert isinstance(ours, StreamingSwitch)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 24, 384)).astype(np.float32))
    hot = (11, 42, 7)  # used by every token: the most used experts of the batch
    ids = _batch(rng, 24, 64, hot)
    want = stock.model.layers[layer].mlp.switch_mlp(x, ids)
    got = ours(x, ids)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    assert len(np.unique(np.array(ids))) > 16  # it really needed waves
    # The last wave holds the most used experts: they are what the next tokens are likely
    # to need, so they stay resident after the batch.
    L = rt.cache.layers[layer]
    assert all(L.slot_of[e] >= 0 for e in hot)
