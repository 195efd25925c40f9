"""Progress display for long stages: rows done, tokens/s and ETA, one bar per stage.

rich draws the bar on a terminal and stays quiet when output is not a terminal (CI logs get the
stage summary lines instead of thousands of redraws).
"""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    def __init__(self, stage: str, total: int, completed: int = 0, enabled: bool = True):
        self.stage = stage
        self.total = total
        self.completed = completed
        self.tokens = 0
        self.started = time.perf_counter()
        self.enabled = enabled
        self._progress: Progress | None = None

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<12}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                transient=False,
                disable=not sys.stderr.isatty(),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.stage, total=self.total, completed=self.completed, rate="")
        return self

    def advance(self, rows: int, tokens: int) -> None:
        self.completed += rows
        self.tokens += tokens
        if self._progress is not None:
            rate = self.tokens / max(1e-9, time.perf_counter() - self.started)
            self._progress.update(self._task, advance=rows, rate=f"{rate:6.1f} tok/s")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            if not sys.stderr.isatty() and self.enabled:
                seconds = time.perf_counter() - self.started
                print(
                    f"{self.stage}: {self.completed}/{self.total} rows, {self.tokens} new tokens "
                    f"in {seconds:.1f} s ({self.tokens / max(seconds, 1e-9):.1f} tok/s)",
                    file=sys.stderr,
                )
