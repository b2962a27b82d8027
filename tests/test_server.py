"""`chronos serve`: the OpenAI endpoints (through the official `openai` client), batching,
cancellation and malformed requests.

Exactness: greedy tokens of a request equal stock mlx_lm's (a) for the same batch composition:
the engine's batch vs stock mlx_lm's BatchGenerator on stock `mlx_lm.load`, (b) alone: a
request vs stock `mlx_lm.generate`. Through HTTP the composition depends on arrival times, so
concurrent HTTP requests are compared with stock alone (on the demo model, float32 CPU, batch
rows equal single-sequence decoding; test_engine_batch_equals_stock_batch_generator holds for
any model)."""

import http.client
import json
import socket
import threading
import time

import mlx.core as mx
import pytest

import chronos_mlx
from chronos_mlx.serve import BatchEngine, SamplingParams, make_server
from chronos_mlx.serve.http import convert_chat

openai = pytest.importorskip("openai")

PROMPTS = ["The history of the Roman Empire begins", "def main(", "Once upon a time there was", "La storia di Roma"]
BUDGET = 0.25  # experts are streamed: misses happen in every test


@pytest.fixture(scope="module")
def stock():
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(chronos_mlx.DEFAULT_MODEL))
    model.set_dtype(mx.float32)
    return model, tokenizer


def stock_alone(stock, ids, n):
    from mlx_lm.generate import generate_step

    model, tok = stock
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=n):
        out.append(int(t))
        if int(t) in tok.eos_token_ids:
            break
    return out


def stock_batch(stock, prompts_ids, n, prefill_step_size, logits_processors=None):
    from mlx_lm.generate import BatchGenerator, make_stop_sequences

    model, tok = stock
    gen = BatchGenerator(model, max_tokens=n, prefill_step_size=prefill_step_size)
    uids = gen.insert(prompts_ids, stop_sequences=[make_stop_sequences(tok)] * len(prompts_ids),
                      logits_processors=logits_processors)
    out = {u: [] for u in uids}
    done = set()
    while len(done) < len(uids):
        for r in gen.next_generated():
            out[r.uid].append(int(r.token))
            if r.finish_reason:
                done.add(r.uid)
    gen.close()
    return [out[u] for u in uids]


