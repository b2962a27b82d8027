"""The `chronos` command line: a thin typer + rich layer over `chronos_mlx.load` and its decode loop.

Commands: `generate` (one completion, streamed or as JSON), `chat` (a REPL that keeps the
conversation and its KV cache), `info` (what a model is and what budgets mean for it).

Conventions:
- Generated text goes to stdout; everything else (notices, summaries, spinners) to stderr,
  so `chronos generate ... > out.txt` captures only the text and `--json` prints exactly
  one JSON object on stdout.
- User errors (`ChronosError`: bad model, budget, shard, profile, options) end the command
  with one red `error: <message>` line on stderr and exit code 2, never a traceback.
- The options that say how to load a model are declared once (`LOAD_OPTIONS`) and turned
  into `chronos_mlx.load` keyword arguments in one place (`LoadOptions.load_kwargs`): a new
  option is one entry there plus one dataclass field.
"""

import functools
import inspect
import json
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.prompt import Prompt
from rich.table import Table

from .errors import ChronosError
from .generate import SYNC_MODES
from .loader import DEFAULT_MODEL, DTYPES
from .policy import POLICIES

out = Console(highlight=False)  # stdout: what the user asked for (tables, JSON is written raw)
err = Console(stderr=True, highlight=False)  # stderr: notices, progress, summaries, errors

app = typer.Typer(
    name="chronos",
    help=(
        "Run Mixture-of-Experts models whose experts do not fit in memory: expert weights are "
        "streamed from the safetensors shards into a fixed budget, and the tokens are exactly "
        "stock mlx_lm's.\n\n"
        "Without [bold]--model[/bold] every command uses the small embedded demo model."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class CliError(ChronosError):
    """A usage error found by the CLI itself (conflicting options, unreadable prompt file)."""


# --------------------------------------------------------------------------------------
# Error boundary
# --------------------------------------------------------------------------------------


def error_line(message: str) -> None:
    """One red `error: ...` line on stderr, never wrapped."""
    err.print(f"[bold red]error:[/bold red] [red]{escape(str(message))}[/red]", soft_wrap=True)


def user_errors(fn: Callable) -> Callable:
    """Turn user errors into one `error:` line and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ChronosError as e:
            error_line(e)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("\n[yellow]aborted[/yellow]", soft_wrap=True)
            raise typer.Exit(130)
        except BrokenPipeError:  # `chronos generate ... | head`: the reader went away
            sys.stdout = open("/dev/null", "w")
            raise typer.Exit(1)

    return wrapper


# --------------------------------------------------------------------------------------
# Options shared by every command that loads a model
# --------------------------------------------------------------------------------------

MODEL_HELP = (
    "Model to run: a local mlx-lm checkpoint directory or a Hugging Face repo id. "
    "Default: the embedded demo model (demo-moe-4bit, 64 experts x 8 layers, 48 MB)."
)
DTYPE_HELP = (
    "Compute dtype of the weights that are not quantized. auto = float32 on MLX's CPU "
    "backend (bfloat16 is very slow there), the checkpoint's own dtype otherwise."
)
_PANEL = "Model options"
DtypeChoice = Literal[("auto", *DTYPES)]


@dataclass
class LoadOptions:
    """The common options, as parsed. Field names match the parameter names in LOAD_OPTIONS."""

    model: Optional[str] = None
    expert_budget: str = "1.0"
    dtype: str = "auto"
    sync: str = "optimistic"
    policy: str = "auto"
    direct_io: bool = False
    io_sim: Optional[str] = None
    predictor: Optional[str] = None
    profile: Optional[str] = None

    def load_kwargs(self) -> dict:
        """Keyword arguments for `chronos_mlx.load`."""
        return dict(
            model=self.model,
            expert_budget=self.expert_budget,
            dtype=None if self.dtype == "auto" else self.dtype,
            policy=("usage" if self.profile else "lru") if self.policy == "auto" else self.policy,
            direct_io=self.direct_io,
            io_sim=self.io_sim,
        )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `chronos_mlx.generate.stream_generate`."""
        return dict(sync=self.sync)


def _option(name: str, default, annotation, *decls: str, **kwargs) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(*decls, rich_help_panel=_PANEL, **kwargs)],
    )


