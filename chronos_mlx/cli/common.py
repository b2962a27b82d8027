"""What every command shares: the error boundary, the model-loading options, formatting,
prompt encoding and the streaming loop used by generate and chat."""

import functools
import inspect
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ChronosError
from ..generate import SYNC_MODES
from ..loader import DEFAULT_MODEL, DTYPES
from ..policy import POLICIES

# In a pipe or a log (`chronos bench | tee`) rich would cut tables to 80 columns ("conf…"):
# there, lay out as wide as the content needs (COLUMNS still wins when set).
PIPE_WIDTH = 1000


def _console(stream, **kwargs) -> Console:
    wide = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(highlight=False, width=PIPE_WIDTH if wide else None, **kwargs)


out = _console(sys.stdout)  # stdout: what the user asked for (tables, JSON is written raw)
err = _console(sys.stderr, stderr=True)  # stderr: notices, progress, summaries, errors

class CliError(ChronosError):
    """A usage error found by the CLI itself (conflicting options, unreadable prompt file)."""


# --------------------------------------------------------------------------------------
# Error boundary
# --------------------------------------------------------------------------------------


def error_line(message: str) -> None:
    """One red `error: ...` line on stderr, never wrapped."""
    err.print(f"[bold red]error:[/bold red] [red]{escape(str(message))}[/red]", soft_wrap=True)


def hint_line(message: str) -> None:
    """The one line that may follow an `error:` line."""
    err.print(f"[dim]hint: {escape(str(message))}[/dim]", soft_wrap=True)


def note_line(message: str) -> None:
    """Something the user should know that is not an error (stderr, like the rest)."""
    err.print(f"[yellow]note:[/yellow] {escape(str(message))}", soft_wrap=True)


def os_error_text(e: BaseException) -> str:
    """`path: reason` for an OSError (permission denied, no space left...), without a traceback."""
    if isinstance(e, UnicodeError):
        return f"input is not valid UTF-8 ({e})"
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def user_errors(fn: Callable) -> Callable:
    """Turn user errors into one `error:` line and exit code 2; Ctrl-C into exit code 130.

    OS errors (a file that cannot be read or written: permissions, a full disk, a
    directory where a file was expected) and undecodable input are user errors too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ChronosError as e:
            error_line(e)
            raise typer.Exit(2)
        except (OSError, UnicodeError) as e:
            if isinstance(e, BrokenPipeError):  # `chronos generate ... | head`: the reader went away
                sys.stdout = open("/dev/null", "w")
                raise typer.Exit(1)
            error_line(os_error_text(e))
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("\n[yellow]aborted[/yellow]", soft_wrap=True)
            raise typer.Exit(130)

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
    expert_budget: str = "auto"
    memory_limit: Optional[str] = None
    dtype: str = "auto"
    sync: str = "auto"
    policy: str = "auto"
    direct_io: bool = False
    io_sim: Optional[str] = None
    predictor: Optional[str] = None
    profile: Optional[str] = None
    verify_experts: bool = False
    context_tokens: int = 4096  # KV cache that `--expert-budget auto` leaves room for (not an option)

    def load_kwargs(self) -> dict:
        """Keyword arguments for `chronos_mlx.load`."""
        return dict(
            model=self.model,
            expert_budget=self.expert_budget,
            dtype=None if self.dtype == "auto" else self.dtype,
            policy="usage" if self.policy == "auto" else self.policy,
            direct_io=self.direct_io,
            io_sim=self.io_sim,
        )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `chronos_mlx.generate.stream_generate`."""
        return dict(sync=self.sync)


def _option(name: str, default, annotation, *decls: str, panel: str = _PANEL, **kwargs) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(*decls, rich_help_panel=panel, **kwargs)],
    )


def _option_group(options: list, argument: str, make: Callable) -> Callable:
    """A decorator that adds `options` to a command, which receives them as one argument
    named `argument`, built by `make(**values)`."""
    names = [p.name for p in options]

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != argument]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            return fn(**{argument: make(**{n: kwargs.pop(n) for n in names})}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + options)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + options}
        return wrapper

    return decorate


