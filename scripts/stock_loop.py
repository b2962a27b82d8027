"""mlx_lm's greedy decode loop, timed: the harness of the scripts that patch stock's MoE layers."""

from __future__ import annotations

import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP


def patch_switches(change):
    """Every stock SwitchGLU / SwitchMLP runs `change(module, indices) -> indices` on its router's
    expert ids before computing its experts (for the whole process)."""
    for cls in (SwitchGLU, SwitchMLP):

        def call(self, x, indices, original=cls.__call__):
            return original(self, x, change(self, indices))

        cls.__call__ = call


def stock_decoder(model):
    """decode(n) -> (ms per token, token ids): mlx_lm's pipelining (token i+1 is started before
    token i is read), a fixed 4-token prompt, greedy."""
    stream = mx.new_stream(mx.default_device())

    def step(tok, cache):
        with mx.stream(stream):
            return mx.argmax(model(tok[None], cache=cache)[:, -1, :], axis=-1)

    def decode(n: int):
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

    return decode
