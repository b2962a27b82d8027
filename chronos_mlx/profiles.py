"""Workload profiles: which experts a workload uses, saved per model, applied at start-up.

A profile holds, per MoE layer, raw expert use counts, co-activation counts and the number
of tokens observed, plus the fingerprint of the model it was recorded on (architecture,
expert tensor shapes, sha256 of the router weights). It is one JSON file (format version
`PROFILE_VERSION`), written atomically; reading one checks its structure and its counting
invariants, so a corrupt or truncated file is a `ProfileError` and nothing else is lost.

`apply_profile(runtime, model, profile)` checks the fingerprint, seeds the layers' cache
policies (those that take a seed, i.e. `usage`) and starts a background thread that loads
the profile's hottest experts into free slots.

Profiles are looked up by name in the user directory (`$CHRONOS_PROFILE_DIR`, default
`~/.cache/chronos-mlx/profiles`) and then in the repository's `profiles/` (shipped ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ProfileError
from .files import check_can_create
from .usage import ActivationStats

PROFILE_FORMAT = "chronos-mlx-profile"
PROFILE_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# --------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------


@dataclass
class Profile:
    """Expert use of one workload on one model. Arrays are per MoE layer."""

    name: str
    fingerprint: dict
    tokens: np.ndarray  # (layers,) tokens observed
    counts: np.ndarray  # (layers, experts) uses
    coactivation: np.ndarray  # (layers, experts, experts) uses by the same token; diagonal = counts
    meta: dict = field(default_factory=dict)  # created, prompts file, max_tokens ...

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def top_k(self) -> int:
        return int(self.fingerprint["top_k"])

    def frequencies(self) -> np.ndarray:
        """Uses per token (each layer's row sums to top_k)."""
        return self.counts / np.maximum(self.tokens, 1)[:, None]

    def ranking(self, layer: int) -> np.ndarray:
        """Experts of `layer`, most used first (ties by id)."""
        return np.argsort(-self.counts[layer], kind="stable")

    def hot(self, layer: int, n: int) -> np.ndarray:
        return self.ranking(layer)[:n]

    def permuted(self, perms: list, fingerprint: dict) -> "Profile":
        """The same profile for a model whose layer l's expert i is this model's perms[l][i]."""
        counts = np.stack([self.counts[l][p] for l, p in enumerate(perms)])
        co = np.stack([self.coactivation[l][np.ix_(p, p)] for l, p in enumerate(perms)])
        return Profile(self.name, fingerprint, self.tokens.copy(), counts, co, dict(self.meta))


# --------------------------------------------------------------------------------------
# Model fingerprint
# --------------------------------------------------------------------------------------


def fingerprint_of(model, top_k: int, expert_params: dict) -> dict:
    """Identity of a model for profiles: the routing fingerprint predictors use (architecture,
    MoE layers, experts, hidden size, sha256 of the router weights) plus top-k and the
    per-expert tensor shapes and dtypes on disk. `expert_params` maps a projection parameter
    ("gate_proj.weight") to its ExpertTensor."""
    from .traces import model_fingerprint as routing_fingerprint

    fp = routing_fingerprint(model)
    fp["top_k"] = int(top_k)
    fp["expert_params"] = {
        name: {"shape": list(t.shape), "dtype": t.dtype} for name, t in sorted(expert_params.items())
    }
    return fp


def model_fingerprint(runtime, model) -> dict:
    """The fingerprint of a model loaded by `chronos_mlx.load`."""
    if runtime.cache is None:
        raise ProfileError("this model has no MoE layers: profiles do not apply to it")
    params = {name: p.source for name, p in runtime.cache.layers[0].params.items()}
    return fingerprint_of(model, runtime.info["top_k"], params)


def _describe(fp: dict) -> str:
    return f"{fp.get('model_type')}, {fp.get('num_layers')} MoE layers x {fp.get('num_experts')} experts, top-{fp.get('top_k')}"


def check_fingerprint(profile: Profile, fingerprint: dict):
    """Refuse a profile recorded on another model, saying how they differ."""
    p = profile.fingerprint
    where = f"profile '{profile.name}'" + (f" ({profile.meta['path']})" if profile.meta.get("path") else "")
    hint = "record one for this model with `chronos profile record`"
    structural = ("model_type", "num_layers", "num_experts", "hidden_size", "top_k", "expert_params")
    if any(p.get(k) != fingerprint.get(k) for k in structural):
        differ = ", ".join(k for k in structural if p.get(k) != fingerprint.get(k))
        raise ProfileError(
            f"{where} was recorded for another model ({_describe(p)}); this model is {_describe(fingerprint)} "
            f"(differs in {differ}): {hint}"
        )
    if p.get("router_sha256") != fingerprint.get("router_sha256"):
        raise ProfileError(
            f"{where} was recorded for another model of the same shape ({_describe(p)}): its router weights "
            f"differ (sha256 {str(p.get('router_sha256'))[:12]}... vs {fingerprint['router_sha256'][:12]}...); {hint}"
        )


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def shipped_profile_dir() -> Path:
    import chronos_mlx

    return Path(chronos_mlx.__file__).resolve().parent.parent / "profiles"


def user_profile_dir() -> Path:
    env = os.environ.get("CHRONOS_PROFILE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chronos-mlx" / "profiles"


def profile_dirs() -> list[Path]:
    """Where names are looked up, first match wins: the user's recordings, then shipped ones."""
    return [user_profile_dir(), shipped_profile_dir()]


MAX_NAME = 100  # the file name NAME.json (and its temporary) must stay under 255 bytes
_MAX_COUNT = 2**53  # counts are exact in JSON readers that use doubles


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name or ""):
        raise ProfileError(f"invalid profile name {str(name)[:60]!r}: use letters, digits, '.', '_' and '-'")
    if len(name) > MAX_NAME:
        raise ProfileError(f"profile name is {len(name)} characters long; at most {MAX_NAME}")
    return name


def _int_array(value, what: str, bad) -> np.ndarray:
    """A nested list of non-negative JSON integers (no floats, booleans or huge numbers) as int64."""
    def walk(v, depth):
        if isinstance(v, list):
            if depth > 3:
                raise bad(f"{what} is nested too deeply")
            for x in v:
                walk(x, depth + 1)
        elif not (isinstance(v, int) and not isinstance(v, bool)) or not 0 <= v < _MAX_COUNT:
            raise bad(f"{what} holds {str(v)[:40]!r}, not a count")

    walk(value, 0)
    try:
        return np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise bad(f"{what} is not a rectangular array") from None


def resolve_profile(spec) -> Path:
    """A profile file from a path (anything with a '/' or ending in .json) or a name."""
    spec = str(spec)
    if "/" in spec or os.sep in spec or spec.endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        return path
    check_name(spec)
    for d in profile_dirs():
        path = d / f"{spec}.json"
        if path.is_file():
            return path
    raise ProfileError(
        f"no profile named '{spec}' in {' or '.join(str(d) for d in profile_dirs())} (see `chronos profile list`)"
    )


def _to_json(profile: Profile) -> dict:
    iu = np.triu_indices(profile.num_experts, k=1)
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": profile.name,
        "meta": {k: v for k, v in profile.meta.items() if k != "path"},
        "fingerprint": profile.fingerprint,
        "tokens": profile.tokens.tolist(),
        "counts": profile.counts.tolist(),
        # Symmetric with counts on the diagonal: the strict upper triangle, row-major.
        "coactivation_upper": [c[iu].tolist() for c in profile.coactivation],
    }


