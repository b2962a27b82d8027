"""Issue 13: hostile inputs. Nothing silent, nothing lost.

- a shard changed in place while in use is an error, never garbage;
- `chronos verify` and `--verify-experts` catch corrupt bytes;
- Ctrl-C at any point leaves the expert cache consistent, and a second one exits promptly;
- no file that is not ours is overwritten; outputs are checked before long runs;
- every user error is one `error:` line (plus at most a hint line) and exit code 2;
- plain-text chat continues the conversation with exactly the text the model produced.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import chronos_mlx
from chronos_mlx.cli import app
from chronos_mlx.errors import ChronosError, ProfileError, ShardError

from conftest import DEMO, stock_text

PROMPT = "The Roman Empire"
SHARD = "model.safetensors"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Manifests and profiles go to this test's directories, never the user's."""
    monkeypatch.setenv("CHRONOS_MANIFEST_DIR", str(tmp_path / "manifests"))
    monkeypatch.setenv("CHRONOS_PROFILE_DIR", str(tmp_path / "profiles"))


def demo_copy(dest: Path, copy_shard: bool = False) -> Path:
    """The demo model's files in `dest`; the 48 MB shard is a symlink unless `copy_shard`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in DEMO.iterdir():
        if f.name == SHARD and not copy_shard:
            (dest / SHARD).symlink_to(f)
        elif f.is_file():
            shutil.copy2(f, dest / f.name)
    return dest


def read_header(path: Path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def rewrite_header(src: Path, dst: Path, mutate) -> Path:
    """`dst` = `src` with its header passed through `mutate(header) -> header` (kept the same
    length by padding with spaces where it shrinks, like safetensors writers do); the data
    region is copied unchanged."""
    n, header = read_header(src)
    raw = json.dumps(mutate(header), separators=(",", ":")).encode()
    if len(raw) <= n:
        raw = raw + b" " * (n - len(raw))
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(struct.pack("<Q", len(raw)))
        fo.write(raw)
        fi.seek(8 + n)
        shutil.copyfileobj(fi, fo, 8 << 20)
    return dst


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def one_error_line(result, fragment: str):
    """Exit code 2, no traceback, exactly one `error:` line containing `fragment`, at
    most a hint line after it, nothing after that."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "╭" not in result.stderr, result.output
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert fragment in lines[errors[0]], result.stderr
    rest = lines[errors[0] + 1 :]
    assert len(rest) <= 1 and all(line.startswith("hint: ") for line in rest), result.stderr


def deny(monkeypatch, target: Path):
    """Make every open of `target` fail with EACCES (the tests run as root, where chmod
    does not stop reads)."""
    import builtins
    import io
    import pathlib

    target = str(target)

    def check(p):
        if str(p) == target or os.path.realpath(str(p)) == os.path.realpath(target) and str(p).endswith(Path(target).name):
            raise PermissionError(13, "Permission denied", str(p))

    real_open, real_os_open, real_io_open = builtins.open, os.open, io.open

    def fake_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            check(file)
        return real_open(file, *a, **k)

    def fake_os_open(path, *a, **k):
        check(path)
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    real_read_text = pathlib.Path.read_text

    def fake_read_text(self, *a, **k):
        check(self)
        return real_read_text(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", fake_read_text)


@pytest.fixture(scope="module")
def stock():
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(DEMO))
    model.set_dtype(mx.float32)
    return model, tokenizer


def stock_greedy(stock, text: str, max_tokens: int) -> list:
    from mlx_lm.generate import generate_step

    model, tokenizer = stock
    ids = tokenizer.encode(text)
    out = []
    for (token, _), _ in zip(generate_step(mx.array(ids), model, max_tokens=max_tokens), range(max_tokens)):
        if int(token) in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return out


