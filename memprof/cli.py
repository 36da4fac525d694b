"""The ``memprof`` command line: a click group with one command per module in
:mod:`memprof.commands`.

Commands whose module is not installed (``advise`` and ``estimate`` are optional parts that
may be missing from a partial install) are left out of the group rather than breaking it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from memprof import __version__
from memprof.quiet_import import NOISY_LOGGERS

#: Verb -> module in memprof.commands, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "run": "run",
    "report": "report",
    "export": "export",
    "advise": "advise",
    "estimate": "estimate",
    "gpus": "gpus",
    "diff": "diff",
}
#: Commands that may be absent without it being an error.
OPTIONAL = frozenset({"advise", "estimate"})


class _OrderedGroup(click.Group):
    """Lists commands in registration order (click sorts them by name) and reports a bad
    command line as one line (click prints usage, a hint and the error on three)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        for name in NOISY_LOGGERS:  # for the whole command, not one import
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # click's message is the whole help
            where = exc.ctx.command_path if exc.ctx is not None else "memprof"
            commands = ", ".join(self.list_commands(exc.ctx)) if where == "memprof" else ""
            what = f"a command ({commands})" if commands else "arguments"
            click.echo(f"memprof: error: {where} needs {what} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "memprof"
            prefix = "" if where == "memprof" else f"{where}: "  # not "memprof: error: memprof:"
            click.echo(
                f"memprof: error: {prefix}{exc.format_message()} (see {where} --help)",
                err=True,
            )
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"memprof: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("memprof: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(
    cls=_OrderedGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nExamples:\n  memprof run examples/train_mlp.py --steps 5\n"
    "  memprof report reports/train_mlp.json -o mlp.html\n  memprof gpus --json",
)
@click.version_option(__version__, "--version", "-V", prog_name="memprof")
def main() -> None:
    """memprof: where every byte of a PyTorch training step goes, and what to change so it
    fits. Run 'memprof COMMAND --help' for each command's options and examples."""


def _register(group: click.Group) -> None:
    for verb, module_name in COMMANDS.items():
        qualified = f"memprof.commands.{module_name}"
        try:
            module = importlib.import_module(qualified)
        except ImportError as exc:
            if verb not in OPTIONAL:
                raise
            if isinstance(exc, ModuleNotFoundError) and exc.name == qualified:
                continue  # the optional command is not part of this install
            # The module exists but cannot be imported: keep the other commands working and
            # say why this one cannot run, in one line, when it is asked for.
            group.add_command(_unavailable(verb, exc), name=verb)
            continue
        group.add_command(module.command, name=verb)


def _unavailable(verb: str, error: ImportError) -> click.Command:
    """A command that only reports why ``memprof VERB`` cannot be loaded."""
    reason = " ".join(str(error).split())

    @click.command(
        name=verb,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help=f"(unavailable: {reason})",
    )
    def command() -> None:
        click.echo(f"memprof: error: memprof {verb} is unavailable: {reason}", err=True)
        raise SystemExit(1)

    return command


_register(main)

if __name__ == "__main__":
    main()
