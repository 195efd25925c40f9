"""Policy samples for AI labelling: k responses per prompt, resumable.

    cai sample --prompts prompts.jsonl --model smollm2-135m-instruct [--adapter runs/sft/adapter] -k 2 --out runs/samples

Writes `responses.jsonl`: one row per prompt with its k responses and provenance. Each prompt's
request carries its own seed, so a killed run resumes to exactly the rows an uninterrupted run
writes (see `cai.durable`).

The policy is asked the prompt's own messages (`policy_messages`), with no system turn added, as
in PPO/GRPO and evaluation; SL-CAI's SFT rows and pairs carry the same messages. The
constitution's `system` prompt steers only the critique-and-revision conversation. A system prompt
meant for the policy belongs in the prompt file's `messages`, where every stage sees it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from cai import __version__, digests, store
from cai.durable import WorkItem, generate_durably, request_seed
from cai.engines.base import ChatPrompt, Engine, SamplingSettings
from cai.errors import CaiError
from cai.prompt_sets import Prompt


@dataclass(frozen=True)
class SampleSettings:
    k: int = 2
    seed: int = 0
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=1.0, max_tokens=256))
    chunk_size: int = 128

    def __post_init__(self) -> None:
        if self.k < 2:
            raise CaiError("k must be >= 2 to form pairs", field="sample.k")


def policy_messages(prompt: Prompt) -> list[dict]:
    """The conversation the policy is trained on and asked: the prompt's messages as given.

    The one place that decides it (see the module docstring); `cai.critique` writes its SFT rows
    and preference prompts with it, so they match what sampling, PPO and evaluation send.
    """
    return [dict(m) for m in prompt.messages]


def run_sampling(
    engine: Engine,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    settings: SampleSettings = SampleSettings(),
    *,
    adapter: str | None = None,
    adapter_path: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    out_dir = Path(out_dir)
    with store.RunLock(out_dir):
        return _run_sampling(engine, prompts, out_dir, settings, adapter, adapter_path, overwrite, show_progress)


def _run_sampling(engine, prompts, out_dir: Path, settings: SampleSettings, adapter, adapter_path, overwrite, show_progress) -> dict:
    sampling = SamplingSettings(**{**asdict(settings.sampling), "n": settings.k, "stop": tuple(settings.sampling.stop)})
    # The adapter by content, not by path: a retrained adapter in the same folder is another
    # policy (its rows must not be resumed from the old one's), and the same adapter in another
    # run folder draws the same samples (the row ids, and so the request seeds, hash this).
    fingerprint = {
        "stage": "sample",
        "model": engine.model,
        "engine": engine.name,
        "adapter_digest": digests.path_digest(Path(adapter_path)) if adapter_path else None,
        "k": settings.k,
        "seed": settings.seed,
        "sampling": asdict(sampling),
    }
    store.prepare_run_dir(out_dir, fingerprint, overwrite=overwrite)
    row_ids = {p.id: store.stable_id(list(p.messages), fingerprint) for p in prompts}
    worklog = store.WorkLog(out_dir / "work" / "samples.jsonl")
    done = worklog.read()
    items = [
        WorkItem(row_ids[p.id], ChatPrompt.of(policy_messages(p)), request_seed(row_ids[p.id], settings.seed))
        for p in prompts
        if row_ids[p.id] not in done
    ]

    def to_row(item, generation) -> dict:
        return {"id": item.id, "texts": [t.strip() for t in generation.texts], "finish_reasons": generation.finish_reasons,
                "completion_tokens": generation.completion_tokens}

    rows, stats = generate_durably(
        engine, items, sampling, worklog, label="sample", total=len(prompts), chunk_size=settings.chunk_size,
        to_row=to_row, adapter=adapter, show_progress=show_progress,
    )
    for row in rows:
        done[row["id"]] = row
    provenance = {"stage": "sample", "cai_version": __version__, **fingerprint, "adapter": adapter_path}
    output = [
        {
            "id": row_ids[p.id],
            "prompt_id": p.id,
            "category": p.category,
            "prompt": policy_messages(p),
            "responses": done[row_ids[p.id]]["texts"],
            "finish_reasons": done[row_ids[p.id]]["finish_reasons"],
            "provenance": provenance,
        }
        for p in prompts
    ]
    store.write_jsonl_atomic(out_dir / "responses.jsonl", output)
    summary = {"prompts": len(prompts), "k": settings.k, **{k: v for k, v in stats.items() if k != "rows"}}
    store.write_json_atomic(out_dir / "summary.json", summary)
    return summary