LOAD_OPTIONS = [
    _option("model", None, Optional[str], "--model", "-m", metavar="PATH|REPO", help=MODEL_HELP),
    _option(
        "expert_budget",
        "1.0",
        str,
        "--expert-budget",
        "-b",
        metavar="BUDGET",
        help=(
            "Memory for expert weights. Bytes with a unit (6GB, 512MiB) or a fraction of all "
            "experts (0.25 or 25%); a bare number <= 1 is a fraction, a larger one is bytes. "
            "It must hold at least top-k experts per layer (see `chronos info`)."
        ),
    ),
    _option("dtype", "auto", DtypeChoice, "--dtype", help=DTYPE_HELP),
    _option(
        "sync",
        "optimistic",
        Literal[tuple(SYNC_MODES)],
        "--sync",
        help=(
            "How decode steps learn which experts they need. optimistic: compute from the "
            "resident experts and check all layers' routing once per token, recomputing the "
            "token on a miss (fast). per-layer: read each MoE layer's routing before computing "
            "it (one host sync per layer). Both give the same tokens."
        ),
    ),
    _option(
        "policy",
        "auto",
        Literal[("auto", *sorted(POLICIES))],
        "--policy",
        help=(
            "Which resident expert to evict when a missing one must be loaded: lru, lfu (with "
            "aging), usage (decayed frequency, seeded by --profile). auto: usage with a profile, else lru."
        ),
    ),
    _option(
        "direct_io",
        False,
        bool,
        "--direct-io",
        help=(
            "Read experts bypassing the OS page cache (O_DIRECT on Linux, F_NOCACHE on macOS); "
            "falls back to ordinary reads where the file system refuses it (see stats: direct_io)."
        ),
    ),
    _option(
        "io_sim",
        None,
        Optional[str],
        "--io-sim",
        metavar="SPEC",
        help=(
            "Make every expert read take as long as on an SSD of this speed, e.g. "
            "'bandwidth=5GB/s,latency=80us' (for measuring on a machine whose page cache "
            "holds the model, where reads cost nothing)."
        ),
    ),
    _option(
        "predictor",
        None,
        Optional[str],
        "--predictor",
        metavar="NAME",
        help=(
            "What predicts experts to prefetch: none, gate (next layer's router on this layer's "
            "input; no training), markov, lookahead, intent (trained by `chronos predictor train`), "
            "all. Default: none (measured: prediction cuts the I/O stall but has not yet made decoding faster; see README)."
        ),
    ),
    _option(
        "profile",
        None,
        Optional[str],
        "--profile",
        metavar="NAME|PATH",
        help=(
            "An activation profile (`chronos profile list`): pre-warms the cache with its hottest "
            "experts in the background and seeds the usage policy (use with --policy usage)."
        ),
    ),
]


