"""`chronos profile record|list|show|diff` and `chronos pack`: typer commands over
`chronos_mlx.profiles` and `chronos_mlx.pack`.

`chronos_mlx.cli` mounts them (`app.add_typer(profile_app, name="profile")`,
`app.command("pack")(pack)`). The CLI's conventions hold: results on stdout, progress and
notices on stderr, a user error is one `error:` line and exit code 2 (the shared
`cli.user_errors` boundary, imported when a command runs so the two modules can import
each other in any order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import command_group

profile_app = command_group(
    "profile",
    "Workload profiles: which experts a workload uses. Record one from a prompts file, then "
    "pass [bold]--profile NAME[/bold] to generate/chat/bench to pre-warm the expert cache and "
    "seed the usage policy.",
)


from .common import user_errors as _user_errors


def _consoles():
    from .common import err, out

    return out, err


MODEL_OPT = typer.Option("--model", "-m", metavar="PATH|REPO", help="Model (default: the embedded demo model).")


# --------------------------------------------------------------------------------------
# record
# --------------------------------------------------------------------------------------


@profile_app.command("record")
@_user_errors
def record(
    name: Annotated[str, typer.Option("--name", help="Profile name (letters, digits, . _ -).")],
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            metavar="FILE|WORKLOAD",
            help='A .jsonl file with one {"prompt": ...} per line, or a shipped workload (en, de, fr, es, it, python, c).',
        ),
    ],
    model: Annotated[Optional[str], MODEL_OPT] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=0, help="New tokens per prompt (greedy).")] = 32,
    split: Annotated[
        str, typer.Option("--split", help="all, train (first half of the file) or heldout (second half).")
    ] = "all",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N prompts (of the split).")] = None,
    out_path: Annotated[
        Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Write here instead of the user profile directory.")
    ] = None,
    expert_budget: Annotated[
        str, typer.Option("--expert-budget", "--budget", "-b", help="Expert budget while recording (routing does not depend on it).")
    ] = "1.0",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype (auto, float32, bfloat16, float16).")] = "auto",
):
    """Run prompts through a model and save which experts each MoE layer used.

    Written atomically (an interrupted recording leaves no file) to $CHRONOS_PROFILE_DIR or ~/.cache/chronos-mlx/profiles/NAME.json, or to --out.

    [bold]Example[/bold]

    [cyan]chronos profile record --name italian --prompts it.jsonl --max-tokens 32[/cyan]
    """
    from ..errors import ChronosError
    from ..profiles import check_name, check_writable, profile_path_for, recording_lock
    from ..workloads import read_prompts

    out, err = _consoles()
    check_name(name)
    if split not in ("all", "train", "heldout"):
        raise ChronosError(f"--split must be all, train or heldout, not '{split}'")
    # Everything that can fail after the run is checked before it: the output file (never
    # over something that is not a profile), another recording of the same file, the prompts.
    target = profile_path_for(name, out_path)
    check_writable(target)
    texts = read_prompts(prompts, split)[:limit]
    with recording_lock(target):
        _record(name, prompts, model, max_tokens, split, target, expert_budget, dtype, texts)


def _record(name, prompts, model, max_tokens, split, target, expert_budget, dtype, texts):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .common import LoadOptions, load_model
    from ..profiles import record_profile, save_profile

    out, err = _consoles()
    model_obj, tokenizer, runtime = load_model(LoadOptions(model=model, expert_budget=expert_budget, dtype=dtype))
    if runtime.cache is None:
        from ..errors import ProfileError

        raise ProfileError(f"{runtime.info.get('path')}: no MoE layers, nothing to profile")
    with Progress(
        TextColumn("recording [bold]{task.fields[name]}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=not err.is_terminal,
    ) as bar:
        task = bar.add_task("record", total=len(texts), name=name)
        profile = record_profile(
            model_obj,
            tokenizer,
            runtime,
            texts,
            name=name,
            max_tokens=max_tokens,
            on_prompt=lambda done, total: bar.update(task, completed=done),
            meta={"prompts_file": str(prompts), "split": split},
        )
    path = save_profile(profile, target)
    err.print(
        f"[green]saved[/green] {path} · {len(texts)} prompts · {int(profile.tokens[0])} tokens per layer",
        soft_wrap=True,
    )


# --------------------------------------------------------------------------------------
# list / show / diff
# --------------------------------------------------------------------------------------


def _where(path: Path) -> str:
    from ..profiles import shipped_profile_dir, user_profile_dir

    for label, d in (("user", user_profile_dir()), ("shipped", shipped_profile_dir())):
        try:
            path.resolve().relative_to(d.resolve())
            return label
        except ValueError:
            pass
    return str(path.parent)


def _summary(profile) -> dict:
    fp = profile.fingerprint
    return {
        "name": profile.name,
        "path": profile.meta.get("path"),
        "model_type": fp.get("model_type"),
        "moe_layers": fp.get("num_layers"),
        "num_experts": fp.get("num_experts"),
        "top_k": fp.get("top_k"),
        "router_sha256": fp.get("router_sha256"),
        "tokens": int(profile.tokens.max()) if len(profile.tokens) else 0,
        "prompts": profile.meta.get("prompts"),
        "created": profile.meta.get("created"),
    }


@profile_app.command("list")
@_user_errors
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False):
    """List the profiles in the user directory and the shipped ones (a user's wins on a name clash)."""
    from rich.markup import escape
    from rich.table import Table

    from ..profiles import list_profiles, profile_dirs

    out, err = _consoles()
    found = list_profiles()
    if as_json:
        rows = [
            _summary(p) if not isinstance(p, Exception) else {"name": path.stem, "path": str(path), "error": str(p)}
            for path, p in found
        ]
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    if not found:
        err.print(f"no profiles in {' or '.join(str(d) for d in profile_dirs())}", soft_wrap=True)
        return
    table = Table(title="profiles", title_justify="left")
    for col in ("name", "where", "model", "router", "tokens", "prompts", "created"):
        table.add_column(col, justify="right" if col in ("tokens", "prompts") else "left")
    for path, p in found:
        if isinstance(p, Exception):
            table.add_row(escape(path.stem), _where(path), f"[red]unreadable: {escape(str(p))}[/red]", "", "", "", "")
            continue
        s = _summary(p)
        table.add_row(
            escape(s["name"]),
            _where(path),
            f"{s['model_type']} {s['moe_layers']}x{s['num_experts']} top-{s['top_k']}",
            str(s["router_sha256"])[:10],
            str(s["tokens"]),
            str(s["prompts"] or "-"),
            str(s["created"] or "-")[:10],
        )
    out.print(table)


def heat_rows(freqs, width: int) -> list:
    """Rich Text lines, one per layer: each cell an expert (or a bin of experts), brighter = more used."""
    import numpy as np
    from rich.text import Text

    layers, experts = freqs.shape
    cols = max(1, min(experts, width))
    edges = np.linspace(0, experts, cols + 1).astype(int)
    binned = np.stack([freqs[:, a:b].max(axis=1) for a, b in zip(edges, edges[1:])], axis=1)
    top = binned.max() or 1.0
    lines = []
    for layer in range(layers):
        line = Text(f"L{layer:<3}")
        for v in binned[layer]:
            t = float(v / top)
            # black -> red -> yellow -> white, like a heat map
            r, g, b = int(255 * min(1, 3 * t)), int(255 * min(1, max(0, 3 * t - 1))), int(255 * max(0, 3 * t - 2))
            line.append("█", style=f"rgb({r},{g},{b})")
        lines.append(line)
    return lines


@profile_app.command("show")
@_user_errors
def show(
    name: Annotated[str, typer.Argument(metavar="NAME|PATH", help="A profile name or file.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many hottest experts to list per layer.")] = 8,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="Also draw the heat map to a PNG (matplotlib).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print frequencies and hot experts as JSON.")] = False,
):
    """Show a profile: a per-layer heat map of expert use and each layer's hottest experts."""
    from rich.markup import escape
    from rich.table import Table

    from ..profiles import load_profile

    out, err = _consoles()
    profile = load_profile(name)
    freqs = profile.frequencies()
    if png is not None:
        save_heatmap_png(profile, png)
        err.print(f"[green]wrote[/green] {png}", soft_wrap=True)
    if as_json:
        payload = _summary(profile)
        payload["frequencies"] = freqs.round(6).tolist()
        payload["hot"] = [profile.hot(l, top).tolist() for l in range(profile.num_layers)]
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    s = _summary(profile)
    out.print(
        f"[bold]{escape(s['name'])}[/bold] · {s['model_type']} {s['moe_layers']}x{s['num_experts']} top-{s['top_k']} · "
        f"{s['tokens']} tokens · {escape(str(s['path']))}",
        soft_wrap=True,
    )
    out.print(f"[dim]expert use per layer (experts 0..{profile.num_experts - 1} left to right; brighter = more used)[/dim]")
    for line in heat_rows(freqs, max(8, out.width - 5)):
        out.print(line, soft_wrap=True)
    table = Table(title=f"hottest {top} experts per layer (share of the layer's uses)", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("experts")
    table.add_column(f"top-{top} share", justify="right")
    table.add_column("experts for 80%", justify="right")
    for layer in range(profile.num_layers):
        share = freqs[layer] / max(freqs[layer].sum(), 1e-12)
        hot = profile.hot(layer, top)
        ranked = sorted(share, reverse=True)
        cum, need = 0.0, 0
        for v in ranked:
            if cum >= 0.8:
                break
            cum, need = cum + v, need + 1
        table.add_row(
            str(layer),
            " ".join(f"{e}" for e in hot.tolist()),
            f"{share[hot].sum():.0%}",
            str(need),
        )
    out.print(table)


def save_heatmap_png(profile, path: Path):
    """The profile's use frequencies as an image (layers x experts)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import ChronosError

        raise ChronosError("--png needs matplotlib: pip install 'chronos-mlx[plot]'") from None
    freqs = profile.frequencies()
    fig, ax = plt.subplots(figsize=(max(6, profile.num_experts / 6), max(2.5, profile.num_layers / 2.5)))
    im = ax.imshow(freqs, aspect="auto", cmap="inferno", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"profile '{profile.name}': expert uses per token")
    fig.colorbar(im, ax=ax, label="uses per token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@profile_app.command("diff")
@_user_errors
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="Profile name or file.")],
    b: Annotated[str, typer.Argument(metavar="B", help="Profile name or file.")],
    top: Annotated[int, typer.Option("--top", min=1, help="Size of each layer's hot set.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-layer rows as JSON.")] = False,
):
    """Compare two profiles layer by layer: overlap of the hot sets (top N experts) and of use."""
    from rich.markup import escape
    from rich.table import Table

    from ..profiles import compare_profiles, load_profile
    from .common import note_line

    out, err = _consoles()
    pa, pb = load_profile(a), load_profile(b)
    rows = compare_profiles(pa, pb, top)
    if pa.fingerprint.get("router_sha256") != pb.fingerprint.get("router_sha256"):
        note_line("the profiles were recorded on different models: expert numbers may not correspond")
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title=f"{escape(pa.name)} vs {escape(pb.name)} (hot set = top {top})", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("shared", justify="right")
    table.add_column("jaccard", justify="right")
    table.add_column("use overlap", justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['shared']}/{top}", f"{r['jaccard']:.2f}", f"{r['use_overlap']:.0%}")
    n = len(rows)
    table.add_row(
        "mean",
        f"{sum(r['shared'] for r in rows) / n:.1f}/{top}",
        f"{sum(r['jaccard'] for r in rows) / n:.2f}",
        f"{sum(r['use_overlap'] for r in rows) / n:.0%}",
        style="bold",
    )
    out.print(table)


# --------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------


@_user_errors
def pack(
    profile: Annotated[str, typer.Option("--profile", "-p", metavar="NAME|PATH", help="Profile whose co-activation orders the experts.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Directory for the packed checkpoint.")],
    model: Annotated[Optional[str], MODEL_OPT] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Louvain clustering.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the contents of a non-empty --out.")] = False,
):
    """Rewrite a model so experts that fire together are adjacent on disk.

    Each layer's experts are clustered by co-activation (Louvain) and the expert dimension is permuted, router rows included: stock mlx_lm loads the result and gives the same output.

    The permutations go to DIR/chronos-pack.json, the profile in the new numbering to DIR/profile-NAME.json (use it with --profile on the packed model).

    [bold]Example[/bold]

    [cyan]chronos pack --profile italian --out ~/models/demo-italian[/cyan]
    """
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from ..pack import pack as pack_model

    out, err = _consoles()
    with Progress(TextColumn("packing"), BarColumn(), DownloadColumn(), console=err, transient=not err.is_terminal) as bar:
        task = bar.add_task("pack", total=None)
        result = pack_model(
            model,
            profile,
            out_dir,
            seed=seed,
            overwrite=overwrite,
            on_progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    sizes = [sorted((b - a for a, b in c), reverse=True) for c in result.clusters]
    for layer, s in enumerate(sizes):
        big = [x for x in s if x > 1]
        out.print(f"layer {layer}: {len(big)} clusters of {', '.join(map(str, big)) or '-'} experts, {len(s) - len(big)} alone")
    err.print(
        f"[green]packed[/green] {escape(str(result.out_dir))} ({result.bytes_written / 1e6:.1f} MB) · "
        f"profile for it: {escape(str(result.profile_path))}",
        soft_wrap=True,
    )
