"""Durable files for long jobs: append-only JSONL work logs, atomic final outputs, run manifests.

The rule every stage follows: a finished unit of work is appended to a work log and fsynced
before the next unit starts; final outputs are written to a temporary file, fsynced, renamed
into place and the folder fsynced, so after a kill or a power cut a file is either the old one
or the whole new one. A torn last line of a work log (killed mid-write) is cut off on the next
read; any other damaged line stops the run with its file and line, and nothing is deleted.

JSONL is split on "\\n" only: cai writes text raw (`ensure_ascii=False`), and a model output may
hold U+2028, U+2029 or U+0085, which `str.splitlines()` would treat as line ends.

A manifest records the settings fingerprint of a run. Resuming with settings that would change
outputs is refused (mixing two runs' rows silently corrupts a dataset) unless the caller asks
to overwrite; overwriting removes only the names cai writes (`CAI_NAMES`) from a folder cai
marked as its own, never a folder it did not create, and never a file it does not know.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai import testing_hooks
from cai.errors import CaiError

log = logging.getLogger(__name__)

LOCK_NAME = ".cai.lock"
MANIFEST = "manifest.json"
STAGE_MARKERS = ("stage.json", "done.json")  # what `cai run` writes in each stage folder

# Every name cai writes at the top of a run or stage folder: markers and summaries, work logs,
# final outputs, training checkpoints and adapters, eval caches, temporaries of atomic writes.
# `clear_directory` removes these and nothing else, so a user's file in a run folder survives
# --overwrite. A stage that writes a new top-level name must add it here.
CAI_NAMES = frozenset({
    MANIFEST, "stage.json", "done.json", "summary.json", "metrics.json", "report.md", "report.html",
    "work", "trace.jsonl", "sft.jsonl", "preferences.jsonl", "responses.jsonl", "train.jsonl", "eval.jsonl",
    "best_of_n.jsonl", "hf", "labels", "README.md",
    "checkpoints", "checkpoint", "checkpoint.tmp", "adapter", "stage_adapter", "merged", "value_head.pt",
    "kl_samples.json", "calibration_labels", "run.log", "tracking", "launch.json",
})
CAI_PATTERNS = ("answers-*.json", "harness-*.json", ".*.tmp-*")


def stable_id(*parts: Any) -> str:
    """A short digest of JSON-serialisable parts: the same inputs give the same id in any run."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


# -- reading JSONL ----------------------------------------------------------------------------------