def with_load_options(fn: Callable) -> Callable:
    """Add LOAD_OPTIONS to a command; it receives them as `opts: LoadOptions`."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "opts"]
    names = [p.name for p in LOAD_OPTIONS]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        opts = LoadOptions(**{n: kwargs.pop(n) for n in names})
        return fn(opts=opts, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + LOAD_OPTIONS)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + LOAD_OPTIONS}
    return wrapper


def load_model(opts: LoadOptions):
    """`chronos_mlx.load` with a spinner on an interactive stderr; shows runtime.notice once."""
    import chronos_mlx

    name = opts.model or DEFAULT_MODEL.name
    if err.is_terminal:
        with err.status(f"loading {escape(str(name))} ...", spinner="dots"):
            model, tokenizer, runtime = chronos_mlx.load(**opts.load_kwargs())
    else:
        model, tokenizer, runtime = chronos_mlx.load(**opts.load_kwargs())
    if runtime.notice:
        err.print(f"[yellow]note:[/yellow] {escape(runtime.notice)}", soft_wrap=True)
    if runtime.cache is not None:
        from .predict_runtime import attach_predictor, default_predictor

        attach_predictor(model, runtime, opts.predictor or default_predictor(model, runtime))
        if opts.profile:
            from .profiles import apply_profile

            apply_profile(runtime, model, opts.profile)  # pre-warms in the background
    return model, tokenizer, runtime


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------


def human_bytes(n) -> str:
    """42500000 -> '42.5 MB' (decimal units, like disk sizes)."""
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _fmt_stat(key: str, value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("bytes") or key == "bytes_read":
        return human_bytes(value)
    if key == "hit_rate":
        return f"{value:.1%}"
    if key.endswith("_per_s"):
        return f"{value:.1f}/s"
    if key.endswith("_s"):
        return f"{value:.3f} s"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def summary_line(stats: dict) -> str:
    parts = [
        f"{stats['generated_tokens']} tokens",
        f"{stats['decode_tokens_per_s']:.1f} tok/s",
        f"TTFT {stats['ttft_s']:.2f} s",
    ]
    if stats.get("slots_per_layer"):  # a model with experts
        parts += [f"hit rate {stats['hit_rate']:.1%}", f"read {human_bytes(stats['bytes_read'])}"]
    parts.append(f"peak {human_bytes(stats['peak_memory_bytes'])}")
    return " · ".join(parts)


def stats_table(stats: dict, title: str = "runtime stats") -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column("stat", style="cyan")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key == "per_layer":
            continue
        table.add_row(key, _fmt_stat(key, value))
    return table


def _model_name(info: dict) -> str:
    return Path(info.get("path") or str(DEFAULT_MODEL)).name


def _quant_text(q) -> str:
    if not q:
        return "none"
    return f"{q.get('mode', 'affine')} {q.get('bits')}-bit, group size {q.get('group_size')}"


# --------------------------------------------------------------------------------------
# Prompts, sampling and the streaming loop shared by generate and chat
# --------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


def encode_text(tokenizer, text: str) -> list:
    """Token ids of raw text, with the same special-token rule as mlx_lm's stream_generate."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def encode_messages(tokenizer, messages: list) -> list:
    """Token ids of a conversation through the tokenizer's chat template (generation prompt added)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(ids, str):
        return list(tokenizer.encode(ids, add_special_tokens=False))
    if hasattr(ids, "keys"):  # a BatchEncoding from newer transformers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def use_template(tokenizer, requested: Optional[bool]) -> bool:
    """--chat-template / --no-chat-template / (default) apply it when the tokenizer has one."""
    available = has_chat_template(tokenizer)
    if requested and not available:
        raise CliError("--chat-template: this model's tokenizer has no chat template")
    return available if requested is None else requested


def make_sampler(temp: float, seed: Optional[int]):
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    if seed is not None:
        mx.random.seed(seed)
    return mlx_make_sampler(temp=temp)  # argmax when temp == 0


class DeferredInterrupt:
    """Ctrl-C while generating: the first one asks the loop to stop after the current token
    (so the expert cache and KV cache are left consistent); a second one raises
    KeyboardInterrupt at once (the command then exits with code 130)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


@dataclass
class Completion:
    text: str = ""
    token_ids: list = field(default_factory=list)  # generated ids, without the final EOS
    fed: int = 0  # tokens yielded by the decode loop, EOS included
    finish_reason: Optional[str] = None
    interrupted: bool = False


def run_completion(model, tokenizer, runtime, prompt_ids, *, opts, max_tokens, sampler, prompt_cache=None, on_text=None) -> Completion:
    """Stream one completion; on_text(piece) sees the text as it comes. Stops early (with
    interrupted=True) after the current token on Ctrl-C."""
    from .generate import stream_generate

    result = Completion()
    with DeferredInterrupt() as ctrl_c:
        stream = stream_generate(
            model,
            tokenizer,
            prompt_ids,
            runtime,
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=prompt_cache,
            **opts.generate_kwargs(),
        )
        try:
            for r in stream:
                if r.token >= 0:
                    result.fed += 1
                    if r.token not in tokenizer.eos_token_ids:
                        result.token_ids.append(int(r.token))
                if r.text:
                    result.text += r.text
                    if on_text:
                        on_text(r.text)
                if r.finish_reason:
                    result.finish_reason = r.finish_reason
                if ctrl_c.requested and result.finish_reason is None:  # not if it just finished
                    result.interrupted = True
                    result.finish_reason = "interrupted"
                    break
        finally:
            stream.close()  # runs the decode loop's bookkeeping now, not at garbage collection
    return result


def _write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# chronos generate
# --------------------------------------------------------------------------------------


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if (prompt is None) == (prompt_file is None):
        raise CliError("give exactly one of --prompt/-p and --prompt-file")
    if prompt is not None:
        return prompt
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return prompt_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{prompt_file}: no such prompt file") from None
    except IsADirectoryError:
        raise CliError(f"{prompt_file}: is a directory, not a prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{prompt_file}: cannot read prompt file ({e})") from None


