"""Connect predictors (predictors/) to a running model: what `--predictor` selects.

- gate: layer l+1's router on layer l's MoE input (needs no training);
- markov / lookahead: trained with `chronos predictor train`, found next to the profiles;
- intent: at prefill, the expert set the generation will use, prefetched before decoding;
- all: lookahead (or gate when none is trained) during decoding, plus intent at prefill.

Predictions only decide what to prefetch; output never depends on them.
"""

from __future__ import annotations

from .errors import ChronosError

PREDICTORS = ("none", "gate", "markov", "lookahead", "intent", "all")


def trained_predictors(model, runtime) -> dict:
    from .predictors import find_predictor_dir, load_predictors

    directory = find_predictor_dir(runtime.info["path"])
    return load_predictors(directory, model) if directory else {}


def default_predictor(model, runtime) -> str:
    """`none`: prediction has not yet paid for itself in a measured benchmark.

    Side by side (docs/benchmarks.md) the gate predictor cuts the decode stall 2-3x, but
    decoding came out slower than on-demand loading on every backend measured: on the 2-core
    CPU its extra reads (2.8x the bytes) and scoring compete with compute, on the 16-core CPU
    backend and the H200 the same held before its decisions moved onto the main thread (not
    re-measured since). Under device-wait on the H200 (session 17) next-layer guesses as good as
    the gate predictor's spared 36 % of the misses and decoded 24 % slower at half the experts;
    under device-fetch (session 24, prefetched on the device) they spared 70 % of the misses and
    decoded at half the speed of no guesses — computed then on the predictor's stream, which made
    the host wait a layer (fixed since, not re-measured).
    `--predictor` selects one explicitly; the default changes when a benchmark says so."""
    return "none"


def attach_predictor(model, runtime, name: str | None) -> None:
    """Set `runtime.predictor` (decode-time lookahead) and `runtime.intent` (prefill)."""
    name = name or "none"
    if name not in PREDICTORS:
        raise ChronosError(f"unknown predictor '{name}' (choose from {', '.join(PREDICTORS)})")
    if name == "none" or runtime.cache is None:
        return
    if runtime.cache.num_slots == runtime.info["num_experts"]:
        return  # every expert fits: nothing can miss, so nothing to predict
    from .predictors import CrossLayerGatePredictor

    trained = trained_predictors(model, runtime) if name != "gate" else {}
    if name in ("markov", "lookahead", "intent") and name not in trained:
        raise ChronosError(
            f"no trained '{name}' predictor for {runtime.info['path']}: run `chronos predictor train` first"
        )
    # The runtime prefetches only the next layer from the gate (its next-token guess is the
    # current routing, already resident): one router per layer, not four, to evaluate.
    gate = lambda: CrossLayerGatePredictor.from_model(model, top_k=runtime.info["top_k"], targets=((1, 0),))  # noqa: E731
    if name == "gate":
        runtime.predictor = gate()
    elif name in ("markov", "lookahead"):
        runtime.predictor = trained[name]
    elif name == "all":
        runtime.predictor = trained.get("lookahead") or gate()
    if name in ("intent", "all") and "intent" in trained:
        runtime.intent = trained["intent"]
    # As many guesses a layer as the router picks. More cut the stall further but read more
    # than they save once bytes cost (demo, 0.5, gate: 8 guesses read 1.35 MB a token and
    # stall 1.6 ms, 16 read 2.6 MB and stall 0.8 ms, none 0.93 MB and 2.9 ms: 0.6 against 2.5
    # extra experts a layer, i.e. ~80 against ~320 MB a token for 48 layers of 2.65 MB experts).
    runtime.guesses = runtime.info["top_k"]
    history = runtime.predictor is not None and type(runtime.predictor).observe is not _base_observe()
    if history:  # predictors that learn from the routing so far (Markov) watch it
        runtime.observers.append(runtime.predictor)


def _base_observe():
    from .predictors import Predictor

    return Predictor.observe