def iter_jsonl(lines: Iterable[str | bytes], source: str, *, objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, row) for each non-blank line; `lines` must already be split on "\\n" only.

    Bytes are decoded as UTF-8 line by line, so a bad byte is reported with its line. Problems
    are `CaiError`s naming `source:line`; with `objects`, a row that is not a JSON object is one.
    """
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CaiError(f"not valid UTF-8 (byte {exc.start + 1} of the line)", source=f"{source}:{number}") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip(" \t\r\n"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaiError(f"not valid JSON: {exc.msg}", source=f"{source}:{number}") from None
        except (ValueError, RecursionError) as exc:  # an integer over 4300 digits; nesting too deep
            raise CaiError(f"not valid JSON: {str(exc).split(';')[0]}", source=f"{source}:{number}") from None
        if objects and not isinstance(row, dict):
            raise CaiError(f"a row must be a JSON object, got {type(row).__name__}", source=f"{source}:{number}")
        yield number, row


def parse_json(text: str, source: str) -> Any:
    """One JSON document; every way it can be bad (syntax, an integer over 4300 digits, nesting too
    deep for the parser) is a `CaiError` naming the file (and line, where the parser knows it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaiError(f"not valid JSON: {exc.msg}", source=f"{source}:{exc.lineno}") from None
    except (ValueError, RecursionError) as exc:
        raise CaiError(f"not valid JSON: {str(exc).split(';')[0] or type(exc).__name__}", source=source) from None


def parse_jsonl(text: str, source: str, *, objects: bool = True) -> list[tuple[int, Any]]:
    """`iter_jsonl` over text already read and decoded (the importers' gzip path)."""
    return list(iter_jsonl(text.split("\n"), source, objects=objects))


def read_jsonl(path: Path | str, *, objects: bool = True) -> Iterator[Any]:
    """The rows of a JSONL file, streamed; every problem is a `CaiError` naming file:line."""
    try:
        handle = Path(path).open("rb")  # binary lines end at b"\n" only
    except OSError as exc:
        raise CaiError(f"cannot read: {exc.strerror or exc}", source=str(path)) from None
    with handle:
        for _, row in iter_jsonl(handle, str(path), objects=objects):
            yield row


# -- durable writes ---------------------------------------------------------------------------------


def fsync_dir(directory: Path | str) -> None:
    """Make a folder's entries (a file created or renamed into it) survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file's data, then every folder's entries (deepest first), down from `folder`."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_dir(directory)
    fsync_dir(folder)


def make_dirs(directory: Path) -> None:
    """`mkdir -p` whose new folders are recorded durably in their parents."""
    directory = Path(directory)
    missing = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def _replace_durably(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


class WorkLog:
    """Append-only JSONL keyed by `id`; each append is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[str, dict]:
        """Every row by id. Only an unterminated last line (a write cut by a kill) is removed;
        any other bad line is a `CaiError` naming file:line, and the file is left as it is."""
        rows: dict[str, dict] = {}
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return rows
        except OSError as exc:
            raise CaiError(f"cannot read work log: {exc.strerror or exc}", source=str(self.path)) from None
        good_bytes, torn = 0, False
        with handle:
            for number, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    torn = True  # binary iteration splits at b"\n": only the last line can lack one
                    break
                row = self._row(raw, number)
                if row is not None:
                    rows[row["id"]] = row
                good_bytes += len(raw)
        if torn:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)
                os.fsync(handle.fileno())
        return rows

    def _row(self, raw: bytes, number: int) -> dict | None:
        where = f"{self.path}:{number}"
        fix = "fix or delete this line and rerun (nothing was removed)"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CaiError(f"work log row is not valid UTF-8 (byte {exc.start + 1}); {fix}", source=where) from None
        if not text.strip(" \t\r\n"):
            return None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CaiError(f"work log row is not valid JSON ({exc.msg}); {fix}", source=where) from None
        except (ValueError, RecursionError) as exc:
            raise CaiError(f"work log row is not valid JSON ({str(exc).split(';')[0]}); {fix}", source=where) from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)):
            raise CaiError(f"work log row has no 'id'; {fix}", source=where)
        return row

    def append(self, rows: Iterable[dict]) -> None:
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not data:
            return
        try:
            make_dirs(self.path.parent)
            created = not self.path.exists()
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if created:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise CaiError(f"cannot write work log: {exc.strerror or exc}", source=str(self.path)) from None
        testing_hooks.checkpoint("worklog.append")  # crash tests die here: the rows are on disk


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    """Write all rows to `path` via a fsynced temporary file and rename; returns the row count."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        make_dirs(path.parent)
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        _replace_durably(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CaiError(f"cannot write output: {exc.strerror or exc}", source=str(path)) from None
    return count


def write_json_atomic(path: Path, data: Any) -> None:
    """Write one JSON document via a fsynced temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        make_dirs(path.parent)
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _replace_durably(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CaiError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None


# -- run folders ------------------------------------------------------------------------------------


def is_cai_name(name: str) -> bool:
    return name in CAI_NAMES or any(fnmatch.fnmatchcase(name, pattern) for pattern in CAI_PATTERNS)


def entries(directory: Path) -> list[str]:
    """The names in a folder other than the run lock; [] when it does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


def name_list(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class DamagedMarker(ValueError):
    """A marker file that exists but cannot be read as JSON (empty after a power cut, cut short)."""


class ForeignMarker(ValueError):
    """A readable JSON file under a marker's name that cai did not write (a web app's manifest)."""


def read_marker(path: Path) -> str | None:
    """The fingerprint a cai marker (`manifest.json`, `stage.json`, `done.json`) records, or
    None when the file does not exist; raises `DamagedMarker` or `ForeignMarker` otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 and bad JSON
        raise DamagedMarker(str(exc)) from None
    if not isinstance(data, dict) or "fingerprint" not in data:
        raise ForeignMarker(str(path))
    return data["fingerprint"]


def has_cai_marker(directory: Path, names: Iterable[str] = (MANIFEST, *STAGE_MARKERS)) -> bool:
    """Whether a readable cai marker in `directory` shows that cai created it."""
    for name in names:
        try:
            if read_marker(Path(directory) / name) is not None:
                return True
        except ValueError:
            continue
    return False


def clear_directory(directory: Path, *, keep: Iterable[str] = ()) -> list[str]:
    """Remove what cai wrote in `directory` (names in `CAI_NAMES`/`CAI_PATTERNS`), except `keep`
    and the run lock held by this process; returns the names left because cai did not write them.

    The caller must first establish that cai owns the folder (its manifest or stage marker).
    Symlinks are unlinked, never followed.
    """
    keep = {LOCK_NAME, *keep}
    foreign = []
    for entry in sorted(Path(directory).iterdir()):
        if entry.name in keep:
            continue
        if not is_cai_name(entry.name):
            foreign.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return foreign


def _clear_reporting(out_dir: Path, keep: Iterable[str]) -> None:
    kept = clear_directory(out_dir, keep=keep)
    if kept:
        log.warning("%s: --overwrite kept files cai did not write: %s", out_dir, name_list(kept))


def _adoptable(out_dir: Path, names: list[str]) -> bool:
    """A folder that lost its manifest but holds only cai's names and its work logs."""
    work = out_dir / "work"
    return (all(is_cai_name(n) for n in names) and work.is_dir() and not work.is_symlink()
            and all(p.is_file() and p.suffix == ".jsonl" for p in work.iterdir()))