TEMPLATE_HELP = (
    "Wrap the prompt in the tokenizer's chat template. Default: apply it when the tokenizer has "
    "one (the demo model's has none: its prompt is used as raw text)."
)


@app.command()
@user_errors
@with_load_options
def generate(
    opts: LoadOptions,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text.")] = None,
    prompt_file: Annotated[
        Optional[Path],
        typer.Option("--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")] = 256,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")] = None,
    chat_template: Annotated[
        Optional[bool], typer.Option("--chat-template/--no-chat-template", help=TEMPLATE_HELP, show_default=False)
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object {text, token_ids, finish_reason, stats, model} and nothing else on stdout."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Include per-layer counters in the stats.")] = False,
):
    """Generate a completion for one prompt, streaming the text to stdout.

    A one-line summary (speed, time to first token, expert hit rate, bytes read, peak memory)
    goes to stderr. Ctrl-C stops after the current token (twice: at once).

    [bold]Examples[/bold]

    [cyan]chronos generate -p "The Roman Empire" --max-tokens 40[/cyan]

    [cyan]chronos generate -m mlx-community/Qwen3-30B-A3B-4bit -b 6GB --prompt-file q.txt --json[/cyan]
    """
    text = read_prompt(prompt, prompt_file)
    if not text:
        raise CliError("the prompt is empty")
    model, tokenizer, runtime = load_model(opts)
    if use_template(tokenizer, chat_template):
        ids = encode_messages(tokenizer, [{"role": "user", "content": text}])
    else:
        ids = encode_text(tokenizer, text)
    if not ids:
        raise CliError("the prompt encodes to no tokens")
    sampler = make_sampler(temp, seed)

    streamed = {"newline": True}

    def show(piece: str):
        _write(piece)
        streamed["newline"] = piece.endswith("\n")

    done = run_completion(
        model,
        tokenizer,
        runtime,
        ids,
        opts=opts,
        max_tokens=max_tokens,
        sampler=sampler,
        on_text=None if as_json else show,
    )
    stats = runtime.stats()
    if not verbose:
        stats.pop("per_layer", None)
    if as_json:
        payload = {
            "text": done.text,
            "token_ids": done.token_ids,
            "finish_reason": done.finish_reason,
            "stats": stats,
            "model": runtime.info,
        }
        _write(json.dumps(payload, default=str) + "\n")
    else:
        if not streamed["newline"]:
            _write("\n")
        if done.interrupted:
            err.print("[yellow]\\[interrupted][/yellow]")
        err.print(f"[dim]{summary_line(stats)}[/dim]", soft_wrap=True)
        if verbose:
            err.print(stats_table(stats))
    if done.interrupted:
        raise typer.Exit(130)


# --------------------------------------------------------------------------------------
# chronos chat
# --------------------------------------------------------------------------------------

CHAT_COMMANDS = (
    ("/stats", "runtime counters since the start (or the last /reset)"),
    ("/reset", "forget the conversation and its KV cache (the expert cache stays warm)"),
    ("/profile save NAME", "save this session's expert use as a profile (then --profile NAME)"),
    ("/help", "this help"),
    ("/quit", "leave (also Ctrl-D, or Ctrl-C at the prompt)"),
    ("Ctrl-C", "while the model writes: stop that reply after the current token; what it wrote "
     "stays in the conversation. Twice: leave at once."),
)


def chat_help() -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for command, what in CHAT_COMMANDS:
        table.add_row(command, what)
    return table


