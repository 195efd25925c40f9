"""Durable files for long jobs: append-only JSONL work logs, atomic final outputs, run manifests.

The rule every stage follows: a finished unit of work is appended to a work log and flushed to
disk before the next unit starts; final outputs are written to a temporary file and renamed
into place. A SIGKILL at any moment therefore loses at most the unit in flight, and a torn last
line (killed mid-write) is detected and cut off on the next read.

A manifest records the settings fingerprint of a run. Resuming with settings that would change
outputs is refused (mixing two runs' rows silently corrupts a dataset) unless the caller asks
to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.errors import CaiError


def stable_id(*parts: Any) -> str:
    """A short digest of JSON-serialisable parts: the same inputs give the same id in any run."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class WorkLog:
    """Append-only JSONL keyed by `id`; each append is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.exists():
            return rows
        good_bytes = 0
        with self.path.open("rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # torn write: the process died mid-line
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    break
                rows[row["id"]] = row
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not data:
            return
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise CaiError(f"cannot write work log: {exc.strerror or exc}", source=str(self.path)) from None


def clear_directory(directory: Path) -> None:
    """Empty a directory, keeping the run lock held by this process."""
    for entry in directory.iterdir():
        if entry.name == ".cai.lock":
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    """Write all rows to `path` via a temporary file and rename; returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CaiError(f"cannot write output: {exc.strerror or exc}", source=str(path)) from None
    return count


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CaiError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None


def read_jsonl(path: Path) -> Iterator[dict]:
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def prepare_run_dir(out_dir: Path, fingerprint: dict, *, overwrite: bool) -> bool:
    """Create or reopen `out_dir` for a run with these settings; True when resuming.

    Refuses a directory holding a run with a different fingerprint unless `overwrite`, in which
    case the old contents are removed first.
    """
    out_dir = Path(out_dir)
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples become lists, as they will on reload
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, OSError):
            previous = None
        if previous == fingerprint:
            return True
        if not overwrite:
            changed = sorted(k for k in set(fingerprint) | set(previous or {}) if (previous or {}).get(k) != fingerprint.get(k))
            raise CaiError(
                f"holds a run with different settings (changed: {', '.join(changed) or 'unknown'}); "
                "use another output directory or pass --overwrite",
                source=str(out_dir),
            )
        clear_directory(out_dir)
    elif out_dir.exists() and any(p.name != ".cai.lock" for p in out_dir.iterdir()) and not overwrite:
        raise CaiError("exists and is not a cai run directory; pass --overwrite to replace it", source=str(out_dir))
    elif out_dir.exists() and overwrite:
        clear_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"fingerprint": fingerprint})
    return False


class RunLock:
    """An exclusive lock on an output directory: `<dir>/.cai.lock` holding the owner's pid.

    A second run pointed at the same directory stops with a message naming the owner. A lock
    left by a process that no longer exists (killed, crashed) is stale and is taken over.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".cai.lock"

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise CaiError(f"is in use by another cai run (pid {owner}); wait for it or stop it",
                                   source=str(self.path.parent)) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise CaiError("could not take the run lock", source=str(self.path))

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def latest_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest whole `checkpoint-N` a transformers Trainer left, or None.

    Trainer writes `trainer_state.json` last, so a folder without it is a save that a kill cut
    short; resuming from it would fail, so the previous checkpoint is used instead. Steps sort
    as numbers (checkpoint-10 is newer than checkpoint-9).
    """
    complete = [p for p in Path(checkpoints_dir).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None
