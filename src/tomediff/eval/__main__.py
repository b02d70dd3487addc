"""``python -m tomediff.eval`` and ``accelerate launch -m tomediff.eval``: options of ``tomediff eval``."""

from __future__ import annotations

import sys

from tomediff.cli._args import OnelineParser
from tomediff.cli.eval_cmd import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = OnelineParser(prog="python -m tomediff.eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
