"""Expert predictors: which experts a MoE layer will need, before its router has run.

Every predictor has the same small interface (see `Predictor`):

- `targets`: the (layer_offset, token_offset) pairs it predicts. (1, 0) and (2, 0) are the
  next MoE layers of the same token, (0, 1) and (0, 2) the same layer of the next tokens.
- `scores(layer, x=None) -> mx.array [n_targets, E]`: higher = more likely, one row per
  target, for the latest token. `x` is layer `layer`'s MoE input (what the expert module
  receives; [D] or [..., D], the last row is used); predictors that work from routing
  history (`needs_hidden = False`) ignore it. Rows whose target layer is past the last MoE
  layer are meaningless: `valid(layer)` says which rows count.
- `ranked(layer, x=None, k=None) -> {(target_layer, token_offset): np.ndarray of expert ids}`,
  best first; `row(layer_offset, token_offset)` is the row of a target in `scores`.
- `observe(layer, expert_ids)` / `reset()`: the Runtime observer protocol (routing decisions
  known on the host; ids of one or more tokens, flattened). History-based predictors
  (previous token, Markov) learn the context from it; the others ignore it.
- `score_trace(seq) -> np.ndarray [L, T, n_targets, E]`: offline scores of a recorded
  sequence, row t using only what is known at token t (for evaluation and training).

Predictors:
- `PreviousTokenPredictor`: the experts of the latest tokens (no training).
- `CrossLayerGatePredictor`: layer l+j's router applied to layer l's MoE input (no training).
- `MarkovPredictor`: 2nd-order Markov chain over expert ids, fit from traces.
- `LookaheadRouter`: a small trained network per MoE layer (nn.Module), all four targets.
- `IntentClassifier`: at prefill, the experts the whole generation will use, per layer.

One module each: `base` (the interface, targets, file checks), `previous_token`, `gate`,
`markov`, `lookahead`, `intent`, `evaluate` (offline recall), `files` (where a model's trained
predictors live). Everything is importable from `chronos_mlx.predictors`.

Library code: nothing here prints; long work reports through `progress` callbacks.
"""

from .base import FORMAT_VERSION, LOOKAHEAD_TARGETS, TARGET_NAMES, TOKEN_TARGETS, Predictor, Target, target_name, top_ids
from .evaluate import evaluate_intent, evaluate_predictors, prompt_baseline_scores
from .files import (
    INTENT_FILE, LOOKAHEAD_FILE, MARKOV_FILE, find_predictor_dir, load_predictors, model_name, predictor_dir,
    profiles_root, shipped_profiles_root,
)
from .gate import CrossLayerGatePredictor
from .intent import IntentClassifier, IntentConfig, PromptSummary, intent_samples, train_intent
from .lookahead import (
    LookaheadConfig, LookaheadRouter, default_rank, lookahead_dataset, lookahead_loss, train_lookahead,
)
from .markov import MarkovPredictor
from .previous_token import PreviousTokenPredictor

__all__ = [
    "FORMAT_VERSION", "LOOKAHEAD_TARGETS", "TARGET_NAMES", "TOKEN_TARGETS", "Predictor", "Target", "target_name",
    "top_ids", "evaluate_intent", "evaluate_predictors", "prompt_baseline_scores", "INTENT_FILE", "LOOKAHEAD_FILE",
    "MARKOV_FILE", "find_predictor_dir", "load_predictors", "model_name", "predictor_dir", "profiles_root",
    "shipped_profiles_root", "CrossLayerGatePredictor", "IntentClassifier", "IntentConfig", "PromptSummary",
    "intent_samples", "train_intent", "LookaheadConfig", "LookaheadRouter", "default_rank", "lookahead_dataset",
    "lookahead_loss", "train_lookahead", "MarkovPredictor", "PreviousTokenPredictor",
]
