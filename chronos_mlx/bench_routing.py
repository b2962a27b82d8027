"""Trained-like routing for random-weight (synthetic) checkpoints, for benchmarks only.

A random-weight router sends nearly every token to the same experts, so a synthetic
checkpoint of a real geometry (Qwen3-30B-A3B on a GPU) would measure almost no misses.
`install_trained_routing` replaces every MoE block's router (`mlp.gate`, an nn.Linear in
qwen3_moe) with a table lookup keyed by the token's *position*:

- the position is read from the layer's own KV cache: the layer's attention module is
  given a thin subclass (same instance, parameters and paths) that notes `cache.offset`
  before the cache advances, so a decode step that chronos rolls back and recomputes is
  routed exactly as the first time, and stock mlx_lm and chronos route identically;
- a row holds logits built from the real text being decoded (forced decoding, "replay"):
  for MoE layer l and the token t at that position,
      logits = log popularity_l  +  G(l, t)  +  sigma * G(l, position)
  with popularity_l(rank) ∝ rank^-alpha over a per-layer random order of the experts and
  G independent standard Gumbel noise (G(l, t) fixed per layer and token id: the same
  token goes to similar experts; sigma: how much the context moves it). The router's
  top-k is then a Gumbel-top-k draw: skewed popularity, token identity, noise.

`calibrate` fits alpha so that the LRU decode hit rate at budgets 0.5 and 0.25 (an
offline simulation over the routing sequence) matches the trained demo model's on the
same text (`demo_lru_hits`, from its recorded routing). Measured on the demo model's own
geometry (64 experts, top-8), 2 English held-out texts, 128 prompt + 64 forced tokens:
see tests/test_bench_routing.py and README "Benchmarks".

The replaced router keeps the original under `.layer` (so `traces.find_routers` and
the model fingerprint still see a linear router); `uninstall()` puts everything back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

SIGMA = 1.0  # context noise: same-token expert overlap ≈ the demo's (0.5-0.8 across layers)
BUDGETS = (0.5, 0.25)
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention", "mixer", "linear_attn")


@dataclass
class RoutingParams:
    num_experts: int
    top_k: int
    alpha: float = 1.5  # popularity exponent (fitted by `calibrate`)
    sigma: float = SIGMA
    seed: int = 0
    targets: dict | None = None  # budget -> demo LRU decode hit it was fitted to
    fitted: dict | None = None  # budget -> simulated LRU decode hit with these parameters
    guess_noise: float | None = None  # bench_guesses.TableGuesses' noise (calibrate_guess_noise)
    guess_recall: dict | None = None  # {"demo": its gate predictor's recall, "fitted": the table's}


# --------------------------------------------------------------------------------------
# The routing itself (numpy)
# --------------------------------------------------------------------------------------


class RoutingTable:
    """Logit rows per MoE layer and position for one token sequence."""

    def __init__(self, params: RoutingParams, num_layers: int):
        self.p = params
        self.num_layers = num_layers
        self._token_noise: dict = {}
        self._log_pop = []
        E = params.num_experts
        for layer in range(num_layers):
            logp = -params.alpha * np.log(np.arange(1, E + 1, dtype=np.float64))
            np.random.default_rng([params.seed, layer, 0]).shuffle(logp)
            self._log_pop.append(logp)

    def _token_row(self, layer: int, token: int) -> np.ndarray:
        key = (layer, token)
        row = self._token_noise.get(key)
        if row is None:
            row = np.random.default_rng([self.p.seed, layer, 1, token]).gumbel(size=self.p.num_experts)
            self._token_noise[key] = row
        return row

    def logits(self, layer: int, tokens) -> np.ndarray:
        """[T, E] float32 logits for `tokens` at positions 0..T-1."""
        tokens = [int(t) for t in tokens]
        tok = np.stack([self._token_row(layer, t) for t in tokens]) if tokens else np.zeros((0, self.p.num_experts))
        pos = np.random.default_rng([self.p.seed, layer, 2]).gumbel(size=(len(tokens), self.p.num_experts))
        return (self._log_pop[layer][None] + tok + self.p.sigma * pos).astype(np.float32)

    def experts(self, layer: int, tokens) -> np.ndarray:
        """[T, k] expert ids the router picks (its top-k)."""
        lg = self.logits(layer, tokens)
        return np.argsort(-lg, axis=1, kind="stable")[:, : self.p.top_k]


def lru_decode_hit(experts: np.ndarray, n_prompt: int, slots: int) -> float:
    """LRU hit rate over decode positions (>= n_prompt) of one layer's routing [T, k],
    the prompt's positions touched in order first (what prefill leaves resident)."""
    hits = total = 0
    od: OrderedDict = OrderedDict()
    for t in range(experts.shape[0]):
        need = [int(e) for e in experts[t]]
        if t >= n_prompt:
            hits += sum(1 for e in need if e in od)
            total += len(need)
        for e in need:
            od[e] = None
            od.move_to_end(e)
        while len(od) > slots:
            victim = next(e for e in od if e not in need)
            del od[victim]
    return hits / total if total else 1.0