class ChatSession:
    """A conversation and the KV cache that holds a prefix of its tokens.

    Each turn the whole conversation is tokenized again (chat template, or the turns joined
    as plain text); the cache keeps the longest prefix it shares with that, and only the rest
    is fed to the model. So a turn computes exactly what a fresh run on the whole
    conversation would, while normally feeding only the new message.
    """

    def __init__(self, model, tokenizer, *, template: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.reset()

    def reset(self):
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        self.messages: list = []
        self.text = ""
        self.cache = make_prompt_cache(self.model)
        self.reusable = can_trim_prompt_cache(self.cache) and all(hasattr(c, "offset") for c in self.cache)
        self.cached: list = []  # the tokens whose keys/values the cache holds, in order

    def conversation_ids(self, user: str) -> list:
        if self.template:
            return encode_messages(self.tokenizer, self.messages + [{"role": "user", "content": user}])
        return encode_text(self.tokenizer, self._joined(user))

    def _joined(self, user: str) -> str:
        sep = "\n" if self.text and not self.text.endswith("\n") else ""
        return self.text + sep + user

    def prepare(self, ids: list) -> list:
        """Trim the cache to the prefix it shares with `ids`; return the tokens still to feed."""
        if not self.reusable:
            from mlx_lm.models.cache import make_prompt_cache

            self.cache, self.cached = make_prompt_cache(self.model), []
            return ids
        keep = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # the model needs at least one token to run on
        self._trim_to(keep)
        self.cached = list(ids[:keep])
        return ids[keep:]

    def record(self, fed_prompt: list, done: Completion):
        """After a turn: keep only cache entries we can vouch for.

        When a reply stops early (end of sequence, Ctrl-C) the decode loop has already
        launched the step that feeds the last yielded token, and nobody verified it: with
        optimistic routing it may have run on a stand-in expert, leaving wrong keys/values
        for that position. So the cache keeps the prompt and every generated token but the
        last one; the next turn feeds that token again (one token of extra work)."""
        if not self.reusable:
            return
        import mlx.core as mx

        mx.eval([c.state for c in self.cache])  # let the step launched ahead finish
        tokens = self.cached + list(fed_prompt) + done.token_ids
        trusted = len(self.cached) + len(fed_prompt) + max(done.fed - 1, 0)
        offset = min(c.offset for c in self.cache)
        keep = min(offset, trusted, len(tokens))
        self._trim_to(keep)
        self.cached = tokens[:keep]

    def _trim_to(self, n: int):
        for c in self.cache:
            if c.offset > n:
                c.trim(c.offset - n)

    def commit(self, user: str, reply: str):
        if self.template:
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        else:
            self.text = self._joined(user) + reply


def banner(runtime, template: bool) -> str:
    info = runtime.info
    parts = [f"[bold]chronos chat[/bold] · {escape(_model_name(info))} ({info.get('model_type')})"]
    if info.get("num_experts"):
        parts.append(f"{info['num_experts']} experts/layer, top-{info['top_k']}")
        parts.append(
            f"budget {info['slots_per_layer']} experts/layer ({human_bytes(info['expert_budget_bytes'])})"
        )
    parts.append("chat template" if template else "plain-text turns")
    parts.append("/help for commands")
    return " · ".join(parts)


def _read_line(interactive: bool) -> str:
    """One line of user input; EOFError at the end of input."""
    if interactive:
        return Prompt.ask("[bold green]you[/bold green]", console=out)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


@app.command()
@user_errors
@with_load_options
def chat(
    opts: LoadOptions,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens per reply.")] = 256,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")] = None,
    chat_template: Annotated[
        Optional[bool],
        typer.Option(
            "--chat-template/--no-chat-template",
            help="Format the conversation with the tokenizer's chat template. Default: when it has one; "
            "otherwise the turns are joined as plain text and the model continues it.",
            show_default=False,
        ),
    ] = None,
):
    """Chat with a model in the terminal, keeping the conversation and its KV cache.

    Commands: /stats, /reset, /help, /quit. Ctrl-C while the model writes stops that reply
    (what was written stays in the conversation); Ctrl-C or Ctrl-D at the prompt leaves.
    When stdin is not a terminal, lines are read from it, one message (or command) per line.

    [bold]Examples[/bold]

    [cyan]chronos chat -b 0.25[/cyan]

    [cyan]printf 'The Roman Empire\\n/stats\\n/quit\\n' | chronos chat --max-tokens 20[/cyan]
    """
    model, tokenizer, runtime = load_model(opts)
    from .usage import ActivationStats

    usage_stats = ActivationStats.for_runtime(runtime) if runtime.cache is not None else None
    template = use_template(tokenizer, chat_template)
    sampler = make_sampler(temp, seed)
    session = ChatSession(model, tokenizer, template=template)
    interactive = sys.stdin.isatty()
    err.print(banner(runtime, template), soft_wrap=True)

    while True:
        try:
            line = _read_line(interactive)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                out.print()
            return
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            command = message.split()[0].lower()
            if command in ("/quit", "/exit", "/q"):
                return
            if command == "/stats":
                out.print(stats_table(runtime.stats(), title="runtime stats"))
            elif command == "/reset":
                session.reset()
                runtime.reset_counters()
                err.print("[dim]conversation and KV cache cleared[/dim]")
            elif command in ("/help", "/?"):
                out.print(chat_help())
            elif command == "/profile":
                parts = message.split()
                if usage_stats is None or len(parts) != 3 or parts[1] != "save":
                    error_line("usage: /profile save NAME (needs a MoE model)")
                else:
                    from .profiles import profile_from_stats, save_profile

                    try:
                        path = save_profile(profile_from_stats(usage_stats, parts[2], runtime, model, {"source": "chat"}))
                        err.print(f"[dim]profile saved to {escape(str(path))}[/dim]", soft_wrap=True)
                    except ChronosError as e:
                        error_line(str(e))
            else:
                error_line(f"unknown command {command} (try /help)")
            continue

        ids = session.conversation_ids(line)
        feed = session.prepare(ids)
        ended = {"newline": True}

        def show(piece: str):
            _write(piece)
            ended["newline"] = piece.endswith("\n")

        before = runtime.stats()
        done = run_completion(
            model,
            tokenizer,
            runtime,
            feed,
            opts=opts,
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=session.cache,
            on_text=show,
        )
        session.record(feed, done)
        if not ended["newline"]:
            _write("\n")
        if done.interrupted:
            err.print("[yellow]\\[interrupted][/yellow]")
        if done.token_ids or not done.interrupted:
            session.commit(line, done.text)
        after = runtime.stats()
        rate = after["hits"] - before["hits"], after["misses"] - before["misses"]
        hit = rate[0] / sum(rate) if sum(rate) else 1.0
        err.print(
            f"[dim]{len(done.token_ids)} tokens · hit rate {hit:.1%} · "
            f"read {human_bytes(after['bytes_read'] - before['bytes_read'])}[/dim]",
            soft_wrap=True,
        )


