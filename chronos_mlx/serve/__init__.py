"""`chronos serve`: an OpenAI-compatible server (mlx_lm.server's endpoints and JSON) whose
concurrent requests share one model and one expert cache and are decoded as one batch.

- `engine.BatchEngine`: mlx_lm's BatchGenerator on a chronos model, on its own thread.
- `http.make_server`: the HTTP endpoints (standard library ThreadingHTTPServer).
- `replies.ChatReply`: a chat reply split into content, reasoning and tool calls (mlx_lm's own
  state machine and the tokenizer's tool parser).
"""

from .engine import BatchEngine, EngineError, Event, RequestHandle, SamplingParams
from .http import ChronosServer, make_server

__all__ = ["BatchEngine", "ChronosServer", "EngineError", "Event", "RequestHandle", "SamplingParams", "make_server"]
