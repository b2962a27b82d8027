"""Checks of a checkpoint's config.json and tokenizer files before mlx_lm sees them.

mlx_lm trusts these files: a top-k of 0 or "8", a corrupt tokenizer.json or an unreadable
file surface as a TypeError deep inside model construction or generation. Here each is a
ModelError naming the file and the key, raised before anything is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError

# Keys mlx-lm MoE configs use for "experts per token" and "experts per layer".
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k", "num_experts_per_token", "moe_k")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")
JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "generation_config.json")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_json(path: Path, what: str):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: {what} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e})") from None


def check_config(model_dir) -> dict:
    """config.json: a JSON object whose size, expert and top-k keys are positive integers
    (and top-k at most the number of experts). Returns it."""
    path = Path(model_dir) / "config.json"
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{path}: config.json is not a JSON object")
    scopes = [("", config)]
    text = config.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise ModelError(f"{path}: 'text_config' is not an object")
        scopes.append(("text_config.", text))
    for prefix, scope in scopes:
        for key, low in [(k, 1) for k in TOP_K_KEYS + SIZE_KEYS] + [(k, 0) for k in EXPERT_KEYS]:
            v = scope.get(key)
            if v is None:
                continue
            if not _is_int(v) or v < low:
                need = "a positive integer" if low else "a non-negative integer"
                raise ModelError(f"{path}: '{prefix}{key}' is {v!r}, expected {need}")
        k = next((scope[x] for x in TOP_K_KEYS if scope.get(x) is not None), None)
        n = next((scope[x] for x in EXPERT_KEYS if scope.get(x)), None)
        if k is not None and n is not None and k > n:
            raise ModelError(f"{path}: {prefix}top-k ({k}) is larger than the number of experts ({n})")
    q = config.get("quantization")
    if q is not None:
        if not isinstance(q, dict):
            raise ModelError(f"{path}: 'quantization' is not an object")
        for key in ("bits", "group_size"):
            if key in q and (not _is_int(q[key]) or q[key] < 1):
                raise ModelError(f"{path}: 'quantization.{key}' is {q[key]!r}, expected a positive integer")
    return config


def check_tokenizer_files(model_dir):
    """A tokenizer is there (one of TOKENIZER_FILES) and every tokenizer JSON file parses."""
    root = Path(model_dir)
    if not any((root / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{root}: no tokenizer ({', '.join(TOKENIZER_FILES[:2])} or the like) in the model directory")
    for name in JSON_FILES:
        if (root / name).exists():
            read_json(root / name, name)
    for name in TOKENIZER_FILES:
        p = root / name
        if p.exists():
            try:
                with open(p, "rb"):
                    pass
            except OSError as e:
                raise ModelError(f"{p}: cannot read tokenizer ({e.strerror or e})") from None


def load_tokenizer_checked(model_dir, **kwargs):
    """mlx_lm's `load_tokenizer`, after `check_tokenizer_files`; any failure is a ModelError,
    and so is a tokenizer that turns text into no tokens."""
    from mlx_lm.utils import load_tokenizer

    check_tokenizer_files(model_dir)
    try:
        tokenizer = load_tokenizer(Path(model_dir), **kwargs)
        works = len(tokenizer.encode("Hello world")) > 0
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises anything on a broken file
        raise ModelError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if not works:
        raise ModelError(f"{model_dir}: the tokenizer turns text into no tokens (broken tokenizer files?)")
    return tokenizer
