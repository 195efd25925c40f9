"""Where cai keeps things: the cache directory and the shipped data (prompts, constitutions)."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """The cai cache: converted builtin models, engine compile caches. `CAI_CACHE` overrides."""
    root = os.environ.get("CAI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cai")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shipped_dir(name: str) -> Path:
    """A shipped data folder (`prompts`, `constitutions`, `data`).

    A wheel carries them inside the package under `_data/`; an editable install (the
    `make` path) reads them from the repository root.
    """
    inside = _PACKAGE_DIR / "_data" / name
    if inside.is_dir():
        return inside
    return _PACKAGE_DIR.parent / name
