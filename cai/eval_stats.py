"""Intervals for the evaluation's numbers: Wilson intervals for rates, a normal interval for means.

Kept apart from `cai.evaluation` so the judge checks (`cai.eval_judge`) and the KL estimate
(`cai.eval_kl`) report their uncertainty the same way without importing each other.
"""

from __future__ import annotations

import math
from typing import Sequence


def wilson(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at 0/n and n/n, unlike the normal one."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def rate(flags: Sequence[float]) -> dict:
    total = len(flags)
    value = sum(flags) / total if total else None
    return {"rate": round(value, 4) if value is not None else None, "ci95": wilson(sum(flags), total), "n": total}


def mean_interval(values: Sequence[float], z: float = 1.96) -> dict:
    """Mean, sample standard deviation and the normal-approximation 95% interval of the mean."""
    n = len(values)
    if n == 0:
        return {"mean": None, "sd": None, "ci95": None, "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": round(mean, 4), "sd": None, "ci95": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "sd": round(sd, 4), "ci95": (round(mean - half, 4), round(mean + half, 4)), "n": n}
