"""Workload prompts: the seven shipped domains (en, de, fr, es, it, python, c) or a JSONL file.

Each line is `{"prompt": ...}`. The first half of a file is for recording profiles and
training predictors, the second half is held out for evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ChronosError

WORKLOAD_DIR = Path(__file__).parent / "data" / "workloads"
WORKLOADS = tuple(sorted(p.stem for p in WORKLOAD_DIR.glob("*.jsonl")))


def workload_path(name_or_path) -> Path:
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        raise ChronosError(f"{path}: is a directory, not a JSONL prompts file")
    if path.exists():
        return path
    if (WORKLOAD_DIR / f"{name_or_path}.jsonl").exists():
        return WORKLOAD_DIR / f"{name_or_path}.jsonl"
    raise ChronosError(f"no workload '{name_or_path}': give a JSONL file or one of {', '.join(WORKLOADS)}")


def read_prompts(name_or_path, split: str = "all") -> list[str]:
    """Prompt texts; `split` is "all", "train" (first half) or "heldout" (second half)."""
    path = workload_path(name_or_path)
    prompts = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChronosError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ChronosError(f"{path}: cannot read prompts ({e.strerror or e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError, RecursionError):
            prompt = None
        if not isinstance(prompt, str) or not prompt:
            raise ChronosError(f"{path}:{n}: expected a JSON object with a non-empty 'prompt' string")
        prompts.append(prompt)
    if not prompts:
        raise ChronosError(f"{path}: no prompts")
    half = (len(prompts) + 1) // 2
    return {"all": prompts, "train": prompts[:half], "heldout": prompts[half:] or prompts}[split]


def load_prompts(name_or_path, model=None, *, limit=None, max_prompt_tokens=None, split="all", tokenizer=None):
    """Tokenised prompts (lists of ids) for `model`'s tokenizer, truncated to `max_prompt_tokens`."""
    if tokenizer is None:
        from .config_check import load_tokenizer_checked
        from .loader import resolve_model_path

        tokenizer = load_tokenizer_checked(resolve_model_path(model))
    texts = read_prompts(name_or_path, split)[:limit]
    out = []
    for text in texts:
        ids = tokenizer.encode(text)
        out.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
    return out