def prepare_run_dir(out_dir: Path, fingerprint: dict, *, overwrite: bool) -> bool:
    """Create or reopen `out_dir` for a run with these settings; True when resuming.

    - new or empty folder: a new run;
    - `manifest.json` with the same fingerprint: resumed;
    - a different fingerprint: refused, or with `overwrite` cai's files are removed (files cai
      did not write are kept and named in a warning) and the run starts afresh;
    - a damaged `manifest.json` (empty after a power cut): refused, with how to recover;
    - no manifest but only cai's names and `work/*.jsonl` (a manifest the user deleted to
      recover): the work logs are adopted and resumed;
    - no manifest in a `cai run` stage folder (its `stage.json`): a new run;
    - anything else is not cai's and is refused, even with `overwrite`.
    """
    out_dir = Path(out_dir)
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples become lists, as they will on reload
    manifest = out_dir / MANIFEST
    names = entries(out_dir)
    resumed = False
    if names:
        try:
            previous = read_marker(manifest)
        except DamagedMarker:
            raise CaiError(
                f"{MANIFEST} is empty or unreadable (cut short by a crash or power cut?); the work logs under work/ "
                f"are untouched: to resume them with the same settings delete {MANIFEST} and rerun, "
                "otherwise choose another output directory",
                source=str(out_dir),
            ) from None
        except ForeignMarker:
            raise CaiError(f"is not a cai run directory (its {MANIFEST} is not cai's): choose a new or empty "
                           "output directory", source=str(out_dir)) from None
        if previous is None:
            # No manifest: a `cai run` stage folder (its stage.json) before the stage's first run,
            # or work logs whose damaged manifest the user deleted to recover them. (`cai run`
            # always passes overwrite, having checked the stage's own fingerprint.)
            marked = has_cai_marker(out_dir, STAGE_MARKERS)
            if _adoptable(out_dir, names):
                if overwrite and not marked:
                    raise CaiError(f"has no {MANIFEST}, so cai will not delete its files: remove them yourself "
                                   "or choose another output directory", source=str(out_dir))
                log.warning("%s: no %s; resuming the work logs under work/ as this run's (settings assumed "
                            "unchanged)", out_dir, MANIFEST)
                resumed = True
            elif not marked:
                foreign = [n for n in names if not is_cai_name(n)] or names
                raise CaiError(f"is not a cai run directory (no {MANIFEST}; holds {name_list(foreign)}): "
                               "choose a new or empty output directory", source=str(out_dir))
            elif overwrite:
                _clear_reporting(out_dir, keep=("stage.json",))
        elif previous == fingerprint:
            return True
        elif not overwrite:
            previous = previous if isinstance(previous, dict) else {}
            changed = sorted(k for k in set(fingerprint) | set(previous) if previous.get(k) != fingerprint.get(k))
            raise CaiError(
                f"holds a run with different settings (changed: {', '.join(changed) or 'unknown'}); "
                "use another output directory or pass --overwrite",
                source=str(out_dir),
            )
        else:
            # The old manifest stays until the new one replaces it: a kill mid-clear leaves a
            # folder that is still refused (or cleared again), never old work under new settings.
            _clear_reporting(out_dir, keep=(MANIFEST, "stage.json"))
    make_dirs(out_dir)
    write_json_atomic(manifest, {"fingerprint": fingerprint})
    return resumed


# -- the run lock -----------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on an output directory: an OS lock (`flock`) on `<dir>/.cai.lock`.

    The kernel holds the lock for as long as the descriptor is open and drops it when the
    process dies, however it dies, so a lock file a killed run left behind is simply taken
    over; no pid is ever judged stale. The pid and host written into the file are only there
    to name the owner when a second run is refused.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        while True:
            try:
                make_dirs(self.path.parent)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise CaiError(f"cannot create the run lock: {exc.strerror or exc}", source=str(self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _owner(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise CaiError(f"is in use by another cai run{owner}; wait for it or stop it",
                                   source=str(self.path.parent)) from None
                raise CaiError(f"cannot lock: {exc.strerror or exc}", source=str(self.path)) from None
            # The previous holder removes the file on release: if it did so after our open, we
            # hold a lock on a file no longer in the folder, so start over on the current one.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding the lock (see __enter__)
        finally:
            os.close(self._fd)
            self._fd = None


def _owner(fd: int) -> str:
    """' (pid N)' or ' (pid N on HOST)' from a lock file, '' when it names no one yet."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        pid, host = (info.get("pid"), info.get("host")) if isinstance(info, dict) else (int(info), None)
    except (OSError, ValueError, TypeError):
        return ""
    if not pid:
        return ""
    return f" (pid {pid})" if host in (None, socket.gethostname()) else f" (pid {pid} on {host})"


def latest_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest whole `checkpoint-N` a transformers Trainer left, or None.

    Trainer writes `trainer_state.json` last, so a folder without it is a save that a kill cut
    short; resuming from it would fail, so the previous checkpoint is used instead. Steps sort
    as numbers (checkpoint-10 is newer than checkpoint-9).
    """
    complete = [p for p in Path(checkpoints_dir).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None