# --------------------------------------------------------------------------------------
# chronos info
# --------------------------------------------------------------------------------------

BUDGET_FRACTIONS = ("1.0", "0.5", "0.25", "0.125")


def minimum_budget(num_experts: int, top_k: int) -> str:
    """The smallest fraction that holds top_k experts per layer, as a user would type it
    (rounded up at the 4th decimal so that it still buys top_k slots)."""
    f = math.ceil(top_k / num_experts * 10**4 - 1e-6) / 10**4
    return f"{f:.4f}".rstrip("0").rstrip(".") if f < 1 else "1.0"


def budget_rows(info: dict) -> list:
    """What the usual budget fractions (and the smallest legal one) buy for this model,
    computed by the same `slots_for_budget` that `load` uses."""
    from .budget import slots_for_budget
    from .errors import BudgetError

    E, k, layers, per = info["num_experts"], info["top_k"], info["moe_layers"], info["bytes_per_expert"]
    smallest = minimum_budget(E, k)
    labels = sorted({*BUDGET_FRACTIONS, smallest}, key=float, reverse=True)
    labels = [b for b in labels if not (float(b) == float(smallest) and b != smallest)]
    rows = []
    for label in labels:
        try:
            slots = slots_for_budget(label, num_layers=layers, num_experts=E, top_k=k, bytes_per_expert=per)
        except BudgetError:
            slots = None
        expert_bytes = slots * per * layers if slots is not None else None
        rows.append(
            {
                "budget": label,
                "fraction": float(label),
                "minimum": label == smallest,
                "experts_per_layer": slots,
                "expert_bytes": expert_bytes,
                "resident_bytes": expert_bytes + info["dense_bytes"] if expert_bytes is not None else None,
            }
        )
    return rows


