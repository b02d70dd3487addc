"""Entry point of the ``tomediff`` command.

Each subcommand lives in its own module exposing ``NAME``, ``HELP`` (its line in ``tomediff --help``) and
``register(subparsers)``, which adds a parser whose ``func`` default receives the parsed arguments and
returns an exit code. Invalid arguments give one ``tomediff CMD: error: ...`` line and exit code 2, before
any work starts; Ctrl-C gives one line and exit code 130.

Start-up stays short: the subcommand modules import nothing heavy at module level, only the subcommand
named on the command line gets its full parser, and torch, diffusers and the rest are imported by the
subcommand once its arguments are valid.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence
from typing import Any, cast

from tomediff.cli._args import OnelineParser

__all__ = ["EXIT_INTERRUPTED", "build_parser", "main", "run_parsed"]

# Module names under tomediff.cli, each cheap to import (see the module docstring).
SUBCOMMAND_MODULES: tuple[str, ...] = ("bench_cmd", "demo_cmd", "eval_cmd", "visualize_cmd")

EXIT_INTERRUPTED = 130  # what a shell reports for a command stopped by SIGINT (128 + 2)


class _VersionAction(argparse.Action):
    """``--version``: imports tomediff (and torch) only when asked, so ``--help`` stays fast."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        import importlib.metadata

        import torch

        import tomediff

        try:
            diffusers = importlib.metadata.version("diffusers")
        except importlib.metadata.PackageNotFoundError:
            diffusers = "not installed"
        print(f"tomediff {tomediff.__version__} (torch {torch.__version__}, diffusers {diffusers})")
        parser.exit(0)


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``tomediff`` parser. ``full``: the subcommands whose flags are added (None: every one); the
    others get only their name and help line, which is all ``tomediff --help`` shows."""
    parser = OnelineParser(
        prog="tomediff",
        description="Token merging for diffusion models: benchmarks, demo and quality evaluation.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the tomediff, torch and diffusers versions and exit"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OnelineParser)
    for module_name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"tomediff.cli.{module_name}")
        if full is None or module.NAME in full:
            module.register(subparsers)
        else:
            subparsers.add_parser(module.NAME, help=module.HELP)
    return parser


def run_parsed(args: argparse.Namespace, command: str) -> int:
    """Run a parsed subcommand; Ctrl-C becomes one line (the subcommand's ``on_interrupt`` default says
    whether rerunning resumes) and exit code 130 instead of a long traceback."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _say_interrupted(command, getattr(args, "on_interrupt", "interrupted"))
        return EXIT_INTERRUPTED


def _say_interrupted(command: str, message: str) -> None:
    # On a terminal, a new line first: ^C was echoed on the current one.
    print(("\n" if sys.stderr.isatty() else "") + f"{command}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # The top level takes no option values, so the first word is the subcommand.
        command = next((word for word in argv if not word.startswith("-")), None)
        parser = build_parser(full=() if command is None else (command,))
        args, unknown = parser.parse_known_args(argv)
        if getattr(args, "func", None) is None:
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            parser.print_help()
            return 2
        if unknown:  # reported by the subcommand, whose --help lists the flags it takes
            # argparse keeps the subcommand parsers in private attributes its stub types loosely.
            subparsers = cast(Any, parser)._subparsers._group_actions[0].choices
            subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except KeyboardInterrupt:  # while torch was being imported for a subcommand's flags
        _say_interrupted("tomediff", "interrupted")
        return EXIT_INTERRUPTED
    return run_parsed(args, f"tomediff {args.command}")


if __name__ == "__main__":
    sys.exit(main())