def lru_hits(routing: list, n_prompts: list, num_experts: int, budgets=BUDGETS) -> dict:
    """Mean LRU decode hit per budget; routing: per sequence an array [L, T, k]."""
    out = {}
    for b in budgets:
        slots = int(b * num_experts + 1e-9)
        vals = [lru_decode_hit(seq[layer], n, slots) for seq, n in zip(routing, n_prompts) for layer in range(seq.shape[0])]
        out[b] = float(np.mean(vals))
    return out


def simulate(params: RoutingParams, sequences: list, n_prompts: list, budgets=BUDGETS, layers: int = 4) -> dict:
    """LRU decode hit of this routing on `sequences` (token lists), over `layers` layers."""
    table = RoutingTable(params, layers)
    routing = [np.stack([table.experts(layer, seq) for layer in range(layers)]) for seq in sequences]
    return lru_hits(routing, n_prompts, params.num_experts, budgets)


def calibrate(sequences: list, n_prompts: list, num_experts: int, top_k: int, targets: dict | None = None, *,
              sigma: float = SIGMA, seed: int = 0, layers: int = 4) -> RoutingParams:
    """Fit the popularity exponent so the simulated LRU decode hit at each budget of
    `targets` (default: the demo model's, `demo_lru_hits` on the same sequences) is as
    close as it gets (least squares over the budgets; hit rate rises with alpha)."""
    if targets is None:
        targets = demo_lru_hits(sequences, n_prompts)
    budgets = tuple(sorted(targets, reverse=True))

    def err(alpha):
        sim = simulate(RoutingParams(num_experts, top_k, alpha, sigma, seed), sequences, n_prompts, budgets, layers)
        return sum((sim[b] - targets[b]) ** 2 for b in budgets), sim

    grid = np.linspace(0.0, 3.0, 13)
    scored = [(err(a)[0], a) for a in grid]
    _, best = min(scored)
    lo, hi = max(0.0, best - 0.25), best + 0.25
    for _ in range(8):  # golden-section search around the best grid point
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if err(m1)[0] <= err(m2)[0]:
            hi = m2
        else:
            lo = m1
    alpha = (lo + hi) / 2
    fitted = err(alpha)[1]
    return RoutingParams(num_experts, top_k, float(alpha), sigma, seed, dict(targets), fitted)


# --------------------------------------------------------------------------------------
# The trained demo model's routing: the calibration's target
# --------------------------------------------------------------------------------------


