"""Chunked, durable engine work: the loop every generating stage shares.

Items are (row id, request, seed). They are sent to the engine a chunk at a time; each chunk's
rows are appended to a `WorkLog` (flushed and fsynced) before the next chunk starts, so a killed
job loses at most one chunk and resumes from its log. Per-request seeds make a regenerated chunk
identical to what an uninterrupted run would have produced. The stats count prompt tokens and how
many of them the engine served from its prefix cache (vLLM reports them; other engines report 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cai import store
from cai.engines.base import ChatPrompt, Engine, Generation, SamplingSettings
from cai.progress import StageProgress


@dataclass(frozen=True)
class WorkItem:
    id: str
    request: ChatPrompt
    seed: int


def request_seed(*parts) -> int:
    """A per-request seed derived from stable parts (row id, stage name, ...)."""
    return int(store.stable_id(*parts)[:12], 16)


def cached_share(cached: int, prompt: int) -> float:
    """The share of prompt tokens the engine served from its prefix cache (0 when none were sent)."""
    return round(cached / prompt, 4) if prompt else 0.0


def generate_durably(
    engine: Engine,
    items: Sequence[WorkItem],
    sampling: SamplingSettings,
    worklog: store.WorkLog,
    *,
    label: str,
    total: int,
    chunk_size: int,
    to_row: Callable[[WorkItem, Generation], dict],
    adapter: str | None = None,
    show_progress: bool = True,
    on_chunk: Callable[[str, int], None] | None = None,
) -> tuple[list[dict], dict]:
    """Generate for `items` (those not yet done), appending rows durably; returns (rows, stats)."""
    stats = {"rows": total, "generated": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
             "seconds": 0.0}
    produced: list[dict] = []
    with StageProgress(label, total=total, completed=total - len(items), enabled=show_progress) as bar:
        for start in range(0, len(items), chunk_size):
            chunk = items[start : start + chunk_size]
            began = time.perf_counter()
            generations = engine.generate([i.request for i in chunk], sampling, adapter=adapter, seeds=[i.seed for i in chunk])
            stats["seconds"] += time.perf_counter() - began
            rows = [to_row(item, generation) for item, generation in zip(chunk, generations)]
            worklog.append(rows)
            produced += rows
            new_tokens = sum(sum(g.completion_tokens) for g in generations)
            stats["generated"] += len(rows)
            stats["prompt_tokens"] += sum(g.prompt_tokens for g in generations)
            stats["cached_prompt_tokens"] += sum(g.cached_tokens for g in generations)
            stats["completion_tokens"] += new_tokens
            bar.advance(len(rows), new_tokens)
            if on_chunk:
                on_chunk(label, len(rows))
    stats["cached_prompt_share"] = cached_share(stats["cached_prompt_tokens"], stats["prompt_tokens"])
    return produced, stats