@pytest.fixture(scope="module")
def served():
    model, tokenizer, runtime = chronos_mlx.load(None, BUDGET, dtype="float32")
    engine = BatchEngine(model, tokenizer, runtime, prefill_step_size=64).start()
    server = make_server(engine, "127.0.0.1", 0, model_id="demo")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, engine, tokenizer, runtime
    server.shutdown()
    server.server_close()
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def raw(url, method, path, body=None, headers=None):
    """(status, parsed JSON or text) without any client library."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def wait_idle(engine, timeout=10.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not engine._active and engine._inbox.empty():
            return True
        time.sleep(0.02)
    return False


# --- endpoints and shapes ------------------------------------------------------------------


def test_models_and_health(served, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert models.data[0].object == "model"
    assert raw(served[0], "GET", "/health") == (200, {"status": "ok"})


def test_completion_equals_stock_generate_with_mlx_lm_server_shape(served, client, stock):
    _, _, tok, runtime = served
    misses = runtime.total_misses()
    r = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=12, logprobs=True)
    ids = [e["id"] for e in r.choices[0].logprobs.content]
    assert ids == stock_alone(stock, tok.encode(PROMPTS[0]), 12)
    import mlx_lm

    assert r.choices[0].text == mlx_lm.generate(stock[0], stock[1], PROMPTS[0], max_tokens=12)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(tok.encode(PROMPTS[0])), 12, len(tok.encode(PROMPTS[0])) + 12,
    )
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # this engine keeps no prompt cache
    assert runtime.total_misses() > misses  # experts were streamed for it


def test_chat_completion_uses_mlx_lm_servers_prompt_without_a_template(served, client, stock):
    _, _, tok, _ = served
    messages = [{"role": "user", "content": "Tell me about Rome"}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    import mlx_lm

    prompt = convert_chat(messages)
    assert prompt == "USER: Tell me about Rome\nASSISTANT:"  # mlx_lm.server's convert_chat
    want = stock_alone(stock, tok.encode(prompt), 8)
    assert r.choices[0].message.content == mlx_lm.generate(stock[0], stock[1], prompt, max_tokens=8)
    assert r.usage.completion_tokens == len([t for t in want if t not in tok.eos_token_ids])


def test_chat_stream_is_sse_ending_in_done_with_usage(served, client):
    messages = [{"role": "user", "content": "Tell me about Rome"}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # the raw stream: server-sent events, the last one `data: [DONE]`
    status, body = raw(served[0], "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "stream": True})
    events = [e for e in body.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_text_stream_and_stop_and_logprobs(served, client):
    full = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=16).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop
    cut = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=16, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=16, stop=stop, stream=True)
    )
    assert streamed == cut.choices[0].text
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-5 for c in content)  # greedy: the best token


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="demo", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b


# --- batching --------------------------------------------------------------------------------


def test_four_concurrent_requests_all_equal_stock(served, client, stock):
    _, engine, tok, _ = served
    steps_before = len(engine.batch_sizes)
    results = [None] * 4

    def ask(i):
        r = client.completions.create(model="demo", prompt=PROMPTS[i], max_tokens=24, logprobs=True)
        results[i] = [e["id"] for e in r.choices[0].logprobs.content]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, p in enumerate(PROMPTS):
        assert results[i] == stock_alone(stock, tok.encode(p), 24)
    assert max(engine.batch_sizes[steps_before:]) > 1  # they were decoded together


def test_engine_batch_equals_stock_batch_generator(stock):
    """Same batch composition (4 prompts inserted at once), a small budget: every sequence's
    greedy tokens are stock mlx_lm BatchGenerator's; the batch loads each layer's union once."""
    model, tok, runtime = chronos_mlx.load(None, 0.125, dtype="float32")
    ids = [tok.encode(p) for p in PROMPTS]
    engine = BatchEngine(model, tok, runtime, prefill_step_size=4)
    handles = [engine.submit(i, SamplingParams(max_tokens=16)) for i in ids]  # queued before the thread starts
    with engine:
        got = []
        for h in handles:
            got.append([e.token for e in h.events() if e.token is not None])
    assert engine.insert_log[0][1] == [0, 1, 2, 3]  # one composition
    want = stock_batch(stock, ids, 16, prefill_step_size=4)
    assert got == [[t for t in w if t not in tok.eos_token_ids] for w in want]
    assert runtime.total_misses() > 0


def test_penalties_and_logit_bias_are_mlx_lm_servers(stock):
    """Per-request logits processors (mlx_lm's own, as mlx_lm.server makes them) in one batch
    beside a request without any: every sequence is stock BatchGenerator's with the same ones."""
    from mlx_lm.sample_utils import make_logits_processors

    model, tok, runtime = chronos_mlx.load(None, 0.25, dtype="float32")
    ids = [tok.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(max_tokens=12, repetition_penalty=1.5, repetition_context_size=8),
              SamplingParams(max_tokens=12, logit_bias={11: 4.0}, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(max_tokens=12)]
    engine = BatchEngine(model, tok, runtime, prefill_step_size=4)
    handles = [engine.submit(i, p) for i, p in zip(ids, params)]
    with engine:
        got = [[e.token for e in h.events() if e.token is not None] for h in handles]
    processors = [make_logits_processors(repetition_penalty=1.5, repetition_context_size=8),
                  make_logits_processors(logit_bias={11: 4.0}, presence_penalty=0.5, frequency_penalty=0.3), []]
    want = stock_batch(stock, ids, 12, prefill_step_size=4, logits_processors=processors)
    plain = stock_batch(stock, ids, 12, prefill_step_size=4)
    assert want[0] != plain[0] and want[1] != plain[1]  # they change the text here
    assert got == [[t for t in w if t not in tok.eos_token_ids] for w in want]


def test_sampling_options_of_mlx_lm_server_reach_the_request(served, client):
    """top_k / min_p (mlx_lm.server's) and OpenAI's logit_bias, through the official client."""
    r = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=3, logit_bias={"11": 100}, logprobs=True)
    assert [e["id"] for e in r.choices[0].logprobs.content] == [11, 11, 11]
    kw = dict(model="demo", prompt=PROMPTS[2], max_tokens=6, temperature=2.0, seed=5)
    greedy = client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=6).choices[0].text
    assert client.completions.create(extra_body={"top_k": 1}, **kw).choices[0].text == greedy
    assert client.completions.create(extra_body={"min_p": 1.0}, **kw).choices[0].text == greedy


