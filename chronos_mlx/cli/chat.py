"""`chronos chat`: a terminal REPL that keeps the conversation and its KV cache."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.prompt import Prompt
from rich.table import Table

from . import common
from ..errors import ChronosError
from .app import app
from .common import (
    Completion, LoadOptions, MaxKvOption, Sampling, SystemPromptOption, TemplateConfigOption, encode_messages, encode_text, err,
    error_line, human_bytes, load_model, model_name, out, run_completion, stats_table, template_config, use_template,
    user_errors, with_load_options, with_sampling_options,
)


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

    def __init__(self, model, tokenizer, *, template: bool, system: Optional[str] = None,
                 template_kwargs: Optional[dict] = None, max_kv_size: Optional[int] = None):
        self.model = model
        self.max_kv_size = max_kv_size  # a rotating cache (it cannot be trimmed once it wraps)
        self.tokenizer = tokenizer
        self.template = template
        self.system = system  # stays through /reset
        self.template_kwargs = template_kwargs or {}
        self.reset()

    def reset(self):
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        self.messages: list = [{"role": "system", "content": self.system}] if self.system and self.template else []
        self.text = self.system + "\n" if self.system and not self.template else ""
        self.cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
        self.reusable = can_trim_prompt_cache(self.cache) and all(hasattr(c, "offset") for c in self.cache)
        self.cached: list = []  # the tokens whose keys/values the cache holds, in order

    def conversation_ids(self, user: str) -> list:
        if self.template:
            return encode_messages(self.tokenizer, self.messages + [{"role": "user", "content": user}], self.template_kwargs)
        return encode_text(self.tokenizer, self._joined(user))

    def _joined(self, user: str) -> str:
        sep = "\n" if self.text and not self.text.endswith("\n") else ""
        return self.text + sep + user

    def prepare(self, ids: list) -> list:
        """Trim the cache to the prefix it shares with `ids`; return the tokens still to feed."""
        if not self.reusable:
            from mlx_lm.models.cache import make_prompt_cache

            self.cache, self.cached = make_prompt_cache(self.model, max_kv_size=self.max_kv_size), []
            return ids
        keep = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # the model needs at least one token to run on
        self._trim_to(keep)
        keep = min(keep, min(c.offset for c in self.cache))  # 0 when the cache was started afresh
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
        self.cached = tokens[: min(keep, min(c.offset for c in self.cache))]  # [] if started afresh

    def _trim_to(self, n: int):
        """Keep the first `n` tokens' entries. A cache that can no longer be trimmed exactly
        (a sliding window that wrapped) is started afresh instead: the next turn then feeds
        the whole conversation, which is slower but computes exactly what stock would."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        if not any(c.offset > n for c in self.cache):
            return
        if not can_trim_prompt_cache(self.cache):
            self.cache, self.cached = make_prompt_cache(self.model, max_kv_size=self.max_kv_size), []
            return
        for c in self.cache:
            if c.offset > n:
                c.trim(c.offset - n)

    def reply_text(self, conversation_ids: list, token_ids: list, streamed: str) -> str:
        """The reply exactly as it continues the conversation's text.

        The streamed text can differ at its start: mlx_lm's streaming detokenizers drop the
        leading space of the first token (' The' streams as 'The'). Appending that to the
        conversation would condition the next turn on text the model never produced, so
        the reply is decoded in context: decode(conversation + reply) minus decode(conversation)."""
        if not token_ids:
            return streamed
        try:
            before = self.tokenizer.decode(conversation_ids)
            full = self.tokenizer.decode(list(conversation_ids) + list(token_ids))
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode: keep what was shown
            return streamed
        if full.startswith(before):
            return full[len(before):]
        return self.tokenizer.decode(list(token_ids))

    def commit(self, user: str, reply: str):
        if self.template:
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        else:
            self.text = self._joined(user) + reply


class ReplyPrinter:
    """Streams a reply: a thinking model's reasoning dimmed, each tool call it makes as a line
    of its own, the rest as it comes (the markers themselves are not shown; serve/replies.py
    splits the text as mlx_lm.server does). A tokenizer without such markers gets the text
    exactly as decoded. What goes into the conversation is the raw text either way."""

    def __init__(self, tokenizer, prompt_ids: list, console=None):
        from ..serve.replies import ChatReply, initial_state

        self.console = console
        self.ended_line = True
        marked = getattr(tokenizer, "has_thinking", False) or getattr(tokenizer, "has_tool_calling", False)
        self.reply = ChatReply(tokenizer, initial=initial_state(tokenizer, prompt_ids)) if marked else None

    def _text(self, text: str, style: Optional[str] = None):
        if not text:
            return
        if self.console is None and style is None:
            common._write(text)
        else:
            from rich.text import Text

            (self.console or out).print(Text(text, style=style or ""), end="", soft_wrap=True)
        self.ended_line = text.endswith("\n")

    def write(self, piece: str):
        if self.reply is None:
            return self._text(piece)
        self._show(self.reply.feed(piece))

    def finish(self, reason: Optional[str]):
        if self.reply is not None:
            self._show(self.reply.finish("stop" if reason == "stop" else "length"))

    def _show(self, part):
        self._text(part.reasoning, style="dim")
        self._text(part.content)
        for call in part.tool_calls:
            if not self.ended_line:
                self._text("\n")
            f = call.get("function", {})
            self._text(f"-> {f.get('name')}({f.get('arguments')})\n", style="cyan")


