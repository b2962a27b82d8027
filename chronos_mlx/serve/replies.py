"""A chat reply's text as mlx_lm.server splits it: content, reasoning and tool calls.

Models that think write their reasoning between markers (`<think>` ... `</think>`), and models
that call tools write each call between markers (`<tool_call>` ... `</tool_call>`) in a format
the tokenizer's tool parser reads. mlx_lm's own `TextStateMachine` (made from the tokenizer by
`make_text_state_machine`) finds the markers in the decoded text, which may split them across
tokens, and strips them; each call's text goes through the tokenizer's `tool_parser` and comes
out in OpenAI's shape (mlx_lm.server's `ToolCallFormatter`). Where the tokenizer knows neither,
the text passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReplyPart:
    """What one piece of decoded text (or the end of the reply) adds to the reply."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list = field(default_factory=list)  # OpenAI tool calls: {"id", "type", "function"}

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def initial_state(tokenizer, prompt_ids: list) -> str:
    """Where a reply starts, as mlx_lm.server decides: inside reasoning when the prompt ends
    in an open think block (templates that open it for the model), else normal text."""
    state = "normal"
    if getattr(tokenizer, "has_thinking", False):
        if tokenizer.rfind_think_start(prompt_ids) > tokenizer.rfind_think_end(prompt_ids):
            state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state


class ChatReply:
    """Splits a chat reply as it is decoded (`feed` each piece, then `finish`)."""

    def __init__(self, tokenizer, tools=None, streaming: bool = False, initial: str = "normal", machine=None):
        """`machine`: a `TextStateMachine` (default: mlx_lm's for this tokenizer, without stop
        words: the engine has already cut the text at them)."""
        from mlx_lm.generate import TextStateMachine, make_text_state_machine
        from mlx_lm.server import ToolCallFormatter

        self._sm = TextStateMachine
        machine = machine if machine is not None else make_text_state_machine(tokenizer)
        self._state = machine.make_state(initial)
        self._previous = initial
        self._tool_text = ""
        self._format = ToolCallFormatter(getattr(tokenizer, "tool_parser", None), tools, streaming)
        self.made_tool_call = False

    def _take(self, segments) -> ReplyPart:
        part, calls = ReplyPart(), []
        for state, text in segments:
            if state == "reasoning":
                part.reasoning += text
            elif state == "tool":
                self._tool_text += text
            elif state == "normal":
                if self._previous == "tool":  # a call just ended
                    calls.append(self._tool_text)
                    self._tool_text = ""
                    self.made_tool_call = True
                part.content += text
            self._previous = state
        part.tool_calls = self._format(calls)
        return part

    @property
    def in_tool_call(self) -> bool:
        return self._previous == "tool"

    def feed(self, text: str) -> ReplyPart:
        self._state, segments = self._sm.split(self._state, text)
        return self._take(segments)

    def finish(self, reason: str) -> ReplyPart:
        """The reply ended: at a stop (end of sequence, a stop string) a marker it may have
        begun is dropped; at the length limit what is held back is text after all. A call
        still open counts (its text may not parse: then, as in mlx_lm.server, it is left out)."""
        if reason == "length":
            self._state, held, state = self._sm.flush(self._state)
            segments = [(state, held)]
        else:
            self._state, state = self._sm.discard(self._state)
            segments = [(state, "")]
        part = self._take(segments)
        if self._previous == "tool" and self._tool_text:
            part.tool_calls += self._format([self._tool_text])
            self._tool_text = ""
            self.made_tool_call = True
        return part

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish reason: "tool_calls" for a reply that stopped after calling one."""
        return "tool_calls" if reason == "stop" and self.made_tool_call else reason