def test_the_servers_sampling_defaults_apply_to_requests_that_set_none(served, client):
    """`chronos serve --temp 2 --top-k 1`: a request without sampling fields samples among one
    token, which is greedy decoding."""
    _, engine, _, _ = served
    hot = make_server(engine, "127.0.0.1", 0, model_id="demo", default_temperature=2.0, default_top_k=1)
    thread = threading.Thread(target=hot.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        code, data = raw(f"http://127.0.0.1:{hot.server_address[1]}", "POST", "/v1/completions",
                         {"prompt": PROMPTS[2], "max_tokens": 6, "seed": 1})
    finally:
        hot.shutdown()
        hot.server_close()
    assert code == 200
    assert data["choices"][0]["text"] == client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=6).choices[0].text


def test_tools_and_earlier_calls_reach_the_chat_template_and_the_reply_is_stocks(tmp_path, stock):
    """With a tokenizer that calls tools (mlx_lm's json_tools parser): `tools` and a history with
    a call (its arguments a JSON string, as OpenAI sends them) are rendered by the template as
    mlx_lm.server renders them. The demo model then starts a call of its own (stock's greedy
    text begins with the marker) that the token limit cuts: as in mlx_lm.server, none of its
    text is content and a call that does not parse is left out."""
    import mlx_lm
    from synthetic import write_chat_model

    path = write_chat_model(tmp_path / "chat", thinking=False)
    model, tok, runtime = chronos_mlx.load(str(path), 0.25, dtype="float32")
    preamble = {"preamble": "Tools first."}  # `chronos serve --chat-template-config`: every request's
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    as_template_sees_it = [messages[0], dict(messages[1], content="", tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}]), messages[2]]
    want_ids = tok.apply_chat_template(as_template_sees_it, tools=tools, add_generation_prompt=True, **preamble)
    assert '"city": "Rome"' in tok.decode(want_ids)
    engine = BatchEngine(model, tok, runtime, prefill_step_size=64).start()
    server = make_server(engine, "127.0.0.1", 0, model_id="chat", template_kwargs=preamble)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    body = {"messages": messages, "tools": tools, "max_tokens": 8}
    try:
        code, data = raw(url, "POST", "/v1/chat/completions", body)
        _, streamed = raw(url, "POST", "/v1/chat/completions", dict(body, stream=True))
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()
    assert code == 200, data
    assert data["usage"]["prompt_tokens"] == len(want_ids)
    stock_text = mlx_lm.generate(stock[0], stock[1], want_ids, max_tokens=8)
    assert stock_text.startswith("<tool_call>") and "</tool_call>" not in stock_text
    message = data["choices"][0]["message"]
    assert message["content"] is None and "tool_calls" not in message
    assert data["choices"][0]["finish_reason"] == "length"
    assert "<tool_call>" not in streamed and '"finish_reason": "length"' in streamed


def stock_turns(stock, turns, n, prefill_step_size):
    """Stock mlx_lm (BatchGenerator and LRUPromptCache, as mlx_lm.server keeps a conversation)
    decoding `turns` one after another: each starts from the longest cached prefix of its prompt."""
    from mlx_lm.generate import BatchGenerator, make_stop_sequences
    from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

    model, tok = stock
    kept, outs = LRUPromptCache(10), []
    for ids in turns:
        cache, rest = kept.fetch_nearest_cache("model", ids)
        if cache is not None and not rest:
            trim_prompt_cache(cache, 1)
            rest = ids[-1:]
        cached = len(ids) - len(rest) if cache is not None else 0
        gen = BatchGenerator(model, max_tokens=n, prefill_step_size=prefill_step_size)
        gen.insert([ids[cached:]], caches=[cache], all_tokens=[ids[:cached]], stop_sequences=[make_stop_sequences(tok)])
        out, done = [], False
        while not done:
            for r in gen.next_generated():
                out.append(int(r.token))
                if r.finish_reason:
                    kept.insert_cache("model", list(r.all_tokens), r.prompt_cache)
                    done = True
        gen.close()
        outs.append((out, cached))
    return outs