def banner(runtime, template: bool) -> str:
    info = runtime.info
    parts = [f"[bold]chronos chat[/bold] · {escape(model_name(info))} ({info.get('model_type')})"]
    if info.get("num_experts"):
        parts.append(f"{info['num_experts']} experts/layer, top-{info['top_k']}")
        parts.append(
            f"budget {info['slots_per_layer']} experts/layer ({human_bytes(info['expert_budget_bytes'])})"
        )
    parts.append("chat template" if template else "plain-text turns")
    parts.append("/help for commands")
    line = " · ".join(parts)
    if _is_demo(info):
        line += (
            "\n[yellow]note:[/yellow] this is the embedded demo model: an 85 M-parameter text model "
            "(trained on manual pages and source code) without a chat template. It continues your text; "
            "it does not answer questions. For a real chat model pass one, e.g. "
            "[cyan]chronos chat -m mlx-community/Qwen3-30B-A3B-4bit[/cyan]"
        )
    return line


def _is_demo(info: dict) -> bool:
    from ..loader import DEFAULT_MODEL

    try:
        return Path(info.get("path", "")).resolve() == Path(DEFAULT_MODEL).resolve()
    except OSError:
        return False


class UndecodableLine(Exception):
    """A line of input that is not UTF-8: reported and skipped, the chat goes on."""


def _read_line(interactive: bool) -> str:
    """One line of user input; EOFError at the end of input, UndecodableLine for bytes
    that are not UTF-8 (the conversation is kept)."""
    try:
        if interactive:
            return Prompt.ask("[bold green]you[/bold green]", console=out)
        raw = getattr(sys.stdin, "buffer", None)
        if raw is None:
            line = sys.stdin.readline()
        else:
            data = raw.readline()
            line = data.decode("utf-8") if data else ""
    except UnicodeDecodeError:
        raise UndecodableLine from None
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


@app.command()
@user_errors
@with_load_options
@with_sampling_options
def chat(
    opts: LoadOptions,
    sampling: Sampling,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens per reply.")] = 256,
    chat_template: Annotated[
        Optional[bool],
        typer.Option(
            "--chat-template/--no-chat-template",
            help="Format the conversation with the tokenizer's chat template. Default: when it has one; "
            "otherwise the turns are joined as plain text and the model continues it.",
            show_default=False,
        ),
    ] = None,
    system_prompt: SystemPromptOption = None,
    chat_template_config: TemplateConfigOption = None,
    max_kv_size: MaxKvOption = None,
):
    """Chat with a model in the terminal, keeping the conversation and its KV cache.

    Commands: /stats, /reset, /help, /quit. Ctrl-C while the model writes stops that reply
    (what was written stays in the conversation); Ctrl-C or Ctrl-D at the prompt leaves.
    When stdin is not a terminal, lines are read from it, one message (or command) per line.

    [bold]Examples[/bold]

    [cyan]chronos chat -b 0.25[/cyan]

    [cyan]printf 'The Roman Empire\\n/stats\\n/quit\\n' | chronos chat --max-tokens 20[/cyan]
    """
    template_kwargs = template_config(chat_template_config)  # a bad one is an error before anything loads
    model, tokenizer, runtime = load_model(opts, chat_template)
    from ..usage import ActivationStats

    usage_stats = ActivationStats.for_runtime(runtime) if runtime.cache is not None else None
    template = use_template(tokenizer, chat_template)
    sampler, processors = sampling.sampler(), sampling.logits_processors()
    session = ChatSession(model, tokenizer, template=template, system=system_prompt, template_kwargs=template_kwargs,
                          max_kv_size=max_kv_size)
    interactive = sys.stdin.isatty()
    err.print(banner(runtime, template), soft_wrap=True)

    while True:
        try:
            line = _read_line(interactive)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                out.print()
            return
        except UndecodableLine:
            error_line("that line is not valid UTF-8 text; skipped (the conversation is kept)")
            continue
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
                    from ..profiles import profile_from_stats, save_profile

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
        printer = ReplyPrinter(tokenizer, ids)

        before = runtime.stats()
        done = run_completion(
            model,
            tokenizer,
            runtime,
            feed,
            opts=opts,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=session.cache,
            on_text=printer.write,
        )
        printer.finish(done.finish_reason)
        session.record(feed, done)
        if not printer.ended_line:
            common._write("\n")
        if done.interrupted:
            err.print("[yellow]\\[interrupted][/yellow]")
        if done.token_ids or not done.interrupted:
            session.commit(line, done.text if template else session.reply_text(ids, done.token_ids, done.text))
        after = runtime.stats()
        rate = after["hits"] - before["hits"], after["misses"] - before["misses"]
        hit = rate[0] / sum(rate) if sum(rate) else 1.0
        err.print(
            f"[dim]{len(done.token_ids)} tokens · hit rate {hit:.1%} · "
            f"read {human_bytes(after['bytes_read'] - before['bytes_read'])}[/dim]",
            soft_wrap=True,
        )


