"""Output people can read anywhere: tables in a pipe or a log keep names and figures whole
(rich would cut them to 80 columns), and chat says when it runs the demo model."""

import io

from rich.table import Table
from typer.testing import CliRunner

from chronos_mlx.cli import app
from chronos_mlx.cli.common import PIPE_WIDTH, _console


def test_consoles_on_a_pipe_are_as_wide_as_the_content(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    stream = io.StringIO()
    console = _console(stream, file=stream)
    assert console.width == PIPE_WIDTH
    table = Table()
    for head in ("config", "decode tok/s", "x resident", "TTFT s", "stall ms/tok", "read/tok", "bound tok/s", "hits", "recall", "peak mem"):
        table.add_column(head)
    table.add_row("chronos-lru@0.25+lookahead-prefetch", *["123456.7"] * 9)
    console.print(table)
    text = stream.getvalue()
    assert "chronos-lru@0.25+lookahead-prefetch" in text and "config" in text and "…" not in text


def test_bench_in_a_pipe_shows_whole_configuration_names():
    result = CliRunner().invoke(
        app, ["bench", "--budgets", "1.0", "--max-tokens", "2", "--repeats", "1", "--warmup", "0", "--prompts", "1",
              "--only", "chronos-lru"]
    )
    assert result.exit_code == 0, result.output
    assert "config" in result.stdout and "chronos-lru@1.0" in result.stdout
    assert "…" not in result.stdout


def test_chat_banner_says_it_is_the_demo_model_and_shows_a_real_model_id():
    result = CliRunner().invoke(app, ["chat"], input="/quit\n")
    assert result.exit_code == 0, result.output
    assert "embedded demo model" in result.stderr and "85 M-parameter" in result.stderr
    assert "without a chat template" in result.stderr
    assert "mlx-community/Qwen3-30B-A3B-4bit" in result.stderr
