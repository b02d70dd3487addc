"""``python -m tomediff.eval`` and ``accelerate launch -m tomediff.eval``: options of ``tomediff eval``."""

from __future__ import annotations

import sys

from tomediff.cli._args import OnelineParser
from tomediff.cli.eval_cmd import ON_INTERRUPT, add_arguments, run
from tomediff.cli.main import run_parsed


def main(argv: list[str] | None = None) -> int:
    parser = OnelineParser(prog="python -m tomediff.eval", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run, on_interrupt=ON_INTERRUPT)
    return run_parsed(parser.parse_args(argv), "python -m tomediff.eval")


if __name__ == "__main__":
    sys.exit(main())