def _from_json(data, where: str) -> Profile:
    def bad(what):
        return ProfileError(f"{where}: not a valid chronos profile ({what})")

    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise bad("missing format marker")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"version {str(version)[:20]}")
    if version > PROFILE_VERSION:
        raise ProfileError(
            f"{where}: profile format version {version} is newer than this chronos-mlx reads ({PROFILE_VERSION}); upgrade"
        )
    name = data.get("name")
    try:
        check_name(name)
    except ProfileError:
        raise bad(f"name {str(name)[:40]!r}") from None
    fp = data.get("fingerprint")
    if not isinstance(fp, dict):
        raise bad("no fingerprint")
    for key in ("num_layers", "num_experts", "top_k"):
        v = fp.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 1 << 20:
            raise bad(f"fingerprint {key} {str(v)[:20]!r}")
    k = fp["top_k"]
    if k > fp["num_experts"]:
        raise bad("top_k larger than the number of experts")
    if "meta" in data and not isinstance(data["meta"], (dict, type(None))):
        raise bad("meta is not an object")
    for key in ("tokens", "counts", "coactivation_upper"):
        if key not in data:
            raise bad(f"no {key}")
    tokens = _int_array(data["tokens"], "tokens", bad)
    counts = _int_array(data["counts"], "counts", bad)
    upper = _int_array(data["coactivation_upper"], "coactivation_upper", bad)
    if counts.ndim != 2 or tokens.shape != (counts.shape[0],):
        raise bad("counts and tokens disagree in shape")
    n_layers, n_experts = counts.shape
    if (n_layers, n_experts) != (fp.get("num_layers"), fp.get("num_experts")):
        raise bad("counts do not match the fingerprint's layers x experts")
    if upper.shape != (n_layers, n_experts * (n_experts - 1) // 2):
        raise bad("co-activation has the wrong shape")
    if n_experts > 4096:
        raise bad("more than 4096 experts per layer")
    co = np.zeros((n_layers, n_experts, n_experts), dtype=np.int64)
    iu = np.triu_indices(n_experts, k=1)
    for layer in range(n_layers):
        co[layer][iu] = upper[layer]
        co[layer] += co[layer].T
        co[layer][np.diag_indices(n_experts)] = counts[layer]
    # Every token uses exactly top_k distinct experts: both sums are fixed by the counts.
    if not (counts.sum(axis=1) == tokens * k).all():
        raise bad("expert counts do not add up to tokens x top_k")
    if not (co.sum(axis=2) - counts == counts * (k - 1)).all():
        raise bad("co-activation does not add up to the counts")
    meta = dict(data.get("meta") or {})
    meta["path"] = where
    return Profile(name, fp, tokens, counts, co, meta)


def load_profile(spec) -> Profile:
    """Read and validate a profile (a Profile passes through)."""
    if isinstance(spec, Profile):
        return spec
    path = resolve_profile(spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProfileError(f"{path}: corrupt or truncated profile ({type(e).__name__}: {e})")
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile ({e.strerror or e})")
    return _from_json(data, str(path))


def atomic_write_text(path: Path, text: str):
    """Write via a temporary file in the same directory and os.replace: readers see the old
    file or the new one, never a part; an interruption leaves no temporary behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a profile is no secret
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def profile_path_for(name: str, path=None) -> Path:
    """Where `save_profile` writes a profile named `name` (default: the user directory)."""
    return Path(path).expanduser() if path else user_profile_dir() / f"{check_name(name)}.json"


def check_writable(path: Path):
    """Refuse, before any work is done, to write a profile where it would destroy something
    that is not a profile (a model shard, any other file), into a directory, or where it
    cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ProfileError(f"{path}: is a directory; give a file name for the profile")
    if path.exists() or path.is_symlink():
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
            data = json.loads(head.decode("utf-8")) if len(head) < (1 << 20) else None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            data = None
        if not (isinstance(data, dict) and data.get("format") == PROFILE_FORMAT) and not _is_profile_file(path):
            raise ProfileError(f"{path}: exists and is not a chronos profile; not overwriting it (choose another --out)")
    check_can_create(path.parent, ProfileError, where=path.parent)


def _is_profile_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == PROFILE_FORMAT


def save_profile(profile: Profile, path=None) -> Path:
    """Write `profile` (default: `<user profile dir>/<name>.json`); returns the path.
    Only ever replaces a profile: any other file at `path` is left alone (ProfileError)."""
    path = profile_path_for(profile.name, path)
    check_writable(path)
    try:
        atomic_write_text(path, json.dumps(_to_json(profile), separators=(",", ":")) + "\n")
    except OSError as e:
        raise ProfileError(f"{path}: cannot write the profile ({e.strerror or e})") from None
    profile.meta["path"] = str(path)
    return path


@contextlib.contextmanager
def recording_lock(path: Path):
    """Hold `.NAME.json.lock` next to a profile while it is recorded: a second recording to
    the same file fails at once instead of one silently replacing the other. The lock is
    an flock, released by the kernel if the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): no lock
        yield
        return
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ProfileError(f"{path.parent}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ProfileError(
                f"{path}: another `chronos profile record` is writing this profile now; wait for it or use another --name/--out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed it meanwhile: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter that opened it retries
        os.close(fd)


def list_profiles() -> list:
    """(path, Profile or ProfileError) for every profile file found, names shadowed by an
    earlier directory skipped. A broken file is listed with its error, not raised."""
    seen, found = set(), []
    for d in profile_dirs():
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                found.append((path, load_profile(path)))
            except ProfileError as e:
                found.append((path, e))
    return found


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


def profile_from_stats(stats: ActivationStats, name: str, runtime, model, meta: dict | None = None) -> Profile:
    """A profile of what `stats` observed (e.g. a chat session's ActivationStats)."""
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})}
    return Profile(
        check_name(name),
        model_fingerprint(runtime, model),
        stats.tokens.copy(),
        stats.totals.copy(),
        stats.coactivation.copy(),
        meta,
    )