LOAD_OPTIONS = [
    _option("model", None, Optional[str], "--model", "-m", metavar="PATH|REPO", help=MODEL_HELP),
    _option(
        "expert_budget",
        "auto",
        str,
        "--expert-budget",
        "--budget",
        "-b",
        metavar="BUDGET",
        help=(
            "Memory for expert weights. Bytes with a unit (6GB, 512MiB) or a fraction of all "
            "experts (0.25 or 25%); a bare number <= 1 is a fraction, a larger one is bytes. "
            "It must hold at least top-k experts per layer (see `chronos info`). auto (default): "
            "what fits in the memory this process may use (--memory-limit, else the machine's "
            "available memory) after the dense weights, the KV cache and headroom; 1.0 when all fits."
        ),
    ),
    _option(
        "memory_limit",
        None,
        Optional[str],
        "--memory-limit",
        metavar="SIZE",
        help="Memory this process may use (e.g. 12GB), for --expert-budget auto. Default: the machine's available memory.",
    ),
    _option("dtype", "auto", DtypeChoice, "--dtype", help=DTYPE_HELP),
    _option(
        "sync",
        "auto",
        Literal[("auto", *SYNC_MODES)],
        "--sync",
        help=(
            "How decode steps learn which experts they need. auto: device-wait with MLX's CUDA "
            "backend when the budget is below the model, optimistic elsewhere. optimistic: compute from the "
            "resident experts and read the routing back at a few segment ends per token, chosen "
            "from measured miss rates and round-trip costs; a miss recomputes from the layer "
            "that missed (fast). per-layer: read each MoE layer's routing back (one host sync per "
            "layer); on MLX's CPU backend the layer's experts compute meanwhile on those resident "
            "and only the rows whose expert was missing are recomputed. device-wait (CUDA only): each MoE "
            "layer waits on the GPU for a loader thread only when one of its experts is absent; "
            "no host sync per layer. device-fetch (CUDA only): each MoE layer copies its absent experts "
            "itself from the shards, which it holds page-locked in host memory (the whole model in "
            "host RAM, the budget on the GPU); no loader thread, 1.7-2.7x device-wait's speed on an H200; auto never "
            "picks it. All give the same tokens."
        ),
    ),
    _option(
        "policy",
        "auto",
        Literal[("auto", *sorted(POLICIES))],
        "--policy",
        help=(
            "Which resident expert to evict when a missing one must be loaded: lru, lfu (with "
            "aging), usage (decayed frequency, seeded by --profile). auto: usage (it reads the fewest "
            "bytes of the three on held-out text)."
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
            "'bandwidth=5GB/s,latency=80us' or just '5GB/s' (for measuring on a machine whose page cache "
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
            "all. Under --sync device-wait its guesses ride with a layer's request; under device-fetch the GPU "
            "prefetches them into the next layer's slots. Default: none (measured: prediction cuts the I/O stall "
            "but has not yet made decoding faster; see README)."
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
    _option(
        "verify_experts",
        False,
        bool,
        "--verify-experts",
        help=(
            "Check each expert's bytes against its sha256 (the model's manifest, see `chronos verify`) "
            "the first time it is read: a corrupt shard is an error, never wrong tokens. The first use "
            "hashes the whole model once to write the manifest."
        ),
    ),
]


def with_load_options(fn: Callable) -> Callable:
    """Add LOAD_OPTIONS to a command; it receives them as `opts: LoadOptions`."""
    return _option_group(LOAD_OPTIONS, "opts", LoadOptions)(fn)


def load_model(opts: LoadOptions, chat_template: Optional[bool] = None):
    """`chronos_mlx.load` with a spinner on an interactive stderr; shows runtime.notice once.
    `chat_template=True` (--chat-template) is checked against the tokenizer before anything
    is loaded or printed."""
    import chronos_mlx

    name = opts.model or DEFAULT_MODEL.name
    check_load_options(opts)  # a bad option is an error now, before anything is loaded
    if chat_template:
        from mlx_lm.utils import load_tokenizer

        from ..loader import resolve_model_path

        use_template(load_tokenizer(resolve_model_path(opts.model)), True)
    opts = resolve_auto_budget(opts)
    if err.is_terminal:
        with err.status(f"loading {escape(str(name))} ...", spinner="dots"):
            model, tokenizer, runtime = chronos_mlx.load(**opts.load_kwargs())
    else:
        model, tokenizer, runtime = chronos_mlx.load(**opts.load_kwargs())
    if runtime.notice:
        note_line(runtime.notice)
    if runtime.cache is not None:
        from ..predict_runtime import attach_predictor, default_predictor

        attach_predictor(model, runtime, opts.predictor or default_predictor(model, runtime))
        if opts.profile:
            from ..profiles import apply_profile

            apply_profile(runtime, model, opts.profile)  # pre-warms in the background
        if opts.verify_experts:
            attach_expert_verifier(runtime)
    else:
        ignored = [o for o, v in (("--profile", opts.profile), ("--predictor", opts.predictor not in (None, "none")),
                                  ("--verify-experts", opts.verify_experts)) if v]
        if ignored:
            raise CliError(f"{model_name(runtime.info)} has no MoE layers: {', '.join(ignored)} do(es) not apply to it")
    return model, tokenizer, runtime


def check_load_options(opts: LoadOptions):
    """Everything about the load options that can be checked without the model."""
    from ..budget import is_auto, parse_budget
    from ..io import parse_io_sim
    from ..predict_runtime import PREDICTORS

    if not is_auto(opts.expert_budget):
        parse_budget(opts.expert_budget)
    parse_io_sim(opts.io_sim)
    if opts.predictor is not None and opts.predictor not in PREDICTORS:
        raise CliError(f"--predictor: unknown predictor '{opts.predictor}' (choose from {', '.join(PREDICTORS)})")
    if opts.sync in ("device-wait", "device-fetch"):
        from .. import device_wait

        if not device_wait.available():
            raise CliError(f"--sync {opts.sync} needs MLX's CUDA backend (a GPU with mx.fast.cuda_kernel); "
                           "use --sync optimistic or per-layer here")
    if opts.profile:
        from ..profiles import resolve_profile

        resolve_profile(opts.profile)
    from ..config_check import check_config, check_tokenizer_files
    from ..loader import resolve_model_path

    path = resolve_model_path(opts.model)  # config and tokenizer files: before any other output
    if (path / "config.json").exists():
        check_config(path)
    check_tokenizer_files(path)


def attach_expert_verifier(runtime):
    """--verify-experts: the manifest's expert hashes (written now, with a progress bar, when
    there is none) checked on every expert's first read."""
    from ..verify import attach_verifier, expert_verifier, manifest_path, read_manifest
    from .verify import hashing_progress

    path = runtime.info.get("path")
    if read_manifest(manifest_path(path)) is None:
        err.print(f"[dim]no manifest for {escape(str(path))} yet: hashing its shards once[/dim]", soft_wrap=True)
    bar, on_start, on_bytes = hashing_progress("sha256")
    with bar:
        verifier, _ = expert_verifier(path, on_start=on_start, on_bytes=on_bytes)
    attach_verifier(runtime, verifier)


def resolve_auto_budget(opts: LoadOptions) -> LoadOptions:
    """--expert-budget auto: work out the budget (no weights read) and say what and why on stderr."""
    from ..budget import is_auto, resolve_budget

    if not is_auto(opts.expert_budget):
        return opts
    budget, choice = resolve_budget(
        opts.expert_budget, opts.model, dtype=opts.load_kwargs()["dtype"], memory_limit=opts.memory_limit,
        context_tokens=opts.context_tokens,
    )
    err.print(f"[dim]{escape(choice.line())}[/dim]", soft_wrap=True)
    return replace(opts, expert_budget=budget)


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
    if value is None:  # not measured here (no predictor, no device copies ...)
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("bytes") or key.endswith("bytes_read"):
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


def model_name(info: dict) -> str:
    return Path(info.get("path") or str(DEFAULT_MODEL)).name


def quant_text(q) -> str:
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


def encode_messages(tokenizer, messages: list, template_kwargs: Optional[dict] = None) -> list:
    """Token ids of a conversation through the tokenizer's chat template (generation prompt
    added); `template_kwargs` go to the template (--chat-template-config)."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **(template_kwargs or {}))
    except Exception as e:  # a Jinja error from the template (or its kwargs): the user's to fix
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise CliError(f"the chat template failed: {e}") from None
    if isinstance(ids, str):
        return list(tokenizer.encode(ids, add_special_tokens=False))
    if hasattr(ids, "keys"):  # a BatchEncoding from newer transformers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


SystemPromptOption = Annotated[
    Optional[str],
    typer.Option("--system-prompt", metavar="TEXT", help="A system message first (with the chat template; without one, "
                 "the text the conversation starts with)."),
]
TemplateConfigOption = Annotated[
    Optional[str],
    typer.Option("--chat-template-config", metavar="JSON", help="Arguments for the chat template, as mlx_lm's, e.g. "
                 "'{\"enable_thinking\": false}'."),
]


MaxKvOption = Annotated[
    Optional[int],
    typer.Option("--max-kv-size", min=1, metavar="TOKENS", help="Keep at most this many tokens of KV cache (a rotating "
                 "cache, as mlx_lm's): bounded memory for long contexts; older tokens fall out."),
]


def template_config(text: Optional[str]) -> dict:
    """--chat-template-config: a JSON object, or a clear error."""
    if not text:
        return {}
    import json

    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"--chat-template-config is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict):
        raise CliError("--chat-template-config must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return config


def use_template(tokenizer, requested: Optional[bool]) -> bool:
    """--chat-template / --no-chat-template / (default) apply it when the tokenizer has one."""
    available = has_chat_template(tokenizer)
    if requested and not available:
        raise CliError("--chat-template: this model's tokenizer has no chat template")
    return available if requested is None else requested


@dataclass
class Sampling:
    """How `generate` and `chat` pick tokens: mlx_lm's sampler and logits processors."""

    temp: float = 0.0
    seed: Optional[int] = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0

    def sampler(self):
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

        if self.seed is not None:
            mx.random.seed(self.seed)
        # argmax when temp == 0; mlx_lm's top_p of 0 (or 1) keeps every token
        return mlx_make_sampler(temp=self.temp, top_p=self.top_p if self.top_p < 1 else 0.0, min_p=self.min_p,
                                top_k=self.top_k)

    def logits_processors(self) -> Optional[list]:
        from mlx_lm.sample_utils import make_logits_processors

        penalty = self.repetition_penalty if self.repetition_penalty not in (0.0, 1.0) else None
        return make_logits_processors(repetition_penalty=penalty) or None


def _sampling_option(name: str, default, annotation, *decls: str, **kwargs) -> inspect.Parameter:
    return _option(name, default, annotation, *decls, panel="Sampling", **kwargs)


# mlx_lm's sampler and logits processors (`generate`, `chat`).
SAMPLING_OPTIONS = [
    _sampling_option("temp", 0.0, float, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    _sampling_option("seed", None, Optional[int], "--seed", min=0, max=2**63 - 1, help="Random seed for sampling."),
    _sampling_option("top_p", 1.0, float, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temp); 1 keeps every token."),
    _sampling_option("top_k", 0, int, "--top-k", min=0, help="Sample among the K likeliest tokens (with --temp); 0: all."),
    _sampling_option("min_p", 0.0, float, "--min-p", min=0.0, max=1.0,
                     help="Drop tokens below this fraction of the likeliest one's probability (with --temp)."),
    _sampling_option("repetition_penalty", 0.0, float, "--repetition-penalty", min=0.0,
                     help="Penalise tokens among the last 20 (mlx_lm's; e.g. 1.1); 0 or 1: off. Applies when greedy too."),
]


def with_sampling_options(fn: Callable) -> Callable:
    """Add SAMPLING_OPTIONS to a command; it receives them as `sampling: Sampling`."""
    return _option_group(SAMPLING_OPTIONS, "sampling", Sampling)(fn)


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


def run_completion(model, tokenizer, runtime, prompt_ids, *, opts, max_tokens, sampler, prompt_cache=None, on_text=None,
                   logits_processors=None) -> Completion:
    """Stream one completion; on_text(piece) sees the text as it comes. Stops early (with
    interrupted=True) after the current token on Ctrl-C."""
    from ..generate import stream_generate

    result = Completion()
    with DeferredInterrupt() as ctrl_c:
        stream = stream_generate(
            model,
            tokenizer,
            prompt_ids,
            runtime,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
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




def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if (prompt is None) == (prompt_file is None):
        raise CliError("give exactly one of --prompt/-p and --prompt-file")
    if prompt is not None and prompt != "-":
        return prompt
    if prompt == "-" or str(prompt_file) == "-":  # stdin, as mlx_lm.generate's `--prompt -`
        try:
            return sys.stdin.read()
        except UnicodeDecodeError:
            raise CliError("the prompt on stdin is not valid UTF-8 text") from None
    return read_prompt_file(prompt_file)


def read_prompt_file(path: Path, error: type[Exception] = CliError) -> str:
    """The UTF-8 text of a prompt file; every way it cannot be read is one `error`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read prompt file ({e})") from None


TEMPLATE_HELP = (
    "Wrap the prompt in the tokenizer's chat template. Default: apply it when the tokenizer has "
    "one (the demo model's has none: its prompt is used as raw text)."
)