def cache_consistent(cache):
    """No slot claimed by an unfinished load, no unresolved future, maps agree."""
    for L in cache.layers:
        with L.lock:
            assert not (L.expert_in == -2).any(), "a slot is still claimed"
            for e, (slot, fut, _) in L.pending.items():
                assert False, f"expert {e} still pending"
            for slot, e in enumerate(L.expert_in.tolist()):
                if e >= 0:
                    assert L.slot_of[e] == slot
            for e, slot in enumerate(L.slot_of.tolist()):
                if slot >= 0:
                    assert L.expert_in[slot] == e


def settle_pool(cache, timeout=10.0):
    """Wait until background loads are done (pending empty)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if all(not L.pending for L in cache.layers):
            return
        time.sleep(0.01)
    raise AssertionError("background loads never finished")


# --------------------------------------------------------------------------------------
# 1. shards changed in place are refused
# --------------------------------------------------------------------------------------


def _change_same_size(path: Path):
    data = bytearray(path.read_bytes())
    data[-1000:] = bytes(b ^ 0xFF for b in data[-1000:])  # expert bytes of the last layer
    path.write_bytes(bytes(data))  # same inode, same size: only the times change


def _touch_later(path: Path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _replace_by_rename(path: Path):
    tmp = path.with_suffix(".new")
    shutil.copy2(path, tmp)  # same bytes, same times (copy2), another inode
    os.replace(tmp, path)


def _truncate(path: Path):
    os.truncate(path, path.stat().st_size - 4096)


@pytest.mark.parametrize(
    "change, what",
    [(_change_same_size, "was modified"), (_touch_later, "was modified"),
     (_replace_by_rename, "replaced by another file"), (_truncate, "changed size")],
    ids=["same-size-overwrite", "mtime-only", "replaced-same-bytes", "truncated"],
)
def test_a_shard_changed_while_in_use_is_an_error_not_garbage(tmp_path, change, what):
    model_dir = demo_copy(tmp_path / "m", copy_shard=True)
    model, tok, rt = chronos_mlx.load(str(model_dir), expert_budget=0.125)
    rt.cache.ensure(7, list(range(8)))  # fine before the change
    change(model_dir / SHARD)
    with pytest.raises(ShardError, match=what):
        rt.cache.ensure(7, list(range(40, 48)))
    cache_consistent(rt.cache)
    with pytest.raises(ShardError):  # prefetches refuse too (their error waits in the future)
        rt.cache.prefetch(6, list(range(40, 48)), limit=8)
        settle_pool(rt.cache)
        rt.cache.ensure(6, list(range(40, 48)))


def test_chat_ends_with_one_error_line_when_the_shard_is_overwritten_mid_session(tmp_path, runner, monkeypatch):
    model_dir = demo_copy(tmp_path / "m", copy_shard=True)
    from chronos_mlx.cli import chat as chat_mod

    real = chat_mod.run_completion
    calls = []

    def run_then_corrupt(*a, **k):
        if calls:
            _change_same_size(model_dir / SHARD)
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(chat_mod, "run_completion", run_then_corrupt)
    result = runner.invoke(app, ["chat", "-m", str(model_dir), "-b", "0.125", "-n", "6"], input="The Roman Empire\nGo on\n")
    one_error_line(result, "was modified while the model was in use")


# --------------------------------------------------------------------------------------
# 2. Ctrl-C: the cache stays consistent, nothing hangs
# --------------------------------------------------------------------------------------


@pytest.fixture
def slow_runtime():
    from chronos_mlx.io import SimulatedSSD

    _, _, rt = chronos_mlx.load(None, expert_budget=0.125, io_sim=SimulatedSSD(20e6, 1e-3))  # 20 MB/s
    return rt


@pytest.mark.parametrize("where", ["read", "wait", "map", "reserve"])
def test_a_keyboard_interrupt_anywhere_in_a_batch_leaves_the_cache_consistent(slow_runtime, monkeypatch, where):
    """KeyboardInterrupt raised inside the batch machinery itself (as a signal handler would):
    every slot is free or mapped, every future resolved, and the next load works."""
    import chronos_mlx.cache as cache_mod

    cache = slow_runtime.cache
    targets = {
        "read": (cache, "_read_experts"),
        "wait": (cache_mod, "wait_until"),
        "map": (cache, "_map"),
        "reserve": (cache, "_take_slots"),
    }
    obj, name = targets[where]
    real = getattr(obj, name)
    fired = []

    def boom(*a, **k):
        if not fired:
            fired.append(1)
            if where in ("map",):
                real(*a, **k)  # interrupted right after the first expert is mapped
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(obj, name, boom)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(3, list(range(10, 18)))
    monkeypatch.setattr(obj, name, real)
    cache_consistent(cache)
    cache.ensure(3, list(range(10, 18)))  # no hang, no "no slot can be freed"
    assert (cache.layers[3].slot_of[list(range(10, 18))] >= 0).all()
    cache_consistent(cache)


def test_sigint_at_random_points_during_slow_loads_never_breaks_the_cache(slow_runtime):
    """Real SIGINTs from another thread at random moments while the main thread loads and
    prefetches over a 20 MB/s simulated SSD: after each, the cache is consistent and loads go on."""
    cache = slow_runtime.cache
    rng = np.random.default_rng(13)
    interrupted = 0
    armed = [False]

    def handler(signum, frame):  # Python's default handler, but only while the test is listening
        if armed[0]:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        for i in range(25):
            timer = threading.Timer(float(rng.uniform(0.0, 0.03)), os.kill, (os.getpid(), signal.SIGINT))
            armed[0] = True
            try:
                timer.start()
                layer = int(rng.integers(0, 8))
                cache.prefetch((layer + 1) % 8, rng.choice(64, 8, replace=False).tolist(), limit=4)
                cache.ensure(layer, rng.choice(64, 8, replace=False).tolist())
                while timer.is_alive():
                    time.sleep(0.001)
                time.sleep(0.005)  # the signal lands here if the work was done before it
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                armed[0] = False
                timer.join()
            settle_pool(cache)
            cache_consistent(cache)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted == 25  # every signal became one KeyboardInterrupt, none was lost
    cache.ensure(0, list(range(8)))
    cache_consistent(cache)


def _chat_process(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "chronos_mlx.cli", "chat", "-b", "0.125", "-n", "200", "--no-chat-template",
         "--io-sim", "bandwidth=20MB/s,latency=1ms"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )


@pytest.mark.parametrize("gap", [0.1])
def test_two_ctrl_c_during_a_slow_reply_exit_promptly(tmp_path, gap):
    """The user's view: a reply streaming over a slow (simulated) drive, Ctrl-C twice (a
    human's two presses are tens of milliseconds apart at least; two signals closer than
    Python's handler can run are one). The process ends within seconds, no traceback."""
    proc = _chat_process(tmp_path)
    try:
        proc.stdin.write(b"The history of the Roman Empire begins\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the reply has started
        assert first
        time.sleep(0.2 + gap)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        proc.wait(timeout=20)
        assert time.time() - t0 < 10
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), stderr.decode()
    assert b"Traceback" not in stderr, stderr.decode()


