"""Quality flags for generated revisions (and any other generated answer).

Each check is cheap and explainable; the critique stage counts every flag it raises so a user
sees how much data each filter removed. Thresholds are arguments, not constants buried in the
loop, so recipes can tune them.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

_WORD = re.compile(r"\w+")


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def is_empty(text: str) -> bool:
    return not text.strip()


def echoes(text: str, source: str, threshold: float = 0.7) -> bool:
    """True when `text` mostly repeats `source` (a revision that restates the critique)."""
    a, b = normalise_text(text), normalise_text(source)
    if not a or not b:
        return False
    if a in b or (len(b) > 40 and b in a and len(b) > 0.6 * len(a)):
        return True
    return SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier n-gram: 0 for fresh text, near 1 for loops."""
    words = _WORD.findall(text.lower())
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def is_degenerate(text: str, max_repetition: float = 0.5, min_words: int = 16) -> bool:
    if len(_WORD.findall(text)) < min_words:
        return False
    return repetition_ratio(text) > max_repetition


def same_answer(a: str, b: str) -> bool:
    return normalise_text(a) == normalise_text(b)
