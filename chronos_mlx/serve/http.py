"""The HTTP layer of `chronos serve`: mlx_lm.server's endpoints and JSON on a BatchEngine.

Standard library `ThreadingHTTPServer` (as mlx_lm.server): one thread per connection does
parsing, tokenization and writing; all model work is on the engine's thread. Endpoints:

- POST /v1/completions, /v1/chat/completions (also /chat/completions): `prompt` or
  `messages`, `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `top_k`, `min_p`,
  `seed`, `stop`, the penalties and `logit_bias`, `logprobs` (+ `top_logprobs`), `stream`
  (server-sent events ending in `data: [DONE]`), `stream_options.include_usage`; for chat also
  `tools` and `chat_template_kwargs` (given to the chat template), and replies split into
  content, `reasoning` and `tool_calls` as mlx_lm.server splits them (replies.py).
- GET /v1/models, /health.

Malformed requests get a 4xx JSON error `{"error": {"message", "type", "code"}}`; a client
that disconnects (a failed write, or a closed socket seen while waiting) cancels its request.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from .engine import BatchEngine, EngineError, SamplingParams
from .replies import ChatReply, ReplyPart, initial_state


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.param = param


def convert_chat(messages: list) -> str:
    """mlx_lm.server's prompt for a tokenizer without a chat template."""
    roles = {"system": "ASSISTANT's RULE: ", "user": "USER: ", "assistant": "ASSISTANT: "}
    prompt = "".join(f"{roles.get(m['role'], '')}{_content_text(m.get('content'))}\n" for m in messages)
    return (prompt + roles["assistant"]).rstrip()


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise BadRequest("only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise BadRequest("message content must be a string or a list of text parts", param="messages")


def _check(body: dict, name: str, types, *, lo=None, hi=None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"{name} must be of type {_type_names(types)}", param=name)
    if not isinstance(value, types):
        raise BadRequest(f"{name} must be of type {_type_names(types)}", param=name)
    if lo is not None and value < lo:
        raise BadRequest(f"{name} must be at least {lo}", param=name)
    if hi is not None and value > hi:
        raise BadRequest(f"{name} must be at most {hi}", param=name)
    return value


def _logit_bias(body: dict, vocab: int) -> Optional[dict]:
    """OpenAI's logit_bias ({"token id": bias}, keys are strings in JSON) as {int: float}."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: '{key}' is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab:
            raise BadRequest(f"logit_bias: token id {token} is out of range", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias: the bias of token {token} must be a number from -100 to 100",
                             param="logit_bias")
        out[token] = float(value)
    return out or None


def _template_message(message: dict) -> dict:
    """A message as chat templates take it (as mlx_lm.server gives it them): text content, and
    the arguments of earlier tool calls as objects (OpenAI sends them as JSON strings)."""
    out = dict(message, content=_content_text(message.get("content")))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        fixed = []
        for call in calls:
            func = call.get("function") if isinstance(call, dict) else None
            if isinstance(func, dict) and isinstance(func.get("arguments"), str):
                try:
                    func = dict(func, arguments=json.loads(func["arguments"]))
                except json.JSONDecodeError:
                    raise BadRequest("a tool call's arguments are not valid JSON", param="messages") from None
                call = dict(call, function=func)
            fixed.append(call)
        out["tool_calls"] = fixed
    return out


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


class ChronosServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine: BatchEngine, model_id: str, *, default_max_tokens: int = 512,
                 default_temperature: float = 0.0, default_top_p: float = 1.0, default_top_k: int = 0,
                 default_min_p: float = 0.0, template_kwargs: Optional[dict] = None, info: Optional[dict] = None,
                 on_request=None):
        """`on_request(summary)`: called after each POST with a dict (method, path, status,
        prompt / cached / completion tokens, seconds, finish reason): the CLI logs it."""
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self.default_temperature = default_temperature
        self.default_top_p = default_top_p
        self.default_top_k = default_top_k
        self.default_min_p = default_min_p
        self.template_kwargs = template_kwargs or {}  # a request's chat_template_kwargs add to these
        self.on_request = on_request
        self.info = info or {}
        self.created = int(time.time())
        self.fingerprint = "chronos-mlx"
        super().__init__(address, Handler)


def make_server(engine: BatchEngine, host: str = "127.0.0.1", port: int = 8080, model_id: str = "default_model", **kw) -> ChronosServer:
    """A server bound to (host, port) (port 0: any free port, see `server.server_address`)."""
    return ChronosServer((host, port), engine, model_id, **kw)


class Handler(BaseHTTPRequestHandler):
    server: ChronosServer
    protocol_version = "HTTP/1.1"
    server_version = "chronos-mlx"

    def log_message(self, format, *args):  # library code never prints
        pass

    # --- plumbing -----------------------------------------------------------------------
    def _send_json(self, status: int, obj):
        self._status = status
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def _client_alive(self) -> bool:
        """False once the client has closed its end (readable with no data)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return True
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def do_OPTIONS(self):
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # --- GET ----------------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            ok = self.server.engine.healthy
            self._send_json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        elif path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name == self.server.model_id:
                self._send_json(200, self._model_card())
            else:
                self._error(404, f"model '{name}' not found", kind="not_found_error")
        else:
            self._error(404, f"no endpoint {path}", kind="not_found_error")

    def _model_card(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "chronos-mlx"}

    # --- POST ---------------------------------------------------------------------------
    def do_POST(self):
        self._status, self._handle, self._finish = None, None, None
        t0 = time.perf_counter()
        try:
            self._post()
        finally:
            self._report(t0)

    def _report(self, t0: float):
        report = self.server.on_request
        if report is None:
            return
        h = self._handle
        try:
            report({"method": "POST", "path": self.path.split("?", 1)[0], "status": self._status,
                    "prompt_tokens": h.prompt_tokens if h else 0, "cached_tokens": h.cached_tokens if h else 0,
                    "completion_tokens": h.completion_tokens if h else 0, "seconds": time.perf_counter() - t0,
                    "finish_reason": self._finish})
        except Exception:  # a logger that fails must not take the request down with it
            pass

    def _post(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        kinds = {"/v1/completions": "text", "/completions": "text", "/v1/chat/completions": "chat", "/chat/completions": "chat"}
        length = self.headers.get("Content-Length")
        body_bytes = b""
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                return self._error(400, "invalid Content-Length header")
            body_bytes = self.rfile.read(n)
        if path not in kinds:
            return self._error(404, f"no endpoint {path}", kind="not_found_error")
        if length is None:
            self.close_connection = True
            return self._error(411, "Content-Length header is required")
        try:
            body = json.loads(body_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(400, f"invalid JSON in request body: {e}")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        try:
            req = self._parse(kinds[path], body)
            prompt_ids = req["prompt_tokens"] = self._tokenize(req)
        except BadRequest as e:
            return self._error(e.status, str(e), e.param)
        try:
            handle = self._handle = self.server.engine.submit(prompt_ids, req["params"], keep_at=req.get("keep_at", ()))
        except (EngineError, ValueError) as e:
            return self._error(503 if isinstance(e, EngineError) else 400, str(e), kind="server_error")
        try:
            if req["stream"]:
                self._stream(req, handle)
            else:
                self._complete(req, handle)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            handle.cancel()
            self.close_connection = True
        finally:
            if not handle.done.is_set():
                handle.cancel()

    def _parse(self, kind: str, body: dict) -> dict:
        s = self.server
        stream = _check(body, "stream", bool, default=False)
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = _check(body, "max_tokens", int, lo=1, default=s.default_max_tokens)
        else:
            max_tokens = _check(body, "max_completion_tokens", int, lo=1)
        temperature = _check(body, "temperature", (int, float), lo=0, default=s.default_temperature)
        top_p = _check(body, "top_p", (int, float), lo=0, hi=1, default=s.default_top_p)
        seed = _check(body, "seed", int)
        logprobs = body.get("logprobs", False)
        top_logprobs = 0
        if kind == "text" and isinstance(logprobs, int) and not isinstance(logprobs, bool):
            # the legacy completions API: logprobs is the number of top alternatives
            if not 0 <= logprobs <= 20:
                raise BadRequest("logprobs must be between 0 and 20", param="logprobs")
            top_logprobs, logprobs = logprobs, True
        else:
            logprobs = _check(body, "logprobs", bool, default=False)
            top_logprobs = _check(body, "top_logprobs", int, lo=0, hi=20, default=0)
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > 16:
            raise BadRequest("stop must be a string or a list of at most 16 strings", param="stop")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        model = body.get("model", s.model_id)
        if model is not None and not isinstance(model, str):
            raise BadRequest("model must be a string", param="model")
        n = body.get("n", 1)
        if n != 1:
            raise BadRequest("only n=1 is supported", param="n")
        req = {
            "kind": kind,
            "stream": stream,
            "include_usage": bool(stream_options.get("include_usage")),
            "model": model or s.model_id,
            "params": SamplingParams(
                max_tokens=max_tokens,
                temperature=float(temperature),
                top_p=float(top_p),
                seed=seed,
                stop=stop,
                logprobs=bool(logprobs),
                top_logprobs=int(top_logprobs or 0),
                # mlx_lm.server's extensions, and OpenAI's penalties and logit_bias
                top_k=_check(body, "top_k", int, lo=0, default=s.default_top_k),
                min_p=float(_check(body, "min_p", (int, float), lo=0, hi=1, default=s.default_min_p)),
                repetition_penalty=float(_check(body, "repetition_penalty", (int, float), lo=0, default=0.0)),
                repetition_context_size=_check(body, "repetition_context_size", int, lo=1, default=20),
                presence_penalty=float(_check(body, "presence_penalty", (int, float), lo=-2, hi=2, default=0.0)),
                frequency_penalty=float(_check(body, "frequency_penalty", (int, float), lo=-2, hi=2, default=0.0)),
                logit_bias=_logit_bias(body, self._vocab_size()),
            ),
        }
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list", param="messages")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise BadRequest("each message must be an object with a role", param="messages")
                if m.get("content") is not None:
                    _content_text(m["content"])
            req["messages"] = messages
            tools = body.get("tools")
            if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
                raise BadRequest("tools must be a list of objects", param="tools")
            kwargs = body.get("chat_template_kwargs")
            if kwargs is not None and not isinstance(kwargs, dict):
                raise BadRequest("chat_template_kwargs must be an object", param="chat_template_kwargs")
            req["tools"], req["template_kwargs"] = tools or None, {**self.server.template_kwargs, **(kwargs or {})}
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                req["prompt_ids"] = prompt
            elif isinstance(prompt, str) and prompt:
                req["prompt"] = prompt
            else:
                raise BadRequest("prompt must be a non-empty string (or a list of token ids)", param="prompt")
        return req

    def _vocab_size(self) -> int:
        tok = self.server.engine.tokenizer
        return getattr(tok, "vocab_size", None) or len(tok.vocab)

    def _tokenize(self, req: dict) -> list:
        tok = self.server.engine.tokenizer
        if "prompt_ids" in req:
            vocab = self._vocab_size()
            if any(t < 0 or t >= vocab for t in req["prompt_ids"]):
                raise BadRequest("prompt token id out of range", param="prompt")
            return list(req["prompt_ids"])
        if req["kind"] == "text":
            return list(tok.encode(req["prompt"]))
        messages = [_template_message(m) for m in req["messages"]]
        if getattr(tok, "has_chat_template", False) or getattr(tok, "chat_template", None):
            kwargs = dict(req["template_kwargs"])
            if req["tools"]:
                kwargs["tools"] = req["tools"]
            try:
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            except Exception as e:
                raise BadRequest(f"the chat template rejected the messages: {e}", param="messages")
            if isinstance(ids, str):
                ids = tok.encode(ids, add_special_tokens=False)
            elif hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = [int(t) for t in ids]
            req["keep_at"] = self._system_end(messages, ids, kwargs)
            return ids
        return list(tok.encode(convert_chat(messages)))

    # --- responses ----------------------------------------------------------------------
    def _base(self, req: dict, rid: str, obj: str) -> dict:
        return {
            "id": rid,
            "system_fingerprint": self.server.fingerprint,
            "object": obj,
            "model": req["model"],
            "created": int(time.time()),
        }

    def _system_end(self, messages: list, ids: list, kwargs: dict) -> tuple:
        """Where the system messages end in a chat prompt (as mlx_lm.server finds it: the prompt
        against the template applied to them and an empty user turn), for the prompt cache to
        keep: conversations that share them prefill them once. () when there are none."""
        n = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
        if n == 0 or messages[-1].get("role") != "user" or self.server.engine.prompt_cache is None:
            return ()
        try:
            head = self.server.engine.tokenizer.apply_chat_template(
                messages[:n] + [{"role": "user", "content": ""}], add_generation_prompt=False, **kwargs)
        except Exception:  # the template wants something else: nothing to keep
            return ()
        if isinstance(head, str) or hasattr(head, "keys"):
            return ()
        end = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), 0)
        return (end,) if end > 0 else ()

    def _reply(self, req: dict, stream: bool) -> Optional[ChatReply]:
        """How a chat request's text is split (None for plain completions)."""
        if req["kind"] != "chat":
            return None
        tok = self.server.engine.tokenizer
        return ChatReply(tok, req["tools"], streaming=stream, initial=initial_state(tok, req["prompt_tokens"]))

    def _choice(self, req: dict, text: str, finish, logprobs: Optional[list], stream: bool,
                part: Optional[ReplyPart] = None) -> dict:
        choice = {"index": 0, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = {"content": logprobs}
        elif req["params"].logprobs:
            choice["logprobs"] = {"content": []} if not stream else None
        else:
            choice["logprobs"] = None
        if req["kind"] == "chat":
            if part is not None:
                text = part.content
            if stream:
                delta = {"role": "assistant"}
                if text:
                    delta["content"] = text
            else:
                delta = {"role": "assistant", "content": text if text else None}
            if part is not None and part.reasoning:
                delta["reasoning"] = part.reasoning
            if part is not None and part.tool_calls:
                delta["tool_calls"] = part.tool_calls
            choice["delta" if stream else "message"] = delta
        else:
            choice["text"] = text
        return choice

    @staticmethod
    def _logprob_entry(ev) -> dict:
        entry = {"id": ev.token, "logprob": ev.logprob}
        if ev.top_logprobs:
            entry["top_logprobs"] = list(ev.top_logprobs)
        return entry

    @staticmethod
    def _finish(reason):
        return {"cancelled": "stop", "error": "stop"}.get(reason, reason)

    def _usage(self, handle) -> dict:
        return {
            "prompt_tokens": handle.prompt_tokens,
            "completion_tokens": handle.completion_tokens,
            "total_tokens": handle.prompt_tokens + handle.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": handle.cached_tokens},  # as mlx_lm.server
        }

    def _complete(self, req: dict, handle):
        rid = ("chatcmpl-" if req["kind"] == "chat" else "cmpl-") + str(uuid.uuid4())
        text, logprobs, finish, error = "", [], None, None
        reply, whole = self._reply(req, stream=False), ReplyPart()
        for ev in handle.events(alive=self._client_alive):
            text += ev.text
            if reply is not None:
                _join(whole, reply.feed(ev.text))
            if ev.logprob is not None:
                logprobs.append(self._logprob_entry(ev))
            if ev.finish_reason:
                finish, error = ev.finish_reason, ev.error
        self._finish = finish
        if finish == "cancelled":
            self.close_connection = True
            return
        if finish == "error":
            return self._error(500, error or "generation failed", kind="server_error")
        resp = self._base(req, rid, "chat.completion" if req["kind"] == "chat" else "text_completion")
        if reply is not None:
            _join(whole, reply.finish(finish))
            finish = reply.finish_reason(finish)
        self._finish = finish
        resp["choices"] = [self._choice(req, text, finish, logprobs, stream=False, part=whole if reply else None)]
        resp["usage"] = self._usage(handle)
        self._send_json(200, resp)

    def _stream(self, req: dict, handle):
        rid = ("chatcmpl-" if req["kind"] == "chat" else "cmpl-") + str(uuid.uuid4())
        obj = "chat.completion.chunk" if req["kind"] == "chat" else "text_completion"
        self.send_response(200)
        self._status = 200
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Connection", "close")  # the stream ends with the connection
        self.end_headers()
        self.close_connection = True

        def send(obj_):
            self.wfile.write(f"data: {json.dumps(obj_)}\n\n".encode())
            self.wfile.flush()

        finish, reply, held = None, self._reply(req, stream=True), []
        for ev in handle.events(alive=self._client_alive):
            if ev.finish_reason == "cancelled":
                return
            if ev.finish_reason == "error":
                send({"error": {"message": ev.error or "generation failed", "type": "server_error", "code": 500}})
                break
            if ev.logprob is not None:
                held.append(self._logprob_entry(ev))
            reason = ev.finish_reason
            part = None
            if reply is not None:
                part = reply.feed(ev.text)
                if reason:
                    _join(part, reply.finish(reason))
                    reason = reply.finish_reason(reason)
                if reply.in_tool_call and not part and not reason:
                    continue  # a call's text is sent whole, once it has ended (its logprobs with it)
            if reason:
                finish = self._finish = reason
            if (part if part is not None else ev.text) or held or reason:
                chunk = self._base(req, rid, obj)
                chunk["choices"] = [self._choice(req, ev.text, reason, held or None, stream=True, part=part)]
                send(chunk)
                held = []
        if finish is not None and req["include_usage"]:
            usage = self._base(req, rid, obj)
            usage["choices"] = []
            usage["usage"] = self._usage(handle)
            send(usage)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _join(into: ReplyPart, part: ReplyPart):
    into.content += part.content
    into.reasoning += part.reasoning
    into.tool_calls += part.tool_calls
