"""The `chronos` command line, driven the way a user drives it, on the embedded demo model.

Exactness is always checked against stock mlx_lm (never against chronos itself): the
reference tokens come from `mlx_lm.load` + float32 + `mlx_lm.generate.generate_step`.
"""

import importlib
import json
import os
import signal

import mlx.core as mx
import pytest
from typer.testing import CliRunner

import chronos_mlx
from chronos_mlx.cli import common as cli
from chronos_mlx.cli import app
from conftest import stock_text

PROMPT = "The Roman Empire"
REQUIRED_STATS = (
    "decode_tokens_per_s",
    "ttft_s",
    "hits",
    "misses",
    "hit_rate",
    "bytes_read",
    "stall_s",
    "peak_memory_bytes",
    "host_syncs_per_token",
    "recomputed_layers",
)


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def stock():
    """Stock mlx_lm on the demo model, in float32 like chronos on the CPU backend."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(chronos_mlx.DEFAULT_MODEL))
    model.set_dtype(mx.float32)
    return model, tokenizer


def stock_greedy(stock, text: str, max_tokens: int, logits_processors=None) -> list:
    """mlx_lm's greedy tokens for `text`, up to (not including) end of sequence."""
    from mlx_lm.generate import generate_step

    model, tokenizer = stock
    ids = tokenizer.encode(text, add_special_tokens=tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token))
    tokens = []
    steps = generate_step(mx.array(ids), model, max_tokens=max_tokens, logits_processors=logits_processors)
    for (token, _), _ in zip(steps, range(max_tokens)):
        token = int(token)
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    return tokens




def run_json(runner, *args):
    result = runner.invoke(app, ["generate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- generate ------------------------------------------------------------------------


def test_generate_json_prints_one_object_with_text_tokens_stats_and_model(runner):
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "8", "--expert-budget", "0.25")

    assert isinstance(data["text"], str) and data["text"]
    assert len(data["token_ids"]) == 8 and all(isinstance(t, int) for t in data["token_ids"])
    for key in REQUIRED_STATS:
        assert key in data["stats"], key
    assert "per_layer" not in data["stats"]  # only with --verbose
    assert data["stats"]["generated_tokens"] == 8
    assert data["stats"]["slots_per_layer"] == 16
    assert data["model"]["num_experts"] == 64


def test_generate_json_verbose_adds_per_layer_counters(runner):
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "2", "--verbose")
    assert len(data["stats"]["per_layer"]) == 8


@pytest.mark.parametrize("flag", ["--expert-budget", "--budget", "-b"])
def test_the_budget_has_a_short_name_too(runner, flag):
    """`--budget` (what `chronos bench --budgets` suggests) and `-b` mean `--expert-budget`."""
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "2", flag, "0.25")
    assert data["stats"]["slots_per_layer"] == 16  # a quarter of the demo's 64 experts


def test_generate_json_tokens_at_smallest_budget_are_stock_mlx_lms(runner, stock):
    """8 of 64 experts per layer: almost every token misses and is recomputed, yet the
    tokens are exactly mlx_lm's greedy tokens."""
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "8", "--expert-budget", "0.125")

    assert data["token_ids"] == stock_greedy(stock, PROMPT, 8)
    assert data["stats"]["misses"] > 0


def test_a_repetition_penalty_gives_stock_mlx_lms_penalised_tokens(runner, stock):
    from mlx_lm.sample_utils import make_logits_processors

    want = stock_greedy(stock, PROMPT, 12, make_logits_processors(repetition_penalty=1.5))
    assert want != stock_greedy(stock, PROMPT, 12)  # it changes the text here
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "12", "-b", "0.25", "--repetition-penalty", "1.5")
    assert data["token_ids"] == want


