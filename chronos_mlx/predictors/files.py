"""Where a model's trained predictors live, and loading them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..traces import model_fingerprint
from .intent import IntentClassifier
from .lookahead import LookaheadRouter
from .markov import MarkovPredictor


LOOKAHEAD_FILE = "lookahead.safetensors"

MARKOV_FILE = "markov.npz"

INTENT_FILE = "intent.safetensors"


def profiles_root() -> Path:
    """$CHRONOS_PROFILE_DIR if set, else the shipped <repo>/profiles."""
    import os

    env = os.environ.get("CHRONOS_PROFILE_DIR")
    if env:
        return Path(env).expanduser()
    return shipped_profiles_root()


def shipped_profiles_root() -> Path:
    import chronos_mlx

    return Path(chronos_mlx.__file__).resolve().parent.parent / "profiles"


def model_name(spec=None) -> str:
    """demo-moe-4bit for the embedded model (None / "demo"), a local model's directory name,
    the last part of a Hugging Face repo id."""
    from ..loader import DEFAULT_MODEL

    if spec is None or str(spec) in ("", "demo"):
        return DEFAULT_MODEL.name
    p = Path(str(spec)).expanduser()
    if p.exists():
        return p.resolve().name
    return str(spec).rstrip("/").split("/")[-1]


def predictor_dir(spec=None) -> Path:
    """Where `chronos predictor train` saves a model's predictors: <profiles>/<model-name>/predictors/."""
    return profiles_root() / model_name(spec) / "predictors"


def find_predictor_dir(spec=None) -> Optional[Path]:
    """The first of $CHRONOS_PROFILE_DIR/<model>/predictors and <repo>/profiles/<model>/predictors
    that holds a trained predictor, or None."""
    name = model_name(spec)
    for root in dict.fromkeys([profiles_root(), shipped_profiles_root()]):
        d = root / name / "predictors"
        if any((d / f).exists() for f in (LOOKAHEAD_FILE, MARKOV_FILE, INTENT_FILE)):
            return d
    return None


def load_predictors(directory, model=None, fingerprint: Optional[dict] = None) -> dict:
    """The trained predictors found in `directory`: {"lookahead"?, "markov"?, "intent"?}.

    With `model` (or its fingerprint), each is checked against it (ProfileError on mismatch).
    """
    d = Path(directory)
    if fingerprint is None and model is not None:
        fingerprint = model_fingerprint(model)
    out = {}
    if (d / LOOKAHEAD_FILE).exists():
        out["lookahead"] = LookaheadRouter.load(d / LOOKAHEAD_FILE, fingerprint=fingerprint)
    if (d / MARKOV_FILE).exists():
        out["markov"] = MarkovPredictor.load(d / MARKOV_FILE, fingerprint=fingerprint)
    if (d / INTENT_FILE).exists():
        out["intent"] = IntentClassifier.load(d / INTENT_FILE, fingerprint=fingerprint)
    return out