def record_profile(
    model, tokenizer, runtime, prompts: list, *, name: str, max_tokens: int = 32, on_prompt=None, meta=None
) -> Profile:
    """Run each prompt (greedy, up to `max_tokens` new tokens, stopping at end of sequence)
    and profile the routing. `on_prompt(done, total)` is called after each prompt."""
    from .generate import generate_step
    from .traces import _encode as encode  # mlx_lm stream_generate's special-token rule

    check_name(name)
    stats = ActivationStats.for_runtime(runtime)
    eos = set(getattr(tokenizer, "eos_token_ids", []) or [])
    try:
        for i, text in enumerate(prompts, 1):
            steps = generate_step(mx.array(encode(tokenizer, text)), model, runtime, max_tokens=max_tokens)
            try:
                for token, _ in steps:
                    if token in eos:
                        break
            finally:
                steps.close()
            if on_prompt:
                on_prompt(i, len(prompts))
    finally:
        stats.detach(runtime)
    info = {"prompts": len(prompts), "max_tokens": max_tokens, **(meta or {})}
    return profile_from_stats(stats, name, runtime, model, info)


# --------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------


class Prewarm(threading.Thread):
    """Loads a profile's hottest experts into free slots in the background.

    `stop()` asks it to finish after the expert it is loading; `loaded` counts experts.
    A failure is kept in `error`: the session goes on, misses load on demand."""

    def __init__(self, cache, plan: dict):
        super().__init__(name="chronos-prewarm", daemon=True)
        self.cache, self.plan = cache, plan
        self.stop_event = threading.Event()
        self.loaded = 0
        self.error = None

    def run(self):
        try:
            self.loaded = self.cache.prewarm(self.plan, self.stop_event)
        except Exception as e:  # noqa: BLE001 - a pre-warm is an optimisation, never fatal
            self.error = e

    def stop(self):
        self.stop_event.set()


