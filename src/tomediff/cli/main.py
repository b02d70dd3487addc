"""Entry point of the ``tomediff`` command.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func`` default receives the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Module names under tomediff.cli; imported lazily so `tomediff --help` stays fast.
SUBCOMMAND_MODULES: tuple[str, ...] = ("bench_cmd", "demo_cmd", "eval_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomediff",
        description="Token merging for diffusion models: benchmarks, demo and quality evaluation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
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