def test_ctrl_c_while_the_command_is_still_starting_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "chronos_mlx.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    time.sleep(0.3)  # importing mlx / mlx_lm / transformers
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal")
    assert proc.returncode == 130 and b"Traceback" not in stderr, stderr.decode()


# --------------------------------------------------------------------------------------
# 3. integrity: chronos verify, --verify-experts
# --------------------------------------------------------------------------------------


def test_verify_records_a_manifest_once_then_checks_against_it(tmp_path, runner):
    model_dir = demo_copy(tmp_path / "m", copy_shard=True)
    first = runner.invoke(app, ["verify", str(model_dir), "--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["manifest_written"] and data["shards"][0]["source"] == "recorded"
    again = json.loads(runner.invoke(app, ["verify", str(model_dir), "--json"]).stdout)
    assert not again["manifest_written"] and again["shards"][0]["source"] == "manifest" and again["ok"]

    _change_same_size(model_dir / SHARD)
    bad = runner.invoke(app, ["verify", str(model_dir)])
    assert bad.exit_code == 1
    assert "MISMATCH" in bad.stdout and "do not match" in bad.stderr and "Traceback" not in bad.output
    manifest = Path(data["manifest"])
    before = manifest.read_bytes()
    runner.invoke(app, ["verify", str(model_dir)])
    assert manifest.read_bytes() == before  # a failed check never rewrites the manifest


def test_verify_checks_a_hugging_face_snapshot_against_its_blob_names(tmp_path, runner):
    import hashlib

    repo = tmp_path / "hub" / "models--demo--moe"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    data = (DEMO / SHARD).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (blobs / sha).write_bytes(data)
    for f in DEMO.iterdir():
        if f.name != SHARD and f.is_file():
            shutil.copy2(f, snap / f.name)
    (snap / SHARD).symlink_to(Path("../../blobs") / sha)
    result = runner.invoke(app, ["verify", str(snap), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards"][0]["source"] == "huggingface"

    blob = blobs / sha
    raw = bytearray(blob.read_bytes())
    raw[-5] ^= 1
    blob.write_bytes(bytes(raw))
    result = runner.invoke(app, ["verify", str(snap)])
    assert result.exit_code == 1 and "MISMATCH" in result.stdout


def test_verify_never_overwrites_a_file_that_is_not_a_manifest(tmp_path, runner):
    from chronos_mlx.verify import manifest_path

    model_dir = demo_copy(tmp_path / "m")
    target = manifest_path(model_dir)
    target.parent.mkdir(parents=True)
    target.write_text("precious")
    result = runner.invoke(app, ["verify", str(model_dir), "--update"])
    one_error_line(result, "not a chronos-mlx manifest")
    assert target.read_text() == "precious"


@pytest.mark.parametrize("corruption", ["flip-scale-bytes", "relabel-dtype"])
def test_verify_experts_catches_corrupt_expert_bytes_on_first_read(tmp_path, corruption):
    from chronos_mlx.verify import attach_verifier, expert_verifier

    model_dir = demo_copy(tmp_path / "m", copy_shard=True)
    expert_verifier(model_dir)  # manifest of the good file
    path = model_dir / SHARD
    n, header = read_header(path)
    name = "model.layers.5.mlp.switch_mlp.down_proj.scales"
    if corruption == "flip-scale-bytes":
        begin, end = header[name]["data_offsets"]
        per = (end - begin) // 64
        with open(path, "r+b") as f:  # expert 33's scales
            f.seek(8 + n + begin + 33 * per + 3)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x40]))
        wrong = 33
    else:
        assert header[name]["dtype"] in ("BF16", "F16")
        new = "F16" if header[name]["dtype"] == "BF16" else "BF16"

        def relabel(h):
            h[name]["dtype"] = new
            return h

        tmp = tmp_path / "relabelled"
        rewrite_header(path, tmp, relabel)
        os.replace(tmp, path)
        wrong = 0
    model, tok, rt = chronos_mlx.load(str(model_dir), expert_budget=0.125)
    verifier, _ = expert_verifier(model_dir)
    attach_verifier(rt, verifier)
    rt.cache.ensure(4, list(range(40, 48)))  # other layers' experts are fine
    if corruption == "flip-scale-bytes":
        rt.cache.ensure(5, [e for e in range(40, 48) if e != wrong])  # and so are other experts of this layer
    with pytest.raises(ShardError, match="does not match its hash"):
        rt.cache.ensure(5, [wrong] + list(range(50, 57)))
    cache_consistent(rt.cache)


def test_verify_experts_catches_a_corrupt_expert_in_a_recovery_of_several_layers(tmp_path):
    # A recovery loads every missed layer as one batch: a bad expert anywhere in it is refused
    # before anything is mapped, and no slot of any layer stays claimed.
    from chronos_mlx.verify import attach_verifier, expert_verifier

    model_dir = demo_copy(tmp_path / "m", copy_shard=True)
    expert_verifier(model_dir)
    path = model_dir / SHARD
    n, header = read_header(path)
    begin, end = header["model.layers.6.mlp.switch_mlp.up_proj.scales"]["data_offsets"]
    per = (end - begin) // 64
    with open(path, "r+b") as f:  # expert 20's scales in layer 6
        f.seek(8 + n + begin + 20 * per + 1)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    model, tok, rt = chronos_mlx.load(str(model_dir), expert_budget=0.125)
    verifier, _ = expert_verifier(model_dir)
    attach_verifier(rt, verifier)
    with pytest.raises(ShardError, match="does not match its hash"):
        rt.cache.ensure_layers({2: [1, 2, 3], 6: [19, 20, 21], 7: [5]})
    cache_consistent(rt.cache)
    assert rt.cache.ensure_layers({2: [1, 2, 3], 7: [5]}) == {2: [1, 2, 3], 7: [5]}  # the good ones load
    cache_consistent(rt.cache)


def test_verify_experts_on_the_cli_gives_stock_tokens_and_refuses_dense_models(runner, stock):
    result = runner.invoke(app, ["generate", "-p", PROMPT, "-n", "6", "-b", "0.125", "--verify-experts", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_ids"] == stock_greedy(stock, PROMPT, 6)


# --------------------------------------------------------------------------------------
# 4. every user error: one line, exit code 2
# --------------------------------------------------------------------------------------


def _config(**changes):
    def setup(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return setup


def _header(mutate):
    def setup(d):
        (d / SHARD).unlink()
        rewrite_header(DEMO / SHARD, d / SHARD, mutate)
    return setup


def _offsets_as(kind):
    def mutate(h):
        name = first_tensor(h)
        h[name]["data_offsets"] = [kind(x) for x in h[name]["data_offsets"]]
        return h
    return mutate


def _shape_as_string(h):
    name = first_tensor(h)
    h[name]["shape"] = str(h[name]["shape"])
    return h


def _dtype_as_number(h):
    h[first_tensor(h)]["dtype"] = 5
    return h


def _weight_map_list(d):
    data = json.loads((d / "model.safetensors.index.json").read_text())
    data["weight_map"] = list(data["weight_map"])
    (d / "model.safetensors.index.json").write_text(json.dumps(data))


def _write(name, content):
    def setup(d):
        (d / name).write_bytes(content)
    return setup


def _remove(name):
    def setup(d):
        (d / name).unlink()
    return setup


MODEL_CASES = [
    ("top-k-zero", _config(num_experts_per_tok=0), "'num_experts_per_tok' is 0"),
    ("top-k-string", _config(num_experts_per_tok="8"), "'num_experts_per_tok' is '8'"),
    ("top-k-above-experts", _config(num_experts_per_tok=65), "larger than the number of experts"),
    ("config-not-json", _write("config.json", b"{nope"), "config.json is not valid JSON"),
    ("config-not-utf8", _write("config.json", b"\xff\xfe{}"), "not UTF-8"),
    ("weight-map-list", _weight_map_list, "'weight_map' must be an object"),
    ("offsets-strings", _header(_offsets_as(str)), "malformed data_offsets"),
    ("offsets-floats", _header(_offsets_as(float)), "malformed data_offsets"),
    ("shape-string", _header(_shape_as_string), "malformed shape"),
    ("dtype-number", _header(_dtype_as_number), "unknown dtype 5"),
    ("tokenizer-missing", _remove("tokenizer.json"), "no tokenizer"),
    ("tokenizer-corrupt", _write("tokenizer.json", b'{"model": '), "tokenizer.json is not valid JSON"),
    ("tokenizer-config-corrupt", _write("tokenizer_config.json", b"\x00\x01"), "tokenizer_config.json is not valid JSON"),
]


@pytest.mark.parametrize("setup, fragment", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_a_broken_model_directory_is_one_error_line(tmp_path, runner, setup, fragment):
    model_dir = demo_copy(tmp_path / "m")
    setup(model_dir)
    one_error_line(runner.invoke(app, ["generate", "-m", str(model_dir), "-p", PROMPT, "-n", "2", "-b", "1.0"]), fragment)


@pytest.mark.parametrize("name", [SHARD, "model.safetensors.index.json", "tokenizer.json", "config.json"])
def test_an_unreadable_model_file_is_one_error_line(tmp_path, runner, monkeypatch, name):
    model_dir = demo_copy(tmp_path / "m")
    deny(monkeypatch, model_dir / name)
    one_error_line(runner.invoke(app, ["generate", "-m", str(model_dir), "-p", PROMPT, "-n", "2", "-b", "1.0"]),
                   "Permission denied")


def _bad_profile(tmp_path, mutate, name="bad"):
    src = json.loads((Path(chronos_mlx.__file__).parent.parent / "profiles" / "english.json").read_text())
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(mutate(src)))
    return path


def _set(key, value):
    def mutate(d):
        d[key] = value
        return d
    return mutate


def _huge_count(d):
    d["counts"][0][0] = 1e30
    return d


CLI_CASES = [
    ("empty-model", ["info", ""], None, "--model is empty"),
    ("empty-model-generate", ["generate", "-m", "", "-p", PROMPT], None, "--model is empty"),
    ("io-sim-bad-number", ["generate", "-p", PROMPT, "--io-sim", "bandwidth=1.2.3GB/s"], None, "cannot parse bandwidth"),
    ("seed-negative", ["generate", "-p", PROMPT, "--seed", "-1"], None, "--seed"),
    ("seed-not-a-number", ["chat", "--seed", "x"], None, "--seed"),
    ("unknown-option", ["generate", "--bogus"], None, "No such option: --bogus"),
    ("bad-choice", ["generate", "-p", PROMPT, "--dtype", "float8"], None, "--dtype"),
    ("unknown-command", ["genrate"], None, "No such command"),
    ("missing-required", ["profile", "record", "--name", "x"], None, "--prompts"),
    ("bad-budget", ["generate", "-p", PROMPT, "-b", "abc"], None, "cannot parse expert budget 'abc'"),
    ("bad-predictor", ["generate", "-p", PROMPT, "--predictor", "oracle"], None, "unknown predictor 'oracle'"),
    ("missing-profile", ["generate", "-p", PROMPT, "--profile", "no-such-profile"], None, "no profile named"),
    ("non-utf8-stdin", ["generate", "--prompt-file", "-"], b"\xff\xfeabc", "not valid UTF-8"),
    ("bench-repeats-0", ["bench", "--repeats", "0"], None, "--repeats"),
    ("bench-prompts-0", ["bench", "--prompts", "0"], None, "--prompts"),
    ("bench-max-tokens-0", ["bench", "--max-tokens", "0"], None, "--max-tokens"),
    ("bench-json-is-dir", ["bench", "--json", "{tmp}"], None, "is a directory"),
    ("bench-json-no-dir", ["bench", "--json", "{tmp}/no/such/dir/out.json"], None, "does not exist"),
    ("profile-name-300", ["profile", "record", "--name", "a" * 300, "--prompts", "en"], None, "at most 100"),
    ("profile-name-path", ["profile", "record", "--name", "../x", "--prompts", "en"], None, "invalid profile name"),
    ("profile-prompts-number", ["profile", "record", "--name", "x", "--prompts", "{prompts_number}"], None, "non-empty 'prompt' string"),
    ("profile-prompts-null", ["profile", "record", "--name", "x", "--prompts", "{prompts_null}"], None, "non-empty 'prompt' string"),
    ("profile-prompts-list", ["profile", "record", "--name", "x", "--prompts", "{prompts_list}"], None, "non-empty 'prompt' string"),
    ("profile-out-not-ours", ["profile", "record", "--name", "x", "--prompts", "en", "--out", "{precious}"], None, "not overwriting"),
    ("profile-out-shard", ["profile", "record", "--name", "x", "--prompts", "en", "--out", "{shard}"], None, "not overwriting"),
    ("profile-huge-count", ["generate", "-p", PROMPT, "--profile", "{huge}"], None, "not a count"),
    ("profile-negative-version", ["profile", "show", "{negver}"], None, "version -1"),
    ("profile-path-name", ["profile", "show", "{pathname}"], None, "name '../../etc/passwd'"),
    ("pack-out-under-a-file", ["pack", "--profile", "english", "--out", "{precious}/sub"], None, "not a directory"),
]


@pytest.mark.parametrize("args, stdin, fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_user_errors_are_one_line_and_exit_code_2(tmp_path, runner, args, stdin, fragment):
    files = {"tmp": tmp_path}
    for key, content in (("prompts_number", '{"prompt": 5}'), ("prompts_null", '{"prompt": null}'),
                         ("prompts_list", '{"prompt": ["a"]}')):
        files[key] = tmp_path / f"{key}.jsonl"
        files[key].write_text(content + "\n")
    files["precious"] = tmp_path / "precious.txt"
    files["precious"].write_text("not a profile")
    shard = demo_copy(tmp_path / "m", copy_shard="{shard}" in args) / SHARD
    files["shard"] = shard
    files["huge"] = _bad_profile(tmp_path, _huge_count)
    files["negver"] = _bad_profile(tmp_path, _set("version", -1), "negver")
    files["pathname"] = _bad_profile(tmp_path, _set("name", "../../etc/passwd"), "pathname")
    before = os.stat(shard, follow_symlinks=False)
    args = [a.format(**files) for a in args]
    one_error_line(runner.invoke(app, args, input=stdin), fragment)
    assert files["precious"].read_text() == "not a profile"
    after = os.stat(shard, follow_symlinks=False)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)


def test_missing_optional_packages_are_one_error_line(tmp_path, runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    one_error_line(runner.invoke(app, ["bench", "--png", str(tmp_path / "x.png")]), "needs matplotlib")
    monkeypatch.setitem(sys.modules, "networkx", None)
    one_error_line(runner.invoke(app, ["pack", "--profile", "english", "--out", str(tmp_path / "o")]), "needs networkx")
    assert not (tmp_path / "o").exists()


def test_a_second_recording_of_the_same_profile_is_refused_at_once(tmp_path, runner):
    from chronos_mlx.profiles import profile_path_for, recording_lock

    with recording_lock(profile_path_for("busy")):
        result = runner.invoke(app, ["profile", "record", "--name", "busy", "--prompts", "en", "--limit", "1"])
    one_error_line(result, "another `chronos profile record` is writing")
    assert not profile_path_for("busy").exists()


def test_profile_list_survives_a_profile_with_a_huge_count(tmp_path, runner):
    d = tmp_path / "profiles"
    d.mkdir()
    shutil.move(_bad_profile(tmp_path, _huge_count), d / "huge.json")
    result = runner.invoke(app, ["profile", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert "not a count" in rows["huge"]["error"]


def test_chat_profile_save_to_an_unwritable_place_keeps_the_chat_going(tmp_path, runner, monkeypatch):
    blocker = tmp_path / "profiles"
    blocker.write_text("a file where the profile directory should be")
    result = runner.invoke(app, ["chat", "-b", "0.25", "-n", "3"], input="The Roman\n/profile save mine\nGo on\n/quit\n")
    assert result.exit_code == 0, result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "profile" in errors[0]
    assert result.stderr.count("tokens ·") == 2  # both turns ran


def test_chat_skips_a_non_utf8_line_and_keeps_the_conversation(runner):
    result = runner.invoke(app, ["chat", "-b", "1.0", "-n", "3"], input=b"The Roman\n\xff\xfe\nGo on\n")
    assert result.exit_code == 0, result.output
    assert "not valid UTF-8" in result.stderr and result.stderr.count("tokens ·") == 2


@pytest.mark.parametrize("option", [["--profile", "english"], ["--predictor", "gate"], ["--verify-experts"]])
def test_a_dense_model_refuses_options_it_would_ignore(tmp_path, runner, option):
    try:
        from synthetic import write_synthetic_moe
    except ImportError:
        from chronos_mlx.synthetic import write_synthetic_moe
    dense = write_synthetic_moe(tmp_path / "llama", "llama", bits=4)
    one_error_line(runner.invoke(app, ["generate", "-m", str(dense), "-p", PROMPT, "-n", "1", *option]), "no MoE layers")


def test_demo_means_the_local_directory_when_there_is_one(tmp_path, runner, monkeypatch):
    local = demo_copy(tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["info", "demo", "--json"])
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["path"]).resolve() == local.resolve()
    monkeypatch.chdir(tmp_path / "demo")  # no ./demo here: the embedded demo model
    result = runner.invoke(app, ["info", "demo", "--json"])
    assert Path(json.loads(result.stdout)["path"]).resolve() == DEMO.resolve()


def test_profile_record_out_replaces_only_a_profile(tmp_path, runner):
    out = tmp_path / "p.json"
    prompts = tmp_path / "short.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    for _ in range(2):  # the second run replaces the first one's profile: that is ours
        result = runner.invoke(app, ["profile", "record", "--name", "p", "--prompts", str(prompts), "-n", "2",
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["format"] == "chronos-mlx-profile"


def test_bench_json_is_written_atomically_and_a_write_error_keeps_the_table(tmp_path, runner, monkeypatch):
    from chronos_mlx.profiles import atomic_write_text as real
    import chronos_mlx.profiles as profiles

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profiles, "atomic_write_text", full_disk)
    result = runner.invoke(app, ["bench", "--only", "chronos-lru", "--budgets", "0.5", "--prompts", "1", "--repeats", "1",
                                 "--warmup", "0", "--max-tokens", "2", "--json", str(tmp_path / "r.json")])
    one_error_line(result, "No space left on device")
    assert "decode tok/s" in result.stdout  # the run's table was printed before


# --------------------------------------------------------------------------------------
# 5. chat: the conversation is exactly what the model produced
# --------------------------------------------------------------------------------------


def test_multi_turn_plain_chat_equals_generate_on_the_exact_conversation_text(runner, stock):
    turns = ["The Roman Empire", "and then the"]
    chat = runner.invoke(app, ["chat", "-b", "0.25", "-n", "8", "--no-chat-template"], input="\n".join(turns) + "\n")
    assert chat.exit_code == 0, chat.output
    replies = chat.stdout.splitlines()
    assert len(replies) == 2, chat.stdout

    # The conversation after turn 1 is the user's text followed by the model's tokens,
    # decoded in context: it keeps the reply's leading space.
    _, tokenizer = stock
    first = stock_greedy(stock, turns[0], 8)
    ids = tokenizer.encode(turns[0])
    text1 = tokenizer.decode(ids + first)
    assert text1.startswith(turns[0] + " ")
    conversation = text1 + "\n" + turns[1]
    gen = runner.invoke(app, ["generate", "-b", "0.25", "-n", "8", "--no-chat-template", "-p", conversation])
    assert gen.exit_code == 0, gen.output
    assert replies[1] == gen.stdout.rstrip("\n")
    assert replies[1] == stock_text(stock, stock_greedy(stock, conversation, 8))




def test_pack_that_fails_at_the_end_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    import chronos_mlx.pack as K

    def disk_full(*a, **k):
        raise ProfileError("disk full (simulated)")

    monkeypatch.setattr(K, "save_profile", disk_full)
    with pytest.raises(ProfileError):
        K.pack(None, "english", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()  # without it the directory is not a model