def test_a_conversations_next_turn_starts_from_its_kept_kv_cache_as_mlx_lm_servers_does(stock):
    """Two turns (the second prompt is the first, its reply and more): the second prefills only
    what is new, and both give stock mlx_lm's tokens decoded the same way."""
    model, tok, runtime = chronos_mlx.load(None, 0.25, dtype="float32")
    first = tok.encode(PROMPTS[0])
    engine = BatchEngine(model, tok, runtime, prefill_step_size=16, prompt_cache_size=4)
    with engine:
        h1 = engine.submit(first, SamplingParams(max_tokens=10))
        reply = [e.token for e in h1.events() if e.token is not None]
        second = first + reply + tok.encode(" and then", add_special_tokens=False)
        h2 = engine.submit(second, SamplingParams(max_tokens=10))
        again = [e.token for e in h2.events() if e.token is not None]
    (want1, _), (want2, cached) = stock_turns(stock, [first, second], 10, prefill_step_size=16)
    assert reply == [t for t in want1 if t not in tok.eos_token_ids]
    assert again == [t for t in want2 if t not in tok.eos_token_ids]
    assert again == stock_alone(stock, second, 10)  # the same as prefilling the whole conversation
    assert h1.cached_tokens == 0 and h2.cached_tokens == cached > len(first)
    assert engine.cached_prompt_tokens == cached


def test_kept_caches_stay_within_the_bytes_given_them(stock):
    """With room for about one and a half of these conversations' KV, later ones push the
    least recently used out (without a bound all three stay)."""
    model, tok, runtime = chronos_mlx.load(None, 0.25, dtype="float32")
    room = 0
    with BatchEngine(model, tok, runtime, prompt_cache_size=4) as engine:
        engine.generate(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=4))
        room = int(engine.prompt_cache.nbytes * 1.5)
    with BatchEngine(model, tok, runtime, prompt_cache_size=4, prompt_cache_bytes=room) as engine:
        for p in PROMPTS[:3]:
            engine.generate(tok.encode(p), SamplingParams(max_tokens=4))
            assert 0 < engine.prompt_cache.nbytes <= room
        assert len(engine.prompt_cache) < 3


def test_a_hybrid_models_conversation_resumes_from_its_kept_state_exactly(tmp_path):
    """qwen3_next keeps linear-attention state that cannot be trimmed back: a next turn still
    starts from the kept state of the whole conversation, and gives stock mlx_lm's tokens for
    the whole conversation."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from synthetic import write_synthetic_moe

    path = write_synthetic_moe(tmp_path / "qwen3_next", "qwen3_next", bits=4)
    model, tok, runtime = chronos_mlx.load(str(path), 0.5, dtype="float32")
    first = list(range(5, 45))
    with BatchEngine(model, tok, runtime, prefill_step_size=16, prompt_cache_size=4) as engine:
        h1 = engine.submit(first, SamplingParams(max_tokens=6))
        reply = [e.token for e in h1.events() if e.token is not None]
        second = first + reply + list(range(100, 110))
        h2 = engine.submit(second, SamplingParams(max_tokens=6))
        got = [e.token for e in h2.events() if e.token is not None]
    stock_model, _ = load(str(path))
    stock_model.set_dtype(mx.float32)
    assert got == [int(t) for t, _ in generate_step(mx.array(second), stock_model, max_tokens=6)]
    assert h2.cached_tokens == len(first) + len(reply)


def test_a_system_prompt_kept_while_its_request_still_runs_is_not_prefilled_again(stock):
    """A request asks for its prompt's KV cache to be kept where its system part ends: a second
    conversation with the same system part, arriving while the first still decodes, starts
    from there. Both give stock mlx_lm's tokens."""
    model, tok, runtime = chronos_mlx.load(None, 0.25, dtype="float32")
    system = tok.encode(PROMPTS[0] + " " + PROMPTS[2])
    one, two = system + tok.encode(" and the", add_special_tokens=False), system + tok.encode(" but", add_special_tokens=False)
    engine = BatchEngine(model, tok, runtime, prefill_step_size=8, prompt_cache_size=4)
    with engine:
        h1 = engine.submit(one, SamplingParams(max_tokens=24), keep_at=[len(system)])
        events = h1.events()
        first = next(e for e in events if e.token is not None)  # its prompt, system part kept, is done
        h2 = engine.submit(two, SamplingParams(max_tokens=8), keep_at=[len(system)])
        got2 = [e.token for e in h2.events() if e.token is not None]
        got1 = [first.token] + [e.token for e in events if e.token is not None]
    assert h2.cached_tokens == len(system) and h1.cached_tokens == 0
    assert got2 == stock_alone(stock, two, 8)
    assert got1 == stock_alone(stock, one, 24)


