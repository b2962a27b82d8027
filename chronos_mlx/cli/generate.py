"""`chronos generate`: one completion for one prompt, streamed or as JSON."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common
from .app import app
from .common import (
    CliError, LoadOptions, MaxKvOption, Sampling, SystemPromptOption, TEMPLATE_HELP, TemplateConfigOption, encode_messages,
    encode_text, err, load_model, read_prompt, run_completion, stats_table, summary_line, template_config,
    use_template, user_errors, with_load_options, with_sampling_options,
)


@app.command()
@user_errors
@with_load_options
@with_sampling_options
def generate(
    opts: LoadOptions,
    sampling: Sampling,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text ('-': read it from stdin).")] = None,
    prompt_file: Annotated[
        Optional[Path],
        typer.Option("--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")] = 256,
    chat_template: Annotated[
        Optional[bool], typer.Option("--chat-template/--no-chat-template", help=TEMPLATE_HELP, show_default=False)
    ] = None,
    system_prompt: SystemPromptOption = None,
    chat_template_config: TemplateConfigOption = None,
    max_kv_size: MaxKvOption = None,
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
    kwargs = template_config(chat_template_config)
    model, tokenizer, runtime = load_model(opts, chat_template)
    if use_template(tokenizer, chat_template):
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        ids = encode_messages(tokenizer, system + [{"role": "user", "content": text}], kwargs)
    else:
        ids = encode_text(tokenizer, f"{system_prompt}\n{text}" if system_prompt else text)
    if not ids:
        raise CliError("the prompt encodes to no tokens")

    streamed = {"newline": True}

    def show(piece: str):
        common._write(piece)
        streamed["newline"] = piece.endswith("\n")

    done = run_completion(
        model,
        tokenizer,
        runtime,
        ids,
        opts=opts,
        max_tokens=max_tokens,
        sampler=sampling.sampler(),
        logits_processors=sampling.logits_processors(),
        prompt_cache=_kv_cache(model, max_kv_size),
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
        common._write(json.dumps(payload, default=str) + "\n")
    else:
        if not streamed["newline"]:
            common._write("\n")
        if done.interrupted:
            err.print("[yellow]\\[interrupted][/yellow]")
        err.print(f"[dim]{summary_line(stats)}[/dim]", soft_wrap=True)
        if verbose:
            err.print(stats_table(stats))
    if done.interrupted:
        raise typer.Exit(130)




def _kv_cache(model, max_kv_size: Optional[int]):
    """A rotating KV cache of `max_kv_size` tokens (mlx_lm's), or None: the decode loop makes a plain one."""
    if max_kv_size is None:
        return None
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model, max_kv_size=max_kv_size)
