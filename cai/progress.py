"""Progress display for long stages: done/total, rate and ETA, one bar per stage.

    cai run recipes/quickstart.yaml                 # a live bar per stage on the terminal
    cai run recipes/quickstart.yaml 2> stage.log    # plain lines, one every 30 s, in the file

Where progress goes:
- a terminal (stderr is a tty): rich draws a live bar (generation stages: rows and tokens/s;
  training stages: optimiser steps, s/step and the last loss);
- stderr that is not a terminal (CI, `2> file`, `| tee`): one plain line every
  `CAI_PROGRESS_SECONDS` (default 30; 0 = every update), then a summary line, so a log file reads
  as a short history instead of thousands of redraws;
- the run log (`set_log_file`, which `cai run` points at `<output_dir>/run.log`): the same plain
  lines, whatever stderr is, so a run started in a terminal can still be followed with `tail -f`.

Training stages get theirs through `cai.train.tracking.TrainingProgress`, a transformers callback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_log_file: Path | None = None


def set_log_file(path: Path | None) -> None:
    """Also append every plain progress line to `path` (None: stop)."""
    global _log_file
    _log_file = Path(path) if path is not None else None


def current_log_file() -> str | None:
    return str(_log_file) if _log_file is not None else None


def log_line(text: str) -> None:
    """Append one timestamped line to the run log, if one is set."""
    if _log_file is not None:
        with open(_log_file, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("CAI_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class StageProgress:
    """`unit`: what `total` counts ("rows" or "steps"). Generation stages `advance(rows, tokens)`
    and show tokens/s; training stages pass no tokens and show seconds per step plus a `note`
    (the last loss)."""

    def __init__(self, stage: str, total: int, completed: int = 0, enabled: bool = True, unit: str = "rows"):
        self.stage = stage
        self.total = total
        self.completed = completed
        self.start_completed = completed
        self.unit = unit
        self.tokens = 0
        self.note = ""
        self.started = time.perf_counter()
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_line = self.started
        self._progress: Progress | None = None

    def __enter__(self) -> "StageProgress":
        if self.enabled and self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<12}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.stage, total=self.total, completed=self.completed, rate="")
        if self.enabled:
            log_line(f"{self.stage}: started at {self.completed}/{self.total} {self.unit}")
        return self

    def rate(self) -> str:
        seconds = max(1e-9, time.perf_counter() - self.started)
        if self.tokens:
            return f"{self.tokens / seconds:6.1f} tok/s"
        done = self.completed - self.start_completed
        return f"{seconds / done:.2f} s/{self.unit.rstrip('s')}" if done else ""

    def line(self) -> str:
        """One plain, self-contained progress line (the log-file form of the bar)."""
        elapsed = time.perf_counter() - self.started
        done = self.completed - self.start_completed
        left = self.total - self.completed
        eta = clock(elapsed / done * left) if done and left > 0 else "-"
        percent = 100 * self.completed / self.total if self.total else 100.0
        parts = [f"{self.stage}: {self.completed}/{self.total} {self.unit} ({percent:.0f}%)", self.rate().strip(),
                 f"elapsed {clock(elapsed)}", f"eta {eta}", self.note]
        return ", ".join(p for p in parts if p)

    def advance(self, rows: int, tokens: int = 0, note: str = "") -> None:
        self.completed += rows
        self.tokens += tokens
        self.note = note or self.note
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, advance=rows, rate=f"{self.rate()} {self.note}".rstrip())
        now = time.perf_counter()
        if now - self._last_line >= interval() or self.completed >= self.total:
            self._last_line = now
            text = self.line()
            log_line(text)
            if not self.tty:
                print(text, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        seconds = time.perf_counter() - self.started
        rate = f" ({self.tokens} new tokens, {self.tokens / max(seconds, 1e-9):.1f} tok/s)" if self.tokens else ""
        text = f"{self.stage}: {self.completed}/{self.total} {self.unit} in {seconds:.1f} s{rate}"
        if exc and exc[0] is not None:
            text += f", stopped by {exc[0].__name__}"
        log_line(text)
        if not self.tty:
            print(text, file=sys.stderr, flush=True)