@pytest.mark.parametrize("flags", [["--top-k", "1"], ["--min-p", "1.0"], ["--top-p", "0.0001", "--top-k", "1"]])
def test_sampling_filters_are_mlx_lms(runner, stock, flags):
    """Sampling at a high temperature among one candidate (top-k 1, or min-p 1: only the
    likeliest token) is greedy decoding: stock's greedy tokens."""
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "6", "-b", "0.25", "--temp", "2.0", "--seed", "3", *flags)
    assert data["token_ids"] == stock_greedy(stock, PROMPT, 6)


def test_generate_per_layer_sync_gives_the_same_tokens(runner, stock):
    data = run_json(runner, "-p", PROMPT, "--max-tokens", "6", "-b", "0.125", "--sync", "per-layer")
    assert data["token_ids"] == stock_greedy(stock, PROMPT, 6)


def test_generate_streams_text_to_stdout_and_a_summary_to_stderr(runner, stock):
    result = runner.invoke(app, ["generate", "-p", PROMPT, "--max-tokens", "8", "-b", "0.25"])

    assert result.exit_code == 0, result.output
    assert result.stdout == stock_text(stock, stock_greedy(stock, PROMPT, 8)).rstrip("\n") + "\n"
    summary = result.stderr.strip().splitlines()[-1]
    for part in ("tok/s", "TTFT", "hit rate", "read", "peak"):
        assert part in summary


def test_generate_reads_the_prompt_from_a_file(runner, tmp_path, stock):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    data = run_json(runner, "--prompt-file", str(prompt_file), "--max-tokens", "4")
    assert data["token_ids"] == stock_greedy(stock, PROMPT, 4)


def test_a_prompt_of_dash_is_read_from_stdin_as_mlx_lm_reads_it(runner, stock):
    result = runner.invoke(app, ["generate", "-p", "-", "--max-tokens", "4", "--json"], input=PROMPT)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_ids"] == stock_greedy(stock, PROMPT, 4)


def test_ctrl_c_stops_generate_after_the_current_token(runner, monkeypatch):
    pieces = []

    def write_then_interrupt(text):
        pieces.append(text)
        if len(pieces) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    monkeypatch.setattr(cli, "_write", write_then_interrupt)
    result = runner.invoke(app, ["generate", "-p", PROMPT, "--max-tokens", "50"])

    assert result.exit_code == 130
    assert "[interrupted]" in result.stderr
    assert len(pieces) <= 3  # two tokens and the closing newline
    assert "Traceback" not in result.output


# --- info ----------------------------------------------------------------------------


def test_info_json_describes_the_demo_model(runner):
    result = runner.invoke(app, ["info", "--json"])

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["moe"] is True
    assert (info["num_experts"], info["top_k"], info["moe_layers"], info["num_hidden_layers"]) == (64, 8, 8, 8)
    assert info["expert_bytes_total"] == info["bytes_per_expert"] * 64 * 8
    assert info["bytes_per_expert_on_disk"] > 0 and info["dense_bytes"] > 0
    budgets = {row["budget"]: row for row in info["budgets"]}
    assert [budgets[b]["experts_per_layer"] for b in ("1.0", "0.5", "0.25", "0.125")] == [64, 32, 16, 8]
    assert budgets["0.125"]["minimum"]  # top_k / num_experts = 8 / 64
    assert budgets["0.25"]["expert_bytes"] == 16 * 8 * info["bytes_per_expert"]


def test_info_prints_a_readable_summary_and_budget_table(runner):
    result = runner.invoke(app, ["info"])

    assert result.exit_code == 0, result.output
    for text in ("qwen3_moe", "8 (8 MoE)", "64, top-8", "on disk", "dense weights", "0.125 (minimum)", "MB"):
        assert text in result.stdout, text


