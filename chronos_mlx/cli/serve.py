"""`chronos serve`: an OpenAI-compatible HTTP server (mlx_lm.server's endpoints and JSON)."""

import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .app import app
from .common import (
    LoadOptions, TemplateConfigOption, err, human_bytes, load_model, template_config, user_errors, with_load_options,
)

DEFAULT_KV_TOKENS = 16384


@app.command()
@user_errors
@with_load_options
def serve(
    opts: LoadOptions,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port).")] = 8080,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, help="Default max_tokens of a request that gives none.")
    ] = 512,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="Default temperature (0: greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Default top_p.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Default top_k (0: every token).")] = 0,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Default min_p.")] = 0.0,
    decode_concurrency: Annotated[
        int, typer.Option("--decode-concurrency", min=1, help="Most requests decoded together in one batch.")
    ] = 32,
    prefill_concurrency: Annotated[
        int, typer.Option("--prefill-concurrency", min=1, help="Most new prompts prefilled together.")
    ] = 8,
    prefill_step_size: Annotated[
        int,
        typer.Option(
            "--prefill-step-size",
            min=1,
            help="Prompt tokens prefilled between two decode steps of the running batch: a new long "
            "prompt holds the others up for one such chunk at a time.",
        ),
    ] = 256,
    kv_tokens: Annotated[
        int,
        typer.Option(
            "--kv-tokens",
            min=1,
            help="KV cache (tokens summed over concurrent requests) that --expert-budget auto leaves room for.",
        ),
    ] = DEFAULT_KV_TOKENS,
    prompt_cache_size: Annotated[
        int,
        typer.Option(
            "--prompt-cache-size",
            min=0,
            help="Finished requests whose KV cache is kept (as mlx_lm.server): a conversation's next turn "
            "prefills only its new tokens. Kept caches and the running batch stay within --kv-tokens. 0: none.",
        ),
    ] = 10,
    chat_template_config: TemplateConfigOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line on stderr for each request.")] = False,
    model_id: Annotated[
        Optional[str], typer.Option("--model-id", help="Model name in /v1/models. Default: the --model given, or the directory name.")
    ] = None,
):
    """Serve the model over HTTP with the OpenAI API (the endpoints and JSON of mlx_lm.server).

    POST /v1/completions and /v1/chat/completions (stream: true for server-sent events),
    GET /v1/models and /health. Concurrent requests share one model and one expert cache
    and are decoded as one batch (mlx_lm's BatchGenerator): each layer loads the union of
    the batch's experts once. Greedy tokens equal stock mlx_lm's for the same batch.
    A conversation's next turn prefills only its new tokens (the prompt cache); chat
    requests take tools, and replies carry reasoning and tool calls as mlx_lm.server's do.

    [bold]Examples[/bold]

    [cyan]chronos serve --port 8080[/cyan]

    [cyan]chronos serve -m mlx-community/Qwen3-30B-A3B-4bit --memory-limit 12GB[/cyan]

    [cyan]curl localhost:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'[/cyan]
    """
    from ..serve import BatchEngine, make_server

    template_kwargs = template_config(chat_template_config)  # a bad one is an error before anything loads
    opts = replace(opts, context_tokens=kv_tokens)
    model, tokenizer, runtime = load_model(opts)
    name = model_id or opts.model or Path(runtime.info.get("path", "model")).name
    engine = BatchEngine(
        model,
        tokenizer,
        runtime,
        decode_concurrency=decode_concurrency,
        prefill_concurrency=prefill_concurrency,
        prefill_step_size=prefill_step_size,
        prompt_cache_size=prompt_cache_size,
        prompt_cache_bytes=_kv_room(runtime.info, kv_tokens),
    )
    try:
        server = make_server(
            engine, host, port, model_id=name, default_max_tokens=max_tokens, default_temperature=temp,
            default_top_p=top_p, default_top_k=top_k, default_min_p=min_p, template_kwargs=template_kwargs,
            info=runtime.info, on_request=None if quiet else _log_request,
        )
    except OSError as e:
        from .common import CliError

        raise CliError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    engine.start()
    bound_host, bound_port = server.server_address[:2]
    info = runtime.info
    budget = (
        f"{info['slots_per_layer']}/{info['num_experts']} experts per layer ({human_bytes(info['expert_budget_bytes'])})"
        if info.get("slots_per_layer")
        else "no experts"
    )
    err.print(
        f"serving [bold]{escape(name)}[/bold] on http://{bound_host}:{bound_port}/v1 "
        f"(OpenAI API; {budget}; up to {decode_concurrency} requests per batch) - Ctrl-C stops",
        soft_wrap=True,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()

    def _terminate(signum, frame):  # SIGTERM (a service manager, `kill`): stop like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while thread.is_alive():
            thread.join(0.5)
            if not engine.healthy:
                raise RuntimeError(f"the generation engine stopped: {engine.failure!r}")
    except KeyboardInterrupt:
        err.print("stopping", soft_wrap=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        server.server_close()
        engine.stop()
    _leave_without_teardown()


def _log_request(r: dict):
    """One line on stderr a request (as mlx_lm.server logs them): what it asked and what it cost."""
    if r["status"] is None and r["finish_reason"] is None:
        return  # the client left before anything was sent
    cached = f" ({r['cached_tokens']} cached)" if r["cached_tokens"] else ""
    tokens = f" · {r['prompt_tokens']} prompt tokens{cached} → {r['completion_tokens']}" if r["prompt_tokens"] else ""
    finish = f" · {r['finish_reason']}" if r["finish_reason"] else ""
    err.print(f"[dim]{r['method']} {escape(r['path'])} {r['status'] or '-'}{tokens} · {r['seconds']:.2f} s{finish}[/dim]",
              soft_wrap=True)


def _kv_room(info: dict, kv_tokens: int) -> Optional[int]:
    """Bytes of KV cache --kv-tokens stands for (what --expert-budget auto left room for)."""
    import json

    from ..budget import kv_bytes_per_token

    try:
        config = json.loads((Path(info["path"]) / "config.json").read_text())
    except (KeyError, OSError, ValueError):
        return None
    per_value = {"float32": 4}.get(str(info.get("dtype")), 2)
    return kv_bytes_per_token(config, per_value) * kv_tokens


def _leave_without_teardown():
    """End the process now that the server and the engine have stopped. After the engine
    thread (which ran the generation stream) has ended, the interpreter's own teardown
    sometimes aborts inside MLX ("terminate called without an active exception", exit -6,
    1 run in 3 of `tests/test_server.py`'s SIGTERM test): a service manager would log a
    crash. Nothing is left to write (stdout and stderr are flushed here), so skip it."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
