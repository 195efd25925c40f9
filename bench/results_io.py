"""Shared by the bench scripts: every result file records the machine it was measured on, so
numbers from a 2-core CPU and a lent GPU are never compared by mistake."""

from __future__ import annotations

import json
import os
import platform
import resource
from datetime import datetime, timezone
from pathlib import Path


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    info.update(cpu_features())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_features() -> dict:
    """The CPU's name and the vector extensions that set its matmul speed: the same 2-core machine
    has been handed out as an AVX512-BF16 host and as an AVX2-only one, ~1.5-2x apart."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {"cpu": name, "cpu_flags": [f for f in wanted if f in flags]}


def peak_memory() -> dict:
    """Peak resident memory of this process, plus peak allocated GPU memory on CUDA."""
    import torch

    peaks = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available():
        peaks["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return peaks


def with_roofline(results: dict, **fractions: float | None) -> dict:
    """`results` plus `roofline_fraction`: {part: share of this machine's bound it reached}, from
    bench/roofline.py's `generation_fraction`/`training_fraction` (None: not computable)."""
    shares = {part: None if f is None else round(f, 4) for part, f in fractions.items()}
    return {**results, "roofline_fraction": {**results.get("roofline_fraction", {}), **shares}}


def write_results(out: str | Path, results: dict) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**results, "machine": machine()}, indent=2)
    out.write_text(text + "\n")
    print(text)