def test_info_accepts_the_model_as_argument(runner):
    result = runner.invoke(app, ["info", str(chronos_mlx.DEFAULT_MODEL), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_experts"] == 64


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """A tiny random-weight llama: a model without MoE layers."""
    from synthetic import write_synthetic_moe

    return write_synthetic_moe(tmp_path_factory.mktemp("dense") / "llama", "llama", bits=4)


def test_info_says_when_a_model_has_no_moe_layers(runner, dense_model):
    result = runner.invoke(app, ["info", str(dense_model)])
    assert result.exit_code == 0, result.output
    assert "no MoE layers" in result.stdout

    info = json.loads(runner.invoke(app, ["info", str(dense_model), "--json"]).stdout)
    assert info["moe"] is False and info["moe_layers"] == 0 and "budgets" not in info


def test_generate_runs_a_dense_model_unchanged_with_a_notice_on_stderr(runner, dense_model):
    result = runner.invoke(app, ["generate", "-m", str(dense_model), "-p", PROMPT, "--max-tokens", "3", "--json"])

    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["token_ids"]) == 3
    assert "no MoE layers" in result.stderr


# --- verify --tokens ------------------------------------------------------------------


def test_verify_tokens_compares_with_stock_mlx_lm_on_this_machine(runner):
    result = runner.invoke(app, ["verify", "--tokens", "--budgets", "0.25", "--routing", "optimistic",
                                 "-p", "Once upon a time", "--max-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and [c["exact"] for c in report["checks"]] == [True]

    table = runner.invoke(app, ["verify", "--tokens", "--budgets", "0.25", "--routing", "per-layer",
                                "-p", "Once upon a time", "--max-tokens", "3"])
    assert table.exit_code == 0 and "identical (3 tokens)" in table.stdout


def test_verify_tokens_checks_the_prefetches_a_predictor_drives_too(runner):
    result = runner.invoke(app, ["verify", "--tokens", "--budgets", "0.25", "--routing", "per-layer", "--predictor",
                                 "gate", "-p", "Once upon a time", "--max-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["predictor"] == "gate"
    bad = runner.invoke(app, ["verify", "--tokens", "--predictor", "oracle", "--max-tokens", "1"])
    assert bad.exit_code == 2 and "unknown predictor 'oracle'" in bad.stderr and "Traceback" not in bad.output


def test_verify_tokens_exits_1_and_says_so_when_a_token_differs(runner, monkeypatch):
    from chronos_mlx import generate

    real = generate.generate_step
    monkeypatch.setattr(generate, "generate_step",
                        lambda *a, **k: ((t + 1, lp) for t, lp in real(*a, **k)))
    result = runner.invoke(app, ["verify", "--tokens", "--budgets", "0.5", "--routing", "optimistic",
                                 "-p", "Once upon a time", "--max-tokens", "2"])
    assert result.exit_code == 1
    assert "DIFFERS at token 0" in result.stdout
    assert "1 of 1 check(s) differ from stock mlx_lm" in result.stderr and "Traceback" not in result.output


def test_verify_tokens_says_when_stock_itself_is_not_deterministic(runner, monkeypatch):
    stock = importlib.import_module("mlx_lm.generate")  # `from mlx_lm import generate` is the function

    real, calls = stock.generate_step, []

    def parts_at_token_2_every_second_run(*a, **k):
        calls.append(1)
        return ((t + (len(calls) % 2 == 0 and i == 2), lp) for i, (t, lp) in enumerate(real(*a, **k)))

    monkeypatch.setattr(stock, "generate_step", parts_at_token_2_every_second_run)
    result = runner.invoke(app, ["verify", "--tokens", "--budgets", "0.5", "--routing", "optimistic",
                                 "-p", "Once upon a time", "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "identical for the 2 of 4 tokens stock repeats" in result.stdout
    assert "note:" in result.stderr and "stock mlx_lm itself decoded different tokens" in result.stderr


def test_verify_tokens_rejects_a_budget_outside_0_1_in_one_line(runner):
    result = runner.invoke(app, ["verify", "--tokens", "--budgets", "2"])
    assert result.exit_code == 2
    assert "--budgets takes fractions in (0, 1]" in result.stderr and "Traceback" not in result.output


# --- chat ----------------------------------------------------------------------------


def test_chat_with_piped_input_runs_a_turn_and_the_commands(runner):
    result = runner.invoke(
        app, ["chat", "--max-tokens", "8", "-b", "0.25"], input="hello\n/stats\n/reset\n/help\n/quit\nnever read\n"
    )

    assert result.exit_code == 0, result.output
    assert "demo-moe-4bit" in result.stderr and "16 experts/layer" in result.stderr  # banner
    assert "runtime stats" in result.stdout and "hit_rate" in result.stdout  # /stats
    assert "None" not in result.stdout  # what was not measured shows as "-"
    assert "cleared" in result.stderr  # /reset
    assert "/quit" in result.stdout  # /help
    assert result.stderr.count("8 tokens") == 1  # one turn ran; "never read" was not


def test_chat_ends_cleanly_at_end_of_input(runner):
    result = runner.invoke(app, ["chat", "--max-tokens", "2"], input="hello\n")
    assert result.exit_code == 0, result.output


def test_chat_on_a_sliding_window_model_equals_stock_once_the_window_wrapped(runner, tmp_path):
    """A wrapped window cannot be trimmed back exactly: the chat then feeds the whole
    conversation again rather than continue from entries that are gone."""
    import mlx_lm
    from synthetic import write_synthetic_moe

    path = write_synthetic_moe(tmp_path / "oss", "gpt_oss", bits=4, seed=9)  # sliding window of 8 tokens
    model, tokenizer = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    turns = ["The quick brown fox jumps over the lazy dog", "Then the dog barks at the fox", "And both sleep"]
    expected, conversation = "", ""
    for message in turns:
        if conversation and not conversation.endswith("\n"):
            conversation += "\n"
        conversation += message
        tokens = stock_greedy((model, tokenizer), conversation, 6)
        shown = stock_text((model, tokenizer), tokens)
        conversation = tokenizer.decode(tokenizer.encode(conversation) + tokens)
        expected += shown if shown.endswith("\n") else shown + "\n"

    result = runner.invoke(app, ["chat", "-m", str(path), "--max-tokens", "6", "-b", "0.5"], input="\n".join(turns) + "\n")

    assert result.exit_code == 0, result.output
    assert result.stdout == expected


def test_chat_turns_equal_stock_mlx_lm_on_the_whole_conversation(runner, stock):
    """Without a chat template the turns are joined as plain text (a newline between a reply
    and the next message); each reply, computed from the reused KV cache, is mlx_lm's greedy
    continuation of the whole conversation so far. The conversation holds each reply as the
    model produced it (decoded in context, leading space included); the screen shows the
    streamed text."""
    tokenizer = stock[1]
    turns = [PROMPT, "was a", "def main():"]
    expected, conversation = "", ""
    for message in turns:
        if conversation and not conversation.endswith("\n"):
            conversation += "\n"
        conversation += message
        tokens = stock_greedy(stock, conversation, 6)
        shown = stock_text(stock, tokens)
        ids = tokenizer.encode(conversation)
        conversation = tokenizer.decode(ids + tokens)  # = conversation + the reply, in context
        expected += shown if shown.endswith("\n") else shown + "\n"

    result = runner.invoke(app, ["chat", "--max-tokens", "6", "-b", "0.25"], input="\n".join(turns) + "\n")

    assert result.exit_code == 0, result.output
    assert result.stdout == expected


def test_ctrl_c_during_a_chat_reply_stops_it_and_the_chat_goes_on(runner, monkeypatch):
    pieces = []
    real_write = cli._write

    def write_then_interrupt(text):
        pieces.append(text)
        real_write(text)
        if len(pieces) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli, "_write", write_then_interrupt)
    result = runner.invoke(app, ["chat", "--max-tokens", "20"], input=f"{PROMPT}\nand\n/quit\n")

    assert result.exit_code == 0, result.output
    assert result.stderr.count("[interrupted]") == 1
    assert "2 tokens" in result.stderr and "20 tokens" in result.stderr  # second turn ran in full


# --- user errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-p", PROMPT, "-m", "{missing}"], "no such model directory"),
        (["info", "{missing}"], "no such model directory"),
        (["chat", "-m", "{missing}"], "no such model directory"),
        (["generate", "-p", PROMPT, "--expert-budget", "0.01"], "one token uses 8 per layer"),
        (["generate", "-p", PROMPT, "--expert-budget", "lots"], "cannot parse expert budget 'lots'"),
        (["generate", "-p", PROMPT, "--prompt-file", "{prompt_file}"], "exactly one of"),
        (["generate"], "exactly one of"),
        (["generate", "--prompt-file", "{missing}"], "no such prompt file"),
        (["generate", "-p", PROMPT, "--chat-template"], "no chat template"),
        (["generate", "-p", PROMPT, "--sync", "device-wait"], "needs MLX's CUDA backend"),  # this box: CPU
        (["generate", "-p", PROMPT, "--sync", "device-fetch"], "needs MLX's CUDA backend"),
    ],
)
def test_user_errors_are_one_error_line_and_exit_code_2(runner, tmp_path, args, message):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    args = [a.format(missing=tmp_path / "missing", prompt_file=prompt_file) for a in args]

    result = runner.invoke(app, args)

    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


# --- help ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_every_command_explains_itself_with_an_example(runner, command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout and f"chronos {command}" in result.stdout


def test_sizes_are_human_readable():
    assert cli.human_bytes(42_500_000) == "42.5 MB"
    assert cli.human_bytes(512) == "512 B"
    assert cli.human_bytes(6 * 10**9) == "6.0 GB"


@pytest.mark.parametrize("failure", ["gave up", "shard gone"])
def test_a_device_wait_step_that_fails_is_one_error_line_not_a_traceback(runner, monkeypatch, failure):
    """Device-wait (CUDA) refuses a step whose layer stopped waiting, or whose loads failed:
    the command says so in one line (a vanished shard as the other routings say it)."""
    import numpy as np

    from chronos_mlx import device_wait, wait_kernels
    from chronos_mlx.errors import ShardError

    if wait_kernels.available():
        pytest.skip("on CUDA the real kernel runs; this drives the host stand-in")
    monkeypatch.setattr(device_wait, "available", lambda: True)
    real = device_wait.DeviceWaiter

    class Failing(real):
        def __init__(self, runtime):
            box = device_wait.Mailbox.host()
            ask = device_wait.host_kernel(box)

            def kernel(ids, table, mailbox, layer, tag=None, always=False, pull=False, **kw):
                if failure == "gave up" and int(np.array(layer)[0]) == 3:
                    box.words[device_wait.GAVE_UP] += 1
                    return table[ids]
                return ask(ids, table, mailbox, layer, tag, always, pull, **kw)

            super().__init__(runtime, mailbox=box, kernel=kernel)
            if failure == "shard gone":
                def gone(*a, **k):
                    raise ShardError("model.safetensors: the file is gone")
                self.service._handle = gone

    monkeypatch.setattr(device_wait, "DeviceWaiter", Failing)
    result = runner.invoke(app, ["generate", "-p", PROMPT, "--max-tokens", "8", "-b", "0.25", "--sync", "device-wait"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert ("stopped waiting" if failure == "gave up" else "the file is gone") in result.output


def test_device_fetch_that_cannot_copy_the_experts_as_they_are_is_one_error_line(runner, monkeypatch):
    """On a GPU, a model loaded in another dtype than its checkpoint's (here the demo's bf16 scales
    as float32): device-fetch says why and what to use instead, no traceback."""
    from chronos_mlx import device_wait

    monkeypatch.setattr(device_wait, "available", lambda: True)
    result = runner.invoke(app, ["generate", "-p", PROMPT, "--max-tokens", "4", "-b", "0.5", "--sync", "device-fetch",
                                 "--dtype", "float32"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "as they are on disk" in result.output and "--sync device-wait" in result.output


# --- system prompt and chat template arguments ----------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The demo's weights with a tokenizer that has a chat template (tests/synthetic.py)."""
    from synthetic import write_chat_model

    path = write_chat_model(tmp_path_factory.mktemp("chat") / "model", thinking=False)
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    return path, model, tokenizer


def _stock_ids(model, ids, n):
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def test_a_system_prompt_and_template_arguments_reach_the_chat_template(runner, chat_model):
    path, model, tok = chat_model
    messages = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, preamble="Be brief.")
    data = run_json(runner, "-m", str(path), "-p", PROMPT, "--max-tokens", "6", "-b", "0.25",
                    "--system-prompt", "Answer in one line.", "--chat-template-config", '{"preamble": "Be brief."}')
    assert data["stats"]["prompt_tokens"] == len(ids)
    want = _stock_ids(model, ids, 6)
    assert data["token_ids"] == [t for t in want[: len(data["token_ids"])]] and data["token_ids"]


def test_chat_keeps_its_system_prompt_through_a_reset(runner, chat_model):
    path, model, tok = chat_model
    result = runner.invoke(app, ["chat", "-m", str(path), "--max-tokens", "4", "-b", "0.25", "--system-prompt",
                                 "Answer in one line."], input="Hello\n/reset\nHello\n/quit\n")
    assert result.exit_code == 0, result.output
    ids = tok.apply_chat_template([{"role": "system", "content": "Answer in one line."},
                                   {"role": "user", "content": "Hello"}], add_generation_prompt=True)
    reply = tok.decode(_stock_ids(model, ids, 4))
    assert result.stdout.count(reply.strip()) == 2  # the same first turn before and after /reset


@pytest.mark.parametrize("config,fragment", [("{nope", "not valid JSON"), ("[1]", "must be a JSON object")])
def test_a_bad_template_config_is_a_clear_error_before_loading(runner, config, fragment):
    result = runner.invoke(app, ["generate", "-p", "x", "--chat-template-config", config])
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.output


def test_a_thinking_models_reasoning_is_dimmed_and_its_tool_calls_get_a_line(tmp_path):
    """chat's printer on a tokenizer with think and tool-call markers (mlx_lm's json_tools)."""
    from mlx_lm import load
    from rich.console import Console
    from synthetic import write_chat_model

    from chronos_mlx.cli.chat import ReplyPrinter

    _, tok = load(str(write_chat_model(tmp_path / "thinking", thinking=True)))
    console = Console(record=True, force_terminal=True, color_system="standard", width=200)
    printer = ReplyPrinter(tok, tok.encode("user: Weather?", add_special_tokens=False), console=console)
    for piece in ["Let me ", "<thi", "nk>plan it</th", "ink>Sure. ",
                  '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>']:
        printer.write(piece)
    printer.finish("stop")
    assert console.export_text(clear=False) == 'Let me plan itSure. \n-> weather({"city": "Rome"})\n'
    assert "\x1b[2mplan it" in console.export_text(styles=True)  # dim
    assert printer.ended_line


def test_a_bounded_kv_cache_gives_stock_mlx_lms_tokens_with_the_same_bound(runner, stock):
    """--max-kv-size 16 with a longer prompt: mlx_lm's rotating cache, older tokens fall out;
    stock with the same bound gives the same tokens (and not those of an unbounded cache)."""
    from mlx_lm.generate import generate_step

    model, tok = stock
    text = "The history of the Roman Empire begins with the founding of the city and the kings who ruled it"
    ids = tok.encode(text)
    assert len(ids) > 16
    want = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=10, max_kv_size=16)]
    data = run_json(runner, "-p", text, "--max-tokens", "10", "-b", "0.25", "--max-kv-size", "16", "--no-chat-template")
    assert data["token_ids"] == [t for t in want if t not in tok.eos_token_ids][: len(data["token_ids"])]
    assert data["token_ids"] != stock_greedy(stock, text, 10)
