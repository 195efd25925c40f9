"""SL-CAI: apply a constitution to prompts by critique and revision, stage by stage.

    cai critique --constitution constitutions/harmless.yaml --prompts red_team.jsonl \
        --model smollm2-135m-instruct --rounds 2 --out runs/critique

For every prompt the model answers; then, each round, it critiques its latest answer under a
principle sampled for that round and revises it. Work is batched by stage (all initial answers,
then all round-1 critiques, then all round-1 revisions, ...), never one sample at a time, so the
engine sees whole batches; constitution few-shot examples form the same prefix for every request,
which vLLM's prefix cache reuses. From the first critique on, each stage's prompt is the previous
stage's prompt + its (stripped) answer + one new user turn, so the cache also serves everything the
previous stage computed, in whole blocks (tests/test_prefix_cache.py). The initial stage has no
few-shot turns, so the first critique cannot extend it; adding them would change the initial
answers (estimated from the quickstart's counts: the first critique would prefill ~2,600 tokens
instead of 10,030, while the initial stage prefilled the few-shot block once more).

Outputs in the run directory, every row schema-checked:
- `sft.jsonl`: TRL `messages` (the prompt's own turns + final revision; the constitution's
  `system` prompt is part of the critique conversation only, not of the rows trained on);
- `preferences.jsonl`: TRL conversational prompt/chosen/rejected, chosen = final revision,
  rejected = initial answer, `chosen_prob` 1.0;
- `trace.jsonl`: the initial answer and every critique and revision with its principle id;
- `summary.json`: counts, filter drops, time, tokens/s; prompt tokens and how many of them the
  engine's prefix cache served (`cached_prompt_tokens`, `cached_prompt_share`), in total and per stage.

Crash safety: each stage appends finished rows to `work/<stage>.jsonl` per chunk (flushed and
fsynced). Rows are keyed by a stable id (prompt + settings) and every request carries its own
seed, so a killed run resumes where it stopped and ends with exactly the rows an uninterrupted
run would have written. Changing a setting that alters outputs is refused unless overwrite.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cai import __version__, cards, quality, schema, store
from cai.constitution import Constitution
from cai.engines.base import ChatPrompt, Engine, SamplingSettings
from cai.errors import CaiError
from cai.durable import WorkItem, cached_share, generate_durably, request_seed
from cai.prompt_sets import Prompt
from cai.prompts import PromptSet
from cai.sampling import policy_messages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CritiqueSettings:
    rounds: int = 2
    seed: int = 0
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=0.7, max_tokens=256))
    critique_max_tokens: int | None = None  # default: sampling.max_tokens
    few_shot: int | None = None  # how many of the constitution's examples to prepend; None = all
    chunk_size: int = 128  # rows per engine call and per durable append
    drop_truncated: bool = True  # a revision cut off at max_tokens is usually mid-sentence
    echo_threshold: float = 0.7
    max_repetition: float = 0.5

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise CaiError("rounds must be >= 1", field="critique.rounds")
        if self.chunk_size < 1:
            raise CaiError("chunk_size must be >= 1", field="critique.chunk_size")


@dataclass
class CritiqueSummary:
    prompts: int
    sft_rows: int
    preference_pairs: int
    flags: dict[str, int]
    dropped_no_valid_revision: int
    dropped_unchanged_pairs: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float
    resumed: bool
    stages: dict[str, dict] = field(default_factory=dict)
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache
    cached_prompt_share: float = 0.0


def stage_names(rounds: int) -> list[str]:
    names = ["initial"]
    for r in range(1, rounds + 1):
        names += [f"critique-{r}", f"revision-{r}"]
    return names


class CritiqueRun:
    """One critique-and-revise run over a prompt set; `run()` does or resumes the work."""

    def __init__(
        self,
        engine: Engine,
        constitution: Constitution,
        prompts: Sequence[Prompt],
        templates: PromptSet,
        out_dir: str | Path,
        settings: CritiqueSettings = CritiqueSettings(),
        *,
        overwrite: bool = False,
        show_progress: bool = True,
        on_chunk: Callable[[str, int], None] | None = None,
    ):
        self.engine = engine
        self.constitution = constitution
        self.prompts = list(prompts)
        self.templates = templates
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.on_chunk = on_chunk  # test hook: called after each durable append
        examples = constitution.few_shot if settings.few_shot is None else constitution.few_shot[: settings.few_shot]
        self.few_shot_turns = self._few_shot_turns(examples)
        self.few_shot_count = len(examples)
        sampler = constitution.sampler(settings.seed)
        self.principles = {p.id: sampler.principles(p.id, settings.rounds) for p in self.prompts}
        fingerprint = self.fingerprint()
        self._row_ids = {p.id: store.stable_id(list(p.messages), fingerprint) for p in self.prompts}

    # -- identity -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """Everything that changes what the loop writes. The prompt list is not part of it:
        adding prompts to a finished run only adds rows."""
        return {
            "stage": "critique",
            "model": self.engine.model,
            "engine": self.engine.name,
            "constitution_hash": self.constitution.hash,
            "template_hash": self.templates.hash("initial", "critique", "revision"),
            "seed": self.settings.seed,
            "rounds": self.settings.rounds,
            "sampling": asdict(self.settings.sampling),
            "critique_max_tokens": self.settings.critique_max_tokens,
            "few_shot": self.few_shot_count,
        }

    def provenance(self) -> dict:
        fp = self.fingerprint()
        return {
            "stage": "critique",
            "model": fp["model"],
            "engine": fp["engine"],
            "sampling": fp["sampling"],
            "constitution": self.constitution.name,
            "constitution_hash": fp["constitution_hash"],
            "template_hash": fp["template_hash"],
            "seed": fp["seed"],
            "rounds": fp["rounds"],
            "cai_version": __version__,
        }

    def row_id(self, prompt: Prompt) -> str:
        return self._row_ids[prompt.id]

    # -- conversations ----------------------------------------------------------------------------
    def _few_shot_turns(self, examples) -> list[dict]:
        turns: list[dict] = []
        for example in examples:
            turns += [dict(m) for m in example.messages]
            turns += [
                {"role": "assistant", "content": example.response},
                {"role": "user", "content": self.templates.render("critique", request=example.critique_request).content},
                {"role": "assistant", "content": example.critique},
                {"role": "user", "content": self.templates.render("revision", request=example.revision_request).content},
                {"role": "assistant", "content": example.revision},
            ]
        return turns

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.constitution.system}] if self.constitution.system else []

    def _user_turns(self, prompt: Prompt) -> list[dict]:
        turns = [dict(m) for m in prompt.messages]
        last = turns[-1]
        turns[-1] = {"role": "user", "content": self.templates.render("initial", prompt=last["content"]).content}
        return turns

    def conversation(self, prompt: Prompt, stage: str, done: dict[str, dict[str, dict]]) -> ChatPrompt:
        row = self.row_id(prompt)
        if stage == "initial":
            return ChatPrompt.of(self._system() + self._user_turns(prompt))
        kind, round_text = stage.split("-")
        round_number = int(round_text)
        turns = self._system() + self.few_shot_turns + self._user_turns(prompt)
        turns.append({"role": "assistant", "content": done["initial"][row]["text"]})
        for r in range(1, round_number + 1):
            principle = self.principles[prompt.id][r - 1]
            turns.append({"role": "user", "content": self.templates.render("critique", request=principle.critique).content})
            if kind == "critique" and r == round_number:
                break
            turns.append({"role": "assistant", "content": done[f"critique-{r}"][row]["text"]})
            turns.append({"role": "user", "content": self.templates.render("revision", request=principle.revision).content})
            if r == round_number:
                break
            turns.append({"role": "assistant", "content": done[f"revision-{r}"][row]["text"]})
        return ChatPrompt.of(turns)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> CritiqueSummary:
        with store.RunLock(self.out_dir):
            return self._run()

    def _run(self) -> CritiqueSummary:
        started = time.perf_counter()
        resumed = store.prepare_run_dir(self.out_dir, self.fingerprint(), overwrite=self.overwrite)
        work = self.out_dir / "work"
        done: dict[str, dict[str, dict]] = {}
        stages: dict[str, dict] = {}
        for stage in stage_names(self.settings.rounds):
            worklog = store.WorkLog(work / f"{stage}.jsonl")
            done[stage] = worklog.read()
            todo = [p for p in self.prompts if self.row_id(p) not in done[stage]]
            stages[stage] = self._run_stage(stage, todo, worklog, done)
        summary = self._write_outputs(done, stages, started, resumed)
        return summary

    def _stage_sampling(self, stage: str) -> SamplingSettings:
        sampling = self.settings.sampling
        if stage.startswith("critique") and self.settings.critique_max_tokens:
            return SamplingSettings(**{**asdict(sampling), "max_tokens": self.settings.critique_max_tokens, "stop": tuple(sampling.stop)})
        return sampling

    def _run_stage(self, stage: str, todo: list[Prompt], worklog: store.WorkLog, done: dict) -> dict:
        items = [
            WorkItem(self.row_id(p), self.conversation(p, stage, done), request_seed(self.row_id(p), stage)) for p in todo
        ]

        def to_row(item: WorkItem, generation) -> dict:
            return {
                "id": item.id,
                "text": generation.texts[0].strip(),
                "finish_reason": generation.finish_reasons[0] if generation.finish_reasons else "stop",
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens[0],
            }

        rows, stats = generate_durably(
            self.engine, items, self._stage_sampling(stage), worklog,
            label=stage, total=len(self.prompts), chunk_size=self.settings.chunk_size, to_row=to_row,
            show_progress=self.show_progress, on_chunk=self.on_chunk,
        )
        for row in rows:
            done[stage][row["id"]] = row
        return stats

    # -- outputs --------------------------------------------------------------------------------------
    def _flags(self, revision: dict, critique: dict, initial: dict) -> list[str]:
        text = revision["text"]
        flags = []
        if quality.is_empty(text):
            flags.append("empty")
        if revision.get("finish_reason") == "length" and self.settings.drop_truncated:
            flags.append("truncated")
        if quality.echoes(text, critique["text"], self.settings.echo_threshold):
            flags.append("echoes_critique")
        if quality.is_degenerate(text, self.settings.max_repetition):
            flags.append("degenerate")
        if quality.same_answer(text, initial["text"]):
            flags.append("unchanged")
        return flags

    def _write_outputs(self, done: dict, stages: dict, started: float, resumed: bool) -> CritiqueSummary:
        provenance = self.provenance()
        flag_counts = {name: 0 for name in ("empty", "truncated", "echoes_critique", "degenerate", "unchanged")}
        sft, preferences, traces = [], [], []
        dropped_invalid = dropped_unchanged = 0
        for prompt in self.prompts:
            row = self.row_id(prompt)
            initial = done["initial"][row]
            rounds, final_round = [], None
            for r in range(1, self.settings.rounds + 1):
                critique, revision = done[f"critique-{r}"][row], done[f"revision-{r}"][row]
                flags = self._flags(revision, critique, initial)
                for flag in flags:
                    flag_counts[flag] += 1
                if not set(flags) - {"unchanged"}:
                    final_round = r  # the latest revision that passes every filter
                rounds.append({
                    "round": r,
                    "principle_id": self.principles[prompt.id][r - 1].id,
                    "critique": critique["text"],
                    "revision": revision["text"],
                    "flags": flags,
                })
            principle_ids = [entry["principle_id"] for entry in rounds]
            row_flags = [] if final_round else ["no_valid_revision"]
            if final_round:
                final = rounds[final_round - 1]["revision"]
                # As sampling, PPO and evaluation ask the policy: the constitution's system prompt
                # steered the critique conversation only (see cai.sampling.policy_messages).
                prompt_turns = policy_messages(prompt)
                sft.append({
                    "id": row,
                    "messages": prompt_turns + [{"role": "assistant", "content": final}],
                    "principle_ids": principle_ids[:final_round],
                    "provenance": provenance,
                })
                if quality.same_answer(final, initial["text"]) or quality.is_empty(initial["text"]):
                    dropped_unchanged += 1
                    row_flags.append("pair_dropped_unchanged")
                else:
                    preferences.append({
                        "id": row,
                        "prompt": prompt_turns,
                        "chosen": [{"role": "assistant", "content": final}],
                        "rejected": [{"role": "assistant", "content": initial["text"]}],
                        "chosen_prob": 1.0,
                        "source": "sl-cai",
                        "principle_ids": principle_ids[:final_round],
                        "provenance": provenance,
                    })
            else:
                dropped_invalid += 1
            traces.append({
                "id": row,
                "prompt_id": prompt.id,
                "category": prompt.category,
                "prompt": [dict(m) for m in prompt.messages],
                "initial": initial["text"],
                "rounds": rounds,
                "final_round": final_round,
                "flags": row_flags,
                "provenance": provenance,
            })
        for name, rows in (("sft", sft), ("preference", preferences), ("trace", traces)):
            for index, record in enumerate(rows):
                schema.validate_record(name, record, f"{self.out_dir}/{name} row {index + 1}")
        store.write_jsonl_atomic(self.out_dir / "trace.jsonl", traces)
        store.write_jsonl_atomic(self.out_dir / "sft.jsonl", sft)
        store.write_jsonl_atomic(self.out_dir / "preferences.jsonl", preferences)
        prompt_tokens = sum(s["prompt_tokens"] for s in stages.values())
        cached_tokens = sum(s["cached_prompt_tokens"] for s in stages.values())
        completion_tokens = sum(s["completion_tokens"] for s in stages.values())
        generation_seconds = sum(s["seconds"] for s in stages.values())
        summary = CritiqueSummary(
            prompts=len(self.prompts),
            sft_rows=len(sft),
            preference_pairs=len(preferences),
            flags=flag_counts,
            dropped_no_valid_revision=dropped_invalid,
            dropped_unchanged_pairs=dropped_unchanged,
            seconds=round(time.perf_counter() - started, 2),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_per_s=round(completion_tokens / generation_seconds, 1) if generation_seconds else 0.0,
            resumed=resumed,
            stages=stages,
            cached_prompt_tokens=cached_tokens,
            cached_prompt_share=cached_share(cached_tokens, prompt_tokens),
        )
        store.write_json_atomic(self.out_dir / "summary.json", asdict(summary))
        cards.write_dataset_card(self.out_dir, "critique", self.constitution)
        return summary


def save_as_datasets(out_dir: str | Path) -> Path:
    """A `datasets.save_to_disk` copy of sft and preferences, beside the JSONL files."""
    import datasets

    out_dir = Path(out_dir)
    target = out_dir / "hf"
    for name in ("sft", "preferences"):
        dataset = datasets.load_dataset("json", data_files=str(out_dir / f"{name}.jsonl"), split="train")
        dataset.save_to_disk(str(target / name))
    return target
