"""The typer application every command module registers itself on."""

import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.24 carries its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exc


class ChronosGroup(TyperGroup):
    """The CLI's one error boundary for what happens outside a command body.

    click and typer report a bad option (unknown option, a value out of range, a missing
    argument) with a usage line and a boxed message; chronos reports it like every other
    user error: one `error: ...` line, a hint line, exit code 2. Errors that escape a
    command's own boundary (`common.user_errors`) end the same way; `--help` and a group
    called without a command still print their help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .._startup import end_startup

        end_startup()  # imports are done: Ctrl-C is a KeyboardInterrupt again (commands handle it)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from ..errors import ChronosError
        from .common import error_line, hint_line

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exc.NoArgsIsHelpError as e:  # help already printed
            sys.exit(e.exit_code)
        except click_exc.ClickException as e:
            error_line(e.format_message())
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint_line(f"see '{ctx.command_path} --help'")
            sys.exit(2)
        except typer.Abort:  # EOF or Ctrl-C at a click prompt
            sys.exit(130)
        except ChronosError as e:
            error_line(e)
            sys.exit(2)
        except (OSError, UnicodeError) as e:
            from .common import os_error_text

            error_line(os_error_text(e))
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def command_group(name: str, help: str, **kwargs) -> typer.Typer:
    """A typer app (the CLI or one of its sub-command groups) with the CLI's shared settings."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="rich",
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        **kwargs,
    )


app = command_group(
    "chronos",
    "Run Mixture-of-Experts models whose experts do not fit in memory: expert weights are "
    "streamed from the safetensors shards into a fixed budget, and the tokens are exactly "
    "stock mlx_lm's.\n\n"
    "Without [bold]--model[/bold] every command uses the small embedded demo model.",
    cls=ChronosGroup,
)