def test_a_chat_prompts_system_part_is_found_as_mlx_lm_server_finds_it(tmp_path):
    """The first conversation is still streaming (its own cache not kept yet) when the second,
    with the same system messages, arrives: it starts where they end."""
    from synthetic import write_chat_model

    path = write_chat_model(tmp_path / "chat", thinking=False)
    model, tok, runtime = chronos_mlx.load(str(path), 0.25, dtype="float32")
    engine = BatchEngine(model, tok, runtime, prompt_cache_size=4).start()
    server = make_server(engine, "127.0.0.1", 0, model_id="chat")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    system = {"role": "system", "content": PROMPTS[0] + " " + PROMPTS[2]}
    url = f"http://127.0.0.1:{server.server_address[1]}"
    host, port = url.split("//")[1].split(":")
    streaming = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        streaming.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": [system, {"role": "user", "content": "Hi"}], "max_tokens": 40, "stream": True}),
            headers={"Content-Type": "application/json"})
        first = streaming.getresponse()
        assert first.readline().startswith(b"data: ")  # its first token: its prompt is done
        _, second = raw(url, "POST", "/v1/chat/completions", {"messages": [system, {"role": "user", "content": "Bye"}], "max_tokens": 2})
        first.read()
    finally:
        streaming.close()
        server.shutdown()
        server.server_close()
        engine.stop()
    head = tok.apply_chat_template([system, {"role": "user", "content": ""}], add_generation_prompt=False)
    full = tok.apply_chat_template([system, {"role": "user", "content": "Bye"}], add_generation_prompt=True)
    shared = next(i for i, (a, b) in enumerate(zip(head, full)) if a != b)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == shared > len(tok.encode(system["content"])) // 2


def test_each_post_is_reported_with_what_it_cost(served):
    _, engine, tok, _ = served
    reports = []
    server = make_server(engine, "127.0.0.1", 0, model_id="demo", on_request=reports.append)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        raw(url, "POST", "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 3})
        raw(url, "POST", "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 0})
    finally:
        server.shutdown()
        server.server_close()
    done, refused = reports
    assert (done["status"], done["completion_tokens"], done["finish_reason"]) == (200, 3, "length")
    assert done["prompt_tokens"] == len(tok.encode(PROMPTS[1])) and done["seconds"] > 0
    assert (refused["status"], refused["prompt_tokens"], refused["finish_reason"]) == (400, 0, None)


# --- cancellation and malformed requests -----------------------------------------------------


def test_disconnecting_stream_client_cancels_its_generation(served):
    url, engine, _, _ = served
    assert wait_idle(engine)
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 5000, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    before = engine.generated_tokens
    sock.close()
    assert wait_idle(engine, 10)
    assert engine.generated_tokens - before < 1000  # stopped long before 5000 tokens


def test_disconnecting_non_stream_client_cancels_its_generation(served):
    url, engine, _, _ = served
    assert wait_idle(engine)
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 5000}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    t0 = time.time()
    while not engine._active and time.time() - t0 < 5:
        time.sleep(0.01)
    before = engine.generated_tokens
    sock.close()
    assert wait_idle(engine, 10)
    assert engine.generated_tokens - before < 1000


@pytest.mark.parametrize(
    "path,body,status,fragment",
    [
        ("/v1/completions", b"{not json", 400, "invalid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "4"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "a", "top_p": 2}, 400, "top_p"),
        ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "a", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"prompt": [999999]}, 400, "token id"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"999999": 1}}, 400, "out of range"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 500}}, 400, "-100 to 100"),
        ("/v1/completions", {"prompt": "a", "logit_bias": [1]}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "top_k": -1}, 400, "top_k"),
        ("/v1/completions", {"prompt": "a", "min_p": 1.5}, 400, "min_p"),
        ("/v1/completions", {"prompt": "a", "repetition_penalty": "high"}, 400, "repetition_penalty"),
        ("/v1/completions", {"prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
        ("/v1/chat/completions", {"prompt": "a"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": "all"}, 400, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": 1}, 400,
         "chat_template_kwargs"),
        ("/v1/nothing", {"prompt": "a"}, 404, "no endpoint"),
    ],
)
def test_malformed_requests_get_a_json_error_and_the_server_keeps_serving(served, client, path, body, status, fragment):
    code, data = raw(served[0], "POST", path, body, {"Content-Type": "application/json"})
    assert code == status
    assert fragment in data["error"]["message"]
    assert client.completions.create(model="demo", prompt="a", max_tokens=2).choices[0].finish_reason == "length"