@app.command()
@user_errors
def info(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help=MODEL_HELP, show_default=False)] = None,
    model_opt: Annotated[
        Optional[str], typer.Option("--model", "-m", metavar="PATH|REPO", help="Same as MODEL.")
    ] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
):
    """Describe a model and what expert budgets mean for it, without loading its experts.

    Architecture, layers and MoE layers, experts per layer and top-k, bytes per expert
    (resident and on disk), all expert bytes, dense bytes, and a table of budgets.

    [bold]Examples[/bold]

    [cyan]chronos info[/cyan]                       (the embedded demo model)

    [cyan]chronos info ~/models/Qwen3-30B-A3B-4bit --json[/cyan]
    """
    from .loader import plan_model

    if model and model_opt and model != model_opt:
        raise CliError("give the model once: as MODEL or as --model")
    spec = model or model_opt
    facts = dict(plan_model(spec, None if dtype == "auto" else dtype).info)
    moe = bool(facts.get("moe_layers"))
    facts["moe"] = moe
    if moe:
        facts["budgets"] = budget_rows(facts)
    if as_json:
        _write(json.dumps(facts, default=str) + "\n")
        return

    grid = Table(show_header=False, box=None, pad_edge=False)
    grid.add_column(style="cyan")
    grid.add_column()
    grid.add_row("model", f"[bold]{escape(_model_name(facts))}[/bold]")
    grid.add_row("path", escape(facts["path"]))
    grid.add_row("architecture", str(facts.get("model_type")))
    grid.add_row("layers", f"{facts.get('num_hidden_layers')} ({facts.get('moe_layers')} MoE)")
    grid.add_row("quantization", _quant_text(facts.get("quantization")))
    grid.add_row("compute dtype", str(facts.get("dtype")))
    if moe:
        grid.add_row("experts per layer", f"{facts['num_experts']}, top-{facts['top_k']} per token")
        grid.add_row(
            "bytes per expert",
            f"{human_bytes(facts['bytes_per_expert'])} resident, "
            f"{human_bytes(facts['bytes_per_expert_on_disk'])} on disk",
        )
        grid.add_row("all experts", f"{human_bytes(facts['expert_bytes_total'])} resident")
        grid.add_row("dense weights", f"{human_bytes(facts['dense_bytes'])} (always resident)")
    out.print(grid)
    if not moe:
        out.print(
            f"\n[yellow]{escape(_model_name(facts))} has no MoE layers:[/yellow] chronos runs it "
            "unchanged, there are no experts to stream and --expert-budget has no effect."
        )
        return

    table = Table(title="expert budgets", title_justify="left")
    table.add_column("--expert-budget")
    table.add_column("experts/layer", justify="right")
    table.add_column("expert memory", justify="right")
    table.add_column("with dense weights", justify="right")
    for row in facts["budgets"]:
        label = row["budget"] + (" (minimum)" if row["minimum"] else "")
        if row["experts_per_layer"] is None:
            table.add_row(label, "[red]too small[/red]", "-", "-")
        else:
            table.add_row(
                label,
                str(row["experts_per_layer"]),
                human_bytes(row["expert_bytes"]),
                human_bytes(row["resident_bytes"]),
            )
    out.print()
    out.print(table)
    out.print(
        f"[dim]A budget in bytes (e.g. 6GB) buys floor(bytes / {human_bytes(facts['bytes_per_expert'] * facts['moe_layers'])}) "
        f"experts per layer; fewer than {facts['top_k']} is an error.[/dim]"
    )



# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------