def prewarm_plan(profile: Profile, cache) -> dict:
    """Per layer, the profile's used experts, most used first, as many as the layer has slots."""
    plan = {}
    for layer, L in enumerate(cache.layers):
        ranked = [int(e) for e in profile.ranking(layer) if profile.counts[layer][e] > 0]
        plan[layer] = ranked[: L.num_slots]
    return plan


def apply_profile(runtime, model, profile, *, prewarm: bool = True, pin: bool = False, start: bool = True) -> Prewarm:
    """Check `profile` (a Profile, name or path) against the model, seed the cache policies
    (`usage`; `pin` also pins its hottest experts) and start pre-warming its hottest experts
    in the background. Returns the thread (already started unless `start=False`; `join()`
    it to wait, `stop()` to cut it short)."""
    profile = load_profile(profile)
    check_fingerprint(profile, model_fingerprint(runtime, model))
    freqs = profile.frequencies()
    for layer, L in enumerate(runtime.cache.layers):
        seed = getattr(L.policy, "seed", None)
        if seed is not None:
            seed(freqs[layer], L.num_slots, pin=pin)
    runtime.info["profile"] = profile.name
    thread = Prewarm(runtime.cache, prewarm_plan(profile, runtime.cache) if prewarm else {})
    if start:
        thread.start()
    return thread


# --------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------


def compare_profiles(a: Profile, b: Profile, top: int = 16) -> list[dict]:
    """Per layer: the overlap of the two hot sets (top `top` experts; shared count and
    Jaccard index) and the share of use they have in common (sum of min frequencies / top_k)."""
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts):
        raise ProfileError(
            f"profiles '{a.name}' and '{b.name}' are for models of different shapes "
            f"({a.num_layers}x{a.num_experts} vs {b.num_layers}x{b.num_experts})"
        )
    fa, fb = a.frequencies(), b.frequencies()
    rows = []
    for layer in range(a.num_layers):
        ha, hb = set(a.hot(layer, top).tolist()), set(b.hot(layer, top).tolist())
        shared = len(ha & hb)
        rows.append(
            {
                "layer": layer,
                "shared": shared,
                "jaccard": shared / len(ha | hb) if ha | hb else 1.0,
                "use_overlap": float(np.minimum(fa[layer], fb[layer]).sum() / max(a.top_k, 1)),
            }
        )
    return rows