def test_missing_content_length_is_411(served):
    host, port = served[0].split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 411")
    assert raw(served[0], "GET", "/health")[0] == 200


# --- prefill of a newcomer, and the command itself -------------------------------------------


def test_a_long_new_prompt_does_not_stall_running_requests(stock):
    """Prefill runs in chunks of prefill_step_size between decode steps: a running request
    keeps getting tokens while a long prompt joins."""
    from chronos_mlx.workloads import read_prompts

    model, tok, runtime = chronos_mlx.load(None, 1.0, dtype="float32")
    long_prompt = tok.encode(" ".join(read_prompts("en", "heldout")[:3]))[:192]
    with BatchEngine(model, tok, runtime, prefill_step_size=16) as engine:
        first = engine.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=60))
        times = []
        it = first.events()
        for ev in it:  # let it decode a little
            times.append(time.perf_counter())
            if len(times) == 5:
                break
        t_join = time.perf_counter()
        second = engine.submit(long_prompt, SamplingParams(max_tokens=2))
        for ev in it:
            times.append(time.perf_counter())
        for ev in second.events():
            pass
        ttft_second = second.first_token_at - t_join
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 60
    # the whole prompt took ttft_second to prefill; no gap of the first request comes near it
    assert max(gaps) < ttft_second / 3, (max(gaps), ttft_second)


def test_chronos_serve_command_serves_with_a_memory_limit_and_stops_on_sigterm(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    from chronos_mlx.budget import HEADROOM_FRACTION, PROCESS_OVERHEAD_BYTES, kv_bytes_per_token
    from chronos_mlx.loader import plan_model

    plan = plan_model(None, "float32")
    need = plan.info["dense_bytes"] + kv_bytes_per_token(plan.config, 4) * 1024 + 0.5 * plan.info["expert_bytes_total"]
    limit = int((need + PROCESS_OVERHEAD_BYTES * (1 - HEADROOM_FRACTION)) / (1 - HEADROOM_FRACTION)) + 1000
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chronos_mlx.cli", "serve", "--port", "0", "--memory-limit", f"{limit}B", "--kv-tokens", "1024"],
            stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # an abort at exit shows each thread's stack
        )
    try:
        port = None
        for _ in range(300):
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())
            if m:
                port = int(m.group(1))
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert port, log.read_text()
        assert "expert budget auto = 0.5 (32 experts/layer" in log.read_text()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        text = "".join(ch.choices[0].text for ch in c.completions.create(model="x", prompt=PROMPTS[0], max_tokens=6, stream=True))
        assert text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0, log.read_text()
    assert "terminate called" not in log.read_text()
    # one line a request on stderr: what it asked and how it ended
    assert re.search(r"POST /v1/completions 200 · \d+ prompt tokens → 6 · [\d.]+ s · length", log.read_text())