BENCH_COLUMNS = [
    ("name", "config"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("ratio_to_resident", "x resident"),
    ("ttft_s", "TTFT s"),
    ("stall_s_per_token", "stall ms/tok"),
    ("bytes_read_per_token", "read/tok"),
    ("io_bound_tokens_per_s", "bound tok/s"),
    ("hit_rate", "hits"),
    ("prediction_recall", "recall"),
    ("mlx_peak_memory_bytes", "peak mem"),
]  # everything else (prefill, Belady bytes, syncs, spread...) is in --json


def _bench_cell(key: str, row: dict) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "decode_tokens_per_s":
        return f"{v:.1f}"
    if key == "stall_s_per_token":
        return f"{v * 1e3:.2f}"
    if key.endswith("bytes") or "bytes_read" in key:
        return human_bytes(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return escape(str(v))


@app.command()
@user_errors
def bench(
    workload: Annotated[str, typer.Option("--workload", "-w", help="Prompts: a JSONL file or a shipped workload (en, de, fr, es, it, python, c).")] = "en",
    prompts: Annotated[int, typer.Option("--prompts", help="How many prompts of the workload (held-out half).")] = 2,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated expert budgets to measure chronos at.")] = "1,0.5,0.25,0.125",
    profile: Annotated[Optional[str], typer.Option("--profile", help="Profile (name or path) for the profile+usage configurations.")] = None,
    predictor: Annotated[Optional[str], typer.Option("--predictor", help="Predictor for the async-I/O configurations (none, markov, lookahead, intent, gate, all).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens generated per prompt.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", help="Prompts are cut to their last N tokens.")] = 128,
    repeats: Annotated[int, typer.Option("--repeats", help="Measured repetitions per configuration (median and spread reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Unmeasured warm-up repetitions.")] = 1,
    only: Annotated[Optional[str], typer.Option("--only", help="Only configurations whose name starts with one of these (comma-separated).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every figure, the machine and the command to this JSON file.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write a plot of decode speed against budget.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    io_sim: Annotated[Optional[str], typer.Option("--io-sim", help="Simulated SSD for chronos reads, e.g. 'bandwidth=5GB/s,latency=80us'.")] = None,
    direct_io: Annotated[bool, typer.Option("--direct-io", help="Bypass the page cache for chronos reads.")] = False,
):
    """Benchmark stock mlx_lm and chronos side by side, in one process, on the same prompts.

    Configurations: mlx_lm-resident (whole model in memory: the ceiling; skipped when it does
    not fit), mlx_lm-mmap (lazy load), chronos-lru (on-demand loads), chronos-predict (async
    I/O + predictors), chronos-profile (profile + usage policy), chronos-all; each chronos one
    at every --budgets value. Each is warmed up and repeated; medians and spread are shown.

    Example: chronos bench --workload it --budgets 1,0.5,0.25 --io-sim bandwidth=5GB/s,latency=80us --json out.json --png out.png
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import bench as B
    from .io import parse_io_sim
    from .loader import plan_model
    from .workloads import load_prompts

    parse_io_sim(io_sim)  # a bad spec is an error before anything is loaded
    try:
        budget_list = [float(b) if float(b) <= 1 else b for b in budgets.split(",") if b.strip()]
    except ValueError:
        budget_list = [b.strip() for b in budgets.split(",") if b.strip()]
    dtype_arg = None if dtype == "auto" else dtype
    info = plan_model(model, dtype_arg).info
    if not info.get("num_experts"):
        raise ChronosError(f"{info['path']}: no MoE layers, nothing to benchmark")
    from .budget import slots_for_budget

    for b in budget_list:  # too small a budget is an error now, not after an hour
        slots_for_budget(b, num_layers=info["moe_layers"], num_experts=info["num_experts"],
                         top_k=info["top_k"], bytes_per_expert=info["bytes_per_expert"])
    prompt_ids = load_prompts(workload, model, limit=prompts, max_prompt_tokens=max_prompt_tokens, split="heldout")
    configs, notices = B.plan_configs(
        budget_list, info=info, io_sim=io_sim, direct_io=direct_io, predictor=predictor, profile=profile,
        only=only.split(",") if only else None,
    )
    for n in notices:
        err.print(f"[yellow]note:[/yellow] {escape(n)}")
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=not err.is_terminal) as progress:
        task = progress.add_task("bench", total=len(configs) * (warmup + repeats) * len(prompt_ids))
        for cfg in configs:
            progress.update(task, description=f"{cfg.name:<28}")
            rows.append(B.measure(cfg, model, prompt_ids, max_tokens=max_tokens, repeats=repeats, warmup=warmup,
                                  dtype=dtype_arg, progress=lambda: progress.advance(task)))
    result = B.report(rows, command="chronos " + " ".join(sys.argv[1:]), model=info, workload=workload,
                      io_sim=io_sim, direct_io=direct_io, max_tokens=max_tokens, prompts=len(prompt_ids),
                      repeats=repeats, warmup=warmup, notices=notices,
                      title=f"{_model_name(info)} · {workload} · {io_sim or 'page cache'}")
    table = Table(title=result["title"])
    for _, head in BENCH_COLUMNS:
        table.add_column(head, justify="left" if head == "config" else "right")
    for r in result["results"]:
        table.add_row(*(_bench_cell(k, r) for k, _ in BENCH_COLUMNS))
    out.print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=str))
        err.print(f"wrote {json_out}")
    if png:
        B.plot(result, png)
        err.print(f"wrote {png}")


def _mount_subcommands():
    from .cli_predictor import predictor_app
    from .cli_profile import pack, profile_app

    app.add_typer(profile_app, name="profile")
    app.add_typer(predictor_app, name="predictor")
    app.command(name="pack")(pack)


_mount_subcommands()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)] = False,
):
    if version:
        from . import __version__

        out.print(f"chronos-mlx {__version__}")
        raise typer.Exit()


if __name__ == "__main__":  # pragma: no cover
    app()
