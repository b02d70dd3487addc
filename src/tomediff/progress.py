"""One progress display for every command: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """Counts ``total`` units of work named ``unit`` (e.g. "denoising steps", "batches generated").

    On a terminal (and with rich installed) it draws a transient bar ``description ━━━ 3/40 unit
    elapsed remaining``; when stderr is redirected it prints a line ``[3/40 unit] description (12 s
    elapsed)`` at most every 5 seconds and at the end, so logs of long runs say where they are. Disabled, it
    does nothing.
    """

    def __init__(self, total: int, unit: str, enabled: bool = True, transient: bool = True) -> None:
        self.total, self.unit, self.done = total, unit, 0
        self._bar: Any = None
        self._log = False
        self._started = self._logged = time.perf_counter()
        if not enabled or total <= 0:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            self._log = True
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            self._log = True
            return
        self._bar = Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("elapsed,"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=console,
            transient=transient,
        )
        self._bar.start()
        self._task = self._bar.add_task("starting", total=total)

    def advance(self, description: str, steps: int = 1) -> None:
        """Set the description and count ``steps`` more units done (0: only describe what starts)."""
        self.done += steps
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, description=description)
        elif self._log and steps and (self.done >= self.total or time.perf_counter() - self._logged >= 5):
            self._logged = time.perf_counter()
            elapsed = self._logged - self._started
            print(
                f"[{self.done}/{self.total} {self.unit}] {description} ({elapsed:.0f} s elapsed)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
