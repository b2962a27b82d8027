"""The typer application every command module registers itself on."""

import typer

app = typer.Typer(
    name="chronos",
    help=(
        "Run Mixture-of-Experts models whose experts do not fit in memory: expert weights are "
        "streamed from the safetensors shards into a fixed budget, and the tokens are exactly "
        "stock mlx_lm's.\n\n"
        "Without [bold]--model[/bold] every command uses the small embedded demo model."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

