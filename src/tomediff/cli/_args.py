"""Argument types and checks shared by the subcommands: each bad value becomes one line and exit code 2.

Types raise ``argparse.ArgumentTypeError`` (argparse turns it into ``tomediff CMD: error: ...``);
checks that need several flags or the file system raise :class:`~tomediff.errors.CLIUsageError`, which
:func:`fail` prints the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = [
    "BUNDLED_MODEL_THREADS",
    "BUNDLED_MODEL_THREADS_DEFAULT",
    "MAX_RATIO",
    "OnelineParser",
    "check_out_dir",
    "comma_list",
    "fail",
    "non_negative_int",
    "positive_int",
    "positive_ratio",
    "ratio_value",
    "threads_value",
    "torch_threads",
]

MAX_RATIO = 0.75  # 1 - 1/(sx*sy) with the 2x2 windows every subcommand uses


class OnelineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def fail(command: str, error: Exception | str) -> int:
    """Print a validation error (or its message) as one line; returns the exit code 2."""
    print(f"tomediff {command}: error: {error}", file=sys.stderr)
    return 2


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ratio_value(text: str, allow_zero: bool = True) -> float:
    """A merge ratio in [0, MAX_RATIO] (or (0, MAX_RATIO] with ``allow_zero=False``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"ratio must be a number, got {text!r}")
    interval = f"[0, {MAX_RATIO}]" if allow_zero else f"(0, {MAX_RATIO}]"
    # The advice fits the side of the range that was crossed.
    if value < 0 or (value == 0 and not allow_zero):
        why = (
            "it cannot be negative" if value < 0 else "0 merges nothing, so there would be nothing to measure"
        )
        raise argparse.ArgumentTypeError(
            f"ratio {text} is out of range: it must be in {interval} - the fraction of tokens merged away, "
            f"and {why}"
        )
    if value > MAX_RATIO:
        raise argparse.ArgumentTypeError(
            f"ratio {text} is out of range: it must be in {interval} - the fraction of tokens merged away; "
            "with 2x2 windows at most 3 of every 4 tokens can be merged"
        )
    return value


def positive_ratio(text: str) -> float:
    """A merge ratio in (0, MAX_RATIO]: the flags where 0 (no merging) would measure nothing."""
    return ratio_value(text, allow_zero=False)


def comma_list(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse type for ``a,b,c``: each item through ``item``; an empty list is an error."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return [item(part) for part in parts]

    parse.__name__ = f"comma-separated {what}"  # what argparse names in "invalid ... value"
    return parse


BUNDLED_MODEL_THREADS = 1
"""Default torch threads of the subcommands running the bundled model (demo's quality part, eval,
visualize): its calls are too small to split, so more threads mostly wait on each other, and on a busy
machine they make a run many times slower."""

BUNDLED_MODEL_THREADS_DEFAULT = (
    f"Default: {BUNDLED_MODEL_THREADS} (the model is tiny: more threads mostly wait on each other, and "
    "on a busy machine slow the run down many times)"
)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (None: torch's own choice), then restore the
    previous count."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def threads_value(text: str) -> int:
    value = positive_int(text)
    cpus = os.cpu_count() or value
    if value > cpus:
        raise argparse.ArgumentTypeError(f"{value} threads is more than the {cpus} CPUs of this machine")
    return value


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Create ``path`` if needed and prove it is writable, before any work (raises CLIUsageError)."""
    from tomediff.errors import CLIUsageError

    if path.exists() and not path.is_dir():
        raise CLIUsageError(f"{flag} {path} exists and is not a directory; pass a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise CLIUsageError(f"{flag} {path} is not a writable directory ({reason}); pass another") from None


def check_choices(values: Sequence[str], allowed: Sequence[str], flag: str) -> None:
    from tomediff.errors import CLIUsageError

    bad = [v for v in values if v not in allowed]
    if bad:
        raise CLIUsageError(
            f"{flag}: unknown value(s) {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}"
        )