def record_routing(model, sequences: list) -> list:
    """Each sequence's routing [L, T, k] in `model` (one forward pass over the whole
    text: causal, so the same as decoding it token by token)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.cache import make_prompt_cache

    from .traces import _Recorder, moe_modules

    switches = moe_modules(model)
    sink: list = []
    wrapped = [(name, _Recorder(m, i, sink)) for i, (name, m) in enumerate(switches)]
    model.update_modules(tree_unflatten(wrapped))
    out = []
    try:
        for seq in sequences:
            sink.clear()
            # with a cache: positions come from it (trained-like routing reads them there)
            mx.eval(model(mx.array([int(t) for t in seq])[None], cache=make_prompt_cache(model)))
            per_layer = sorted(sink, key=lambda s: s[0])
            out.append(np.stack([np.array(i).reshape(-1, i.shape[-1]) for _, _, i in per_layer]))
    finally:
        model.update_modules(tree_unflatten([(name, w.inner) for name, w in wrapped]))
        sink.clear()
    return out


def demo_lru_hits(sequences: list, n_prompts: list, budgets=BUDGETS, model_path=None) -> dict:
    """LRU decode hit of the trained demo model (or `model_path`) on these sequences."""
    from mlx_lm import load

    from . import DEFAULT_MODEL

    model, _ = load(str(model_path or DEFAULT_MODEL))
    model.set_dtype(mx.float32)
    routing = record_routing(model, sequences)
    from .traces import model_num_experts

    return lru_hits(routing, n_prompts, model_num_experts(model), budgets)


def calibrate_for_workload(workload, prompts: list, forced: list, num_experts: int, top_k: int, *,
                           limit=None, max_prompt_tokens=128, max_tokens=64, split="heldout") -> RoutingParams:
    """`calibrate` for replayed workload texts: `prompts`/`forced` are the benchmarked
    model's tokens (`bench.replay_texts`); the demo model's target is measured on the same
    texts cut the same way with its own tokenizer (synthetic checkpoints share it)."""
    from . import DEFAULT_MODEL
    from .bench import replay_texts

    demo_prompts, demo_forced = replay_texts(workload, DEFAULT_MODEL, limit=limit, max_prompt_tokens=max_prompt_tokens,
                                             max_tokens=max_tokens, split=split)
    targets = demo_lru_hits([p + f for p, f in zip(demo_prompts, demo_forced)], [len(p) for p in demo_prompts])
    return calibrate([p + f for p, f in zip(prompts, forced)], [len(p) for p in prompts], num_experts, top_k, targets)


# --------------------------------------------------------------------------------------
# Installing it in a loaded model
# --------------------------------------------------------------------------------------


class _Position:
    __slots__ = ("offset", "count", "shared")

    def __init__(self, shared):
        self.offset = None
        self.count = 1  # positions in the layer's current call (prefill: the chunk)
        self.shared = shared


_NOTING: dict = {}


def _find_cache(args, kwargs):
    cache = kwargs.get("cache")
    if cache is None:
        cache = next((a for a in args[1:] if type(getattr(a, "offset", None)) is int), None)
    return cache


def _noting(cls):
    """`cls` with a __call__ that notes its cache's offset (the first position of x) first."""
    if cls not in _NOTING:

        def __call__(self, *args, **kwargs):
            note = self._bench_position
            x = args[0] if args else kwargs.get("x")
            note.count = x.shape[-2] if isinstance(x, mx.array) and x.ndim >= 2 else 1
            off = getattr(_find_cache(args, kwargs), "offset", None)
            if type(off) is int:
                note.offset = note.shared.offset = off
            else:  # no integer offset here (linear attention): the last one another layer noted
                note.offset = None
            return cls.__call__(self, *args, **kwargs)

        _NOTING[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_bench_noting": True})
    return _NOTING[cls]


class TableRouter(nn.Module):
    """Router logits looked up by position; the replaced router is kept as `.layer`."""

    def __init__(self, original, position: _Position, num_experts: int):
        super().__init__()
        self.layer = original
        object.__setattr__(self, "_position", position)
        object.__setattr__(self, "_table", mx.zeros((1, num_experts)))

    def set_table(self, table: mx.array):
        object.__setattr__(self, "_table", table)

    def __call__(self, x):
        p = self._position
        pos = p.offset if p.offset is not None else (p.shared.offset or 0)
        n = x.shape[-2] if x.ndim >= 2 else 1
        table = self._table
        T = table.shape[0]
        if pos + n <= T:
            rows = table[pos:pos + n]
        else:
            rows = mx.take(table, mx.array(np.arange(pos, pos + n) % T), axis=0)
        out = mx.broadcast_to(rows, (*x.shape[:-1], table.shape[-1])).astype(x.dtype)
        # Routed after the layer's input exists, as a trained router is: a host read of the
        # routing waits for the layers below (else per-layer reads would cost nothing).
        return mx.depends(out, x)


class TrainedRouting:
    """What `install_trained_routing` changed in a model; `set_sequence` per text."""

    def __init__(self, model, params: RoutingParams, blocks: list, pad: int = 256):
        self.model = model
        self.params = params
        self.blocks = blocks  # (block, router attribute, TableRouter, attention module, its class)
        self.table = RoutingTable(params, len(blocks))
        self.pad = pad
        self.tokens: list = [0]  # the sequence the tables were last built for (padded)

    def set_sequence(self, tokens):
        """Route positions by this text's tokens (positions past it: its tokens again)."""
        tokens = [int(t) for t in tokens] or [0]
        n = len(tokens) + self.pad
        full = [tokens[i % len(tokens)] for i in range(n)]
        self.tokens = full
        tables = [mx.array(self.table.logits(i, full)) for i in range(len(self.blocks))]
        mx.eval(tables)
        for (_, _, router, _, _), t in zip(self.blocks, tables):
            router.set_table(t)

    def uninstall(self):
        for block, attr, router, attn, cls in self.blocks:
            setattr(block, attr, router.layer)
            if attn is not None:
                attn.__class__ = cls
        try:
            object.__delattr__(self.model, "_chronos_bench_routing")
        except AttributeError:
            pass

    def describe(self) -> dict:
        return {"routing": "trained", **asdict(self.params)}


def install_trained_routing(model, params: RoutingParams) -> TrainedRouting:
    """Replace every MoE block's router by a position-keyed table (see the module doc).

    Works for any model whose MoE blocks call a linear router sibling `gate`/`router`
    of the expert module (qwen3_moe, qwen2_moe, mixtral, olmoe, ...); the model keeps the
    object as `model._chronos_bench_routing` (the benchmark calls `set_sequence` on it)."""
    from .traces import TraceError, find_routers, moe_modules

    modules = dict(model.named_modules())
    switches = moe_modules(model)
    routers = find_routers(model)
    shared = _Position(None)
    blocks = []
    for (name, _), router in zip(switches, routers):
        if router.kind != "linear":
            raise TraceError(f"{router.path}: trained-like routing needs a linear router, this one is custom")
        block_path, attr = router.path.rsplit(".", 1)
        block = modules[block_path]
        if isinstance(block, TableRouter):
            raise TraceError("trained-like routing is installed already")
        original = block[attr]
        decoder = modules.get(block_path.rsplit(".", 1)[0]) if "." in block_path else None
        attn = None
        if isinstance(decoder, nn.Module):
            attn = next((decoder[n] for n in _ATTENTION_NAMES if isinstance(decoder.get(n), nn.Module)), None)
            if attn is None:
                attn = next((m for m in decoder.children().values()
                             if isinstance(m, nn.Module) and "attention" in type(m).__name__.lower()), None)
        if attn is None:
            raise TraceError(f"{block_path}: no attention module next to the MoE block to read the position from")
        position = _Position(shared)
        cls = type(attn)
        if not getattr(cls, "_bench_noting", False):
            attn.__class__ = _noting(cls)
        else:
            cls = cls.__mro__[1]
        object.__setattr__(attn, "_bench_position", position)
        tr = TableRouter(original, position, params.num_experts)
        setattr(block, attr, tr)
        blocks.append((block, attr, tr, attn, cls))
    routing = TrainedRouting(model, params, blocks)
    object.__setattr__(model, "_chronos_bench_routing", routing)
    routing.set_sequence([0])
    return routing


def routing_setup(params: RoutingParams):
    """A `BenchConfig.setup` that installs this routing (stock and chronos alike)."""

    def setup(model, runtime=None):
        install_trained_routing(model, params)

    setup.params = params  # for predictors of this routing (bench_guesses.TableGuesses)
    return setup


def replay_one_text(model, model_path, info: dict, workload: str = "python", max_tokens: int = 64):
    """The bench's case for scripts that trace one decode: one `workload` text replayed with
    trained-like routing installed on `model` (calibrated like `bench_sync.py --routing
    trained`). Returns (prompt ids, decoding) where decoding() gives fresh `generate_step`
    keyword arguments (a prompt cache and the replay sampler) for each generation."""
    from mlx_lm.models.cache import make_prompt_cache

    from .bench import ReplaySampler, replay_texts

    prompts, forced = replay_texts(workload, model_path, limit=1, max_tokens=max_tokens)
    params = calibrate_for_workload(workload, prompts, forced, info["num_experts"], info["top_k"], limit=1,
                                    max_tokens=max_tokens)
    text = prompts[0] + forced[0]
    install_trained_routing(model, params).set_sequence(text)

    def decoding() -> dict:
        cache = make_prompt_cache(model)
        return {"prompt_cache": cache, "sampler": ReplaySampler(text, cache)}

    return prompts[0], decoding
