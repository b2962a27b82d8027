"""replies.py: a chat reply's text split as mlx_lm.server splits it — content, reasoning between
the model's think markers, tool calls between its tool-call markers (parsed by the tokenizer's
tool parser) — with mlx_lm's own state machine, whatever the pieces the markers arrive in."""

import json

import pytest

from chronos_mlx.serve.replies import ChatReply, ReplyPart, initial_state
from synthetic import write_chat_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlx_lm import load

    _, tok = load(str(write_chat_model(tmp_path_factory.mktemp("chat") / "model")))
    assert tok.has_thinking and tok.has_tool_calling
    return tok


def _run(reply: ChatReply, pieces: list, reason: str) -> ReplyPart:
    whole = ReplyPart()
    for piece in pieces + [None]:
        part = reply.feed(piece) if piece is not None else reply.finish(reason)
        whole.content += part.content
        whole.reasoning += part.reasoning
        whole.tool_calls += part.tool_calls
    return whole


def test_markers_split_across_pieces_are_found_and_stripped(tokenizer):
    reply = ChatReply(tokenizer)
    pieces = ["Let me ", "<thi", "nk>plan it</th", "ink>Sure. <tool", '_call>{"name": "weather", "argu',
              'ments": {"city": "Rome"}}</tool_call>']
    got = _run(reply, pieces, "stop")
    assert got.content == "Let me Sure. "
    assert got.reasoning == "plan it"
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got.tool_calls] == [
        ("function", "weather", {"city": "Rome"})]
    assert got.tool_calls[0]["id"]
    assert reply.finish_reason("stop") == "tool_calls"


def test_streamed_calls_are_numbered_and_sent_whole(tokenizer):
    reply = ChatReply(tokenizer, streaming=True)
    opening = reply.feed('<tool_call>{"name": "a", ')
    assert not opening and reply.in_tool_call  # nothing of a call goes out before it ends
    first = reply.feed('"arguments": {}}</tool_call>')
    assert not reply.in_tool_call
    second = reply.feed(' <tool_call>{"name": "b", "arguments": {}}</tool_call>')
    last = reply.finish("stop")
    calls = first.tool_calls + second.tool_calls + last.tool_calls
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "a"), (1, "b")]


def test_at_the_length_limit_held_back_text_is_text_and_a_cut_call_is_dropped(tokenizer):
    held = _run(ChatReply(tokenizer), ["done <tool"], "length")
    assert held.content == "done <tool"  # not a marker after all
    cut = ChatReply(tokenizer)
    got = _run(cut, ['ok <tool_call>{"name": "f", "argum'], "length")
    assert got.content == "ok " and got.tool_calls == []  # it does not parse: left out, as mlx_lm.server does
    assert cut.finish_reason("length") == "length"


def test_at_a_stop_a_marker_just_begun_is_dropped(tokenizer):
    reply = ChatReply(tokenizer)
    assert _run(reply, ["the end <thi"], "stop").content == "the end "
    assert reply.finish_reason("stop") == "stop"


def test_a_prompt_that_opens_a_think_block_starts_the_reply_in_reasoning(tokenizer):
    think = tokenizer.encode("<think>", add_special_tokens=False)
    prompt = tokenizer.encode("assistant:", add_special_tokens=False)
    assert initial_state(tokenizer, prompt) == "normal"
    assert initial_state(tokenizer, prompt + think) == "reasoning"
    reply = ChatReply(tokenizer, initial=initial_state(tokenizer, prompt + think))
    got = _run(reply, ["weighing it</think>", "Yes."], "stop")
    assert (got.reasoning, got.content) == ("weighing it", "Yes.")


def test_a_tokenizer_without_markers_passes_the_text_through():
    from mlx_lm import load

    import chronos_mlx

    _, tok = load(str(chronos_mlx.DEFAULT_MODEL))
    reply = ChatReply(tok)
    got = _run(reply, ["a <think>b", "</think> <tool_call>c"], "length")
    assert got.content == "a <think>b</think> <tool_call>c" and not got.reasoning and not got.tool_calls
