"""Entry point of the ``tomediff`` command.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func`` default receives the parsed arguments and returns an exit code. Invalid arguments
give one ``tomediff CMD: error: ...`` line and exit code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from tomediff.cli._args import OnelineParser

# Module names under tomediff.cli; imported lazily so `tomediff --help` stays fast.
SUBCOMMAND_MODULES: tuple[str, ...] = ("bench_cmd", "demo_cmd", "eval_cmd", "visualize_cmd")


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


def build_parser() -> argparse.ArgumentParser:
    parser = OnelineParser(
        prog="tomediff",
        description="Token merging for diffusion models: benchmarks, demo and quality evaluation.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the tomediff, torch and diffusers versions and exit"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OnelineParser)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(f"tomediff.cli.{module_name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
