"""Content digests of the files a recipe stage reads, for `cai run`'s skip-if-unchanged check.

Why it exists: a stage's fingerprint used to hold the *paths* of its inputs, so the user's central
loop (edit a principle in the constitution, rerun the recipe) reported every stage "unchanged"
and skipped it. The fingerprint now holds what the files say:

- a file: the SHA-256 of its bytes (files over `LARGE_FILE` bytes: size and modification time,
  so a local 14 GB model folder costs a `stat`, not a minute of hashing);
- a folder (a prompt-template directory, a local model or dataset): its relative file names with
  each file's digest;
- any other string (a builtin model name, a hub or `datasets` id) is left as it is: its content
  is not on this machine to read.

Digests are cached per (path, size, mtime) within a process, so the fingerprints of a dozen
stages read each input once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

LARGE_FILE = 64 * 2**20
_cache: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        if stat.st_size > LARGE_FILE:
            _cache[key] = f"size={stat.st_size},mtime={stat.st_mtime_ns}"
        else:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            _cache[key] = digest.hexdigest()
    return _cache[key]


def path_digest(path: Path) -> str:
    """A file's digest, or a folder's (every file below it, hidden ones and caches excepted)."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = Path(root) / name
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def input_digests(value: Any, resolve=lambda s: s) -> dict[str, str]:
    """Digest of every string in `value` (a settings dataclass, dict or list) naming an existing
    file or folder, keyed by the string as written. `resolve` maps a written path to a real one
    (the recipe's lookup of shipped files)."""
    found: dict[str, str] = {}

    def walk(item: Any) -> None:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            item = dataclasses.asdict(item)
        if isinstance(item, dict):
            for sub in item.values():
                walk(sub)
        elif isinstance(item, (list, tuple)):
            for sub in item:
                walk(sub)
        elif isinstance(item, str) and item and item not in found and len(item) < 4096 and "\n" not in item:
            path = Path(resolve(item))
            try:
                if path.exists() and path.resolve() not in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
                    found[item] = path_digest(path)
            except OSError:
                pass  # unreadable: the stage itself reports it when it opens the file

    walk(value)
    return found
