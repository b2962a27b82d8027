"""`chronos predictor ...`: record routing traces, train and evaluate expert predictors.

    chronos predictor train --model M --prompts a.jsonl [--prompts b.jsonl ...] --max-tokens 32 --seed 0
    chronos predictor eval  --model M --prompts held_out.jsonl

Mounted by `chronos_mlx/cli.py` (`app.add_typer(predictor_app, name="predictor")`).
Tables go to stdout; progress bars and notes to stderr. User errors (ChronosError) end the
command with one `error:` line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import ChronosError
from .app import command_group
from .common import err, note_line, out, read_prompt_file, user_errors as _user_errors


predictor_app = command_group(
    "predictor",
    "Expert predictors for prefetching: record routing traces from the model itself, train the "
    "lookahead router, the Markov chain and the intent classifier, and measure how well they predict.",
)


class PredictorCliError(ChronosError):
    """A usage error of `chronos predictor` (unreadable prompt file, bad option)."""




# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def read_prompts(files: list[Path], limit: Optional[int] = None) -> list[str]:
    """Prompts from JSON-lines files ({"prompt": ...} per line; blank lines skipped)."""
    if not files:
        raise PredictorCliError("give at least one --prompts FILE.jsonl")
    prompts = []
    for f in files:
        lines = read_prompt_file(f, PredictorCliError).splitlines()
        taken = 0
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise PredictorCliError(f"{f}:{n}: not a JSON object") from None
            text = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text:
                raise PredictorCliError(f'{f}:{n}: expected {{"prompt": "..."}} with a non-empty string')
            if limit is None or taken < limit:
                prompts.append(text)
                taken += 1
    if not prompts:
        raise PredictorCliError("the prompt files hold no prompts")
    return prompts


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and os.environ.get("CHRONOS_PROGRESS") != "1",
    )


def _load(model, expert_budget: str):
    import chronos_mlx

    from ..predictors import model_name

    if err.is_terminal:
        with err.status(f"loading {escape(model_name(model))} ...", spinner="dots"):
            return chronos_mlx.load(model, expert_budget=expert_budget)
    return chronos_mlx.load(model, expert_budget=expert_budget)


def record(model, tokenizer, prompts, max_tokens, max_prompt_tokens, label="recording traces"):
    from ..traces import record_traces

    with _progress() as bar:
        task = bar.add_task(label, total=None, note="tokens")

        def cb(done, total):
            bar.update(task, completed=done, total=total)

        return record_traces(
            model, tokenizer, prompts, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, progress=cb
        )


def recall_table(results: dict, ks=(8, 16), title="") -> Table:
    """One row per predictor and target: recall and precision with ks[0] and ks[1] guesses."""
    from ..predictors import target_name

    table = Table(
        title=title or None,
        title_justify="left",
        caption="R@k / P@k: recall / precision of the k best guesses against the router's true top-k",
        caption_justify="left",
    )
    table.add_column("predictor", style="cyan")
    table.add_column("predicts", no_wrap=True)
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
        table.add_column(f"P@{k}", justify="right")
    for name, per_target in results.items():
        for i, (t, r) in enumerate(sorted(per_target.items(), key=lambda tr: (tr[0][1], tr[0][0]))):
            cells = []
            for k in ks:
                cells += [f"{r[k]['recall']:.3f}", f"{r[k]['precision']:.3f}"]
            table.add_row(name if i == 0 else "", target_name(t), *cells, end_section=i == len(per_target) - 1)
    return table


def intent_table(results: dict, title="") -> Table:
    names = [n for n in results if not n.startswith("_")]
    table = Table(title=title or None, title_justify="left")
    table.add_column("per layer", style="cyan")
    table.add_column("set size", justify="right")
    for col in ("recall", "precision", "coverage"):
        table.add_column(col, justify="right")
    for n in names:
        sizes = list(results[n])
        for i, m in enumerate(sizes):
            r = results[n][m]
            table.add_row(n if i == 0 else "", str(m), f"{r['recall']:.3f}", f"{r['precision']:.3f}", f"{r['coverage']:.3f}",
                          end_section=i == len(sizes) - 1)
    return table


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", metavar="PATH|REPO", help="Model (default: the embedded demo model)."),
]
PromptsOpt = Annotated[
    list[Path],
    typer.Option("--prompts", metavar="FILE.jsonl", help='JSON lines {"prompt": ...}; repeat for several files.'),
]
BudgetOpt = Annotated[
    str,
    typer.Option("--expert-budget", "--budget", "-b", metavar="BUDGET", help="Expert memory while recording traces (as for generate)."),
]


MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens generated per prompt (greedy).")]
MaxPromptTokensOpt = Annotated[
    Optional[int], typer.Option("--max-prompt-tokens", min=1, help="Keep only the first N tokens of each prompt.")
]
PromptsPerFileOpt = Annotated[Optional[int], typer.Option("--prompts-per-file", min=1, help="Use at most N prompts of each file.")]


@predictor_app.command()
@_user_errors
def train(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    max_tokens: MaxTokensOpt = 32,
    max_prompt_tokens: MaxPromptTokensOpt = 128,
    prompts_per_file: PromptsPerFileOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Lookahead router training epochs.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation and shuffling (same seed, same files).")] = 0,
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", metavar="DIR", help="Where to save (default: <profiles>/<model>/predictors/, $CHRONOS_PROFILE_DIR overrides <profiles>)."),
    ] = None,
    traces_out: Annotated[Optional[Path], typer.Option("--save-traces", metavar="FILE.npz", help="Also save the recorded traces.")] = None,
    expert_budget: BudgetOpt = "1.0",
):
    """Record routing traces on the prompts, train the predictors and save them.

    Writes lookahead.safetensors (+ .json), markov.npz and intent.safetensors (+ .json), each tied to this model's fingerprint.
    """
    import mlx.core as mx

    from ..predictors import MarkovPredictor, model_name, predictor_dir, train_intent, train_lookahead
    from ..traces import find_routers

    texts = read_prompts(prompts or [], prompts_per_file)
    dest = out_dir or predictor_dir(model)
    m, tokenizer, runtime = _load(model, expert_budget)
    if runtime.cache is None:
        raise PredictorCliError(f"{model_name(model)} has no MoE layers: there is nothing to predict")
    trace = record(m, tokenizer, texts, max_tokens, max_prompt_tokens)
    if traces_out:
        trace.save(traces_out)
    routers = find_routers(m)
    with _progress() as bar:
        t1 = bar.add_task("lookahead router", total=None, note="")
        lookahead, hist = train_lookahead(
            trace,
            routers=routers,
            epochs=epochs,
            seed=seed,
            progress=lambda s, n, loss: bar.update(t1, completed=s, total=n, note=f"loss {loss:.3f}"),
        )
        t2 = bar.add_task("markov chain", total=len(trace), note="")
        markov = MarkovPredictor(trace.num_layers, trace.num_experts, trace.top_k).fit(
            trace, progress=lambda i, n: bar.update(t2, completed=i)
        )
        t3 = bar.add_task("intent classifier", total=None, note="")
        intent, ihist = train_intent(
            trace, seed=seed, progress=lambda s, n, loss: bar.update(t3, completed=s, total=n, note=f"loss {loss:.3f}")
        )
    mx.eval(lookahead.parameters())
    dest.mkdir(parents=True, exist_ok=True)
    from ..predictors import INTENT_FILE, LOOKAHEAD_FILE, MARKOV_FILE

    lookahead.save(dest / LOOKAHEAD_FILE)
    markov.meta["fingerprint"] = dict(trace.fingerprint)
    markov.save(dest / MARKOV_FILE, fingerprint=trace.fingerprint)
    intent.save(dest / INTENT_FILE)
    table = Table(title=f"predictors for {model_name(model)} -> {dest}", title_justify="left", show_header=True)
    table.add_column("predictor", style="cyan")
    table.add_column("parameters", justify="right")
    table.add_column("loss (start -> end)", justify="right")
    table.add_row("lookahead", f"{lookahead.num_parameters():,}", f"{hist['initial_loss']:.3f} -> {hist['final_loss']:.3f}")
    table.add_row("markov", "counts", f"{markov.meta['fit_tokens']:,} tokens")
    table.add_row("intent", f"{intent.num_parameters():,}", f"{ihist['initial_loss']:.3f} -> {ihist['final_loss']:.3f}")
    out.print(table)
    err.print(
        f"trained on {len(trace)} prompts, {trace.num_tokens:,} positions "
        f"({max_tokens} generated per prompt); evaluate on other prompts with `chronos predictor eval`",
        soft_wrap=True,
    )


@predictor_app.command("eval")
@_user_errors
def evaluate(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    max_tokens: MaxTokensOpt = 32,
    max_prompt_tokens: MaxPromptTokensOpt = 128,
    prompts_per_file: PromptsPerFileOpt = None,
    predictors_dir: Annotated[
        Optional[Path],
        typer.Option("--predictors", metavar="DIR", help="Trained predictors (default: <profiles>/<model>/predictors, then the shipped ones)."),
    ] = None,
    positions: Annotated[
        str, typer.Option("--positions", help="Score predictions of generated tokens only (decode) or of all positions.")
    ] = "generated",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    expert_budget: BudgetOpt = "1.0",
):
    """Recall and precision of each predictor on prompts (use prompts not trained on).

    The baselines need no training (previous token, cross-layer gate); trained predictors are loaded from the model's predictors directory when there are any.
    """
    from ..predictors import (
        CrossLayerGatePredictor,
        PreviousTokenPredictor,
        evaluate_intent,
        evaluate_predictors,
        find_predictor_dir,
        predictor_dir,
        load_predictors,
        model_name,
        prompt_baseline_scores,
    )
    from ..traces import model_fingerprint

    if positions not in ("generated", "all"):
        raise PredictorCliError("--positions must be 'generated' or 'all'")
    if predictors_dir is not None and not Path(predictors_dir).is_dir():
        raise PredictorCliError(f"{predictors_dir}: no such predictors directory")
    texts = read_prompts(prompts or [], prompts_per_file)
    src = predictors_dir or find_predictor_dir(model) or predictor_dir(model)
    m, tokenizer, runtime = _load(model, expert_budget)
    if runtime.cache is None:
        raise PredictorCliError(f"{model_name(model)} has no MoE layers: there is nothing to predict")
    trained = load_predictors(src, fingerprint=model_fingerprint(m)) if Path(src).is_dir() else {}
    if not trained:
        note_line(f"no trained predictors in {src}: baselines only")
    trace = record(m, tokenizer, texts, max_tokens, max_prompt_tokens)
    preds = {
        "previous token": PreviousTokenPredictor.for_trace(trace),
        "cross-layer gate": CrossLayerGatePredictor.from_model(m, top_k=trace.top_k),
    }
    if "markov" in trained:
        preds["markov (2nd order)"] = trained["markov"]
    if "lookahead" in trained:
        preds["lookahead router"] = trained["lookahead"]
    res = evaluate_predictors(preds, trace, positions=positions)
    scorers = {"prompt's most-used": prompt_baseline_scores}
    if "intent" in trained:
        scorers["intent classifier"] = trained["intent"].predict
    ires = evaluate_intent(scorers, trace)
    if as_json:
        payload = {
            "prompts": len(trace),
            "positions": positions,
            "predictors": {
                n: {f"{t[0]},{t[1]}": {str(k): v for k, v in r.items()} for t, r in per.items()} for n, per in res.items()
            },
            "intent": {n: {str(k): v for k, v in r.items()} for n, r in ires.items() if not n.startswith("_")},
        }
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    out.print(recall_table(res, title=f"expert prediction on {len(trace)} prompts ({positions} positions; true top-{trace.top_k})"))
    out.print(intent_table(ires, title="experts the generation will use, predicted at prefill"))
