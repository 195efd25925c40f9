"""What the evaluation asked of its engines, phase by phase: requests and tokens beside seconds.

The evaluation mixes kinds of engine work (greedy answers, the KL estimate's samples and prompt
log-probabilities, the judge's one-token reads, the reward model's scores), so its wall time alone
says nothing about how close to the machine's limit it ran. `CountingEngine` wraps an engine and
adds each call's token counts to a shared `EvalWork`; `EvalWork.close_phase` files them under the
phase that just ended, and the eval folder's `summary.json` keeps the list (`phases`).
bench/quickstart.py turns it into the eval stage's roofline fraction. Counting reads only what the
engines already return.

Kinds (what the bound must count for each):
- `generate`: prompt tokens (of them `cached`, served by the prefix cache), completion tokens,
  `sequences` decoded in the same batch;
- `sample`: the KL samples; the engine does not say how much of their prompts the cache served
  (`cached` None), so a bound leaves their prefill out;
- `prompt_logprobs`: whole sequences prefilled with log-probabilities at every position (the LM
  head on every token);
- `read`: one-token reads (the judge's choices): prefill only, logits at the last position;
- `scores`: the reward model's reads (`RewardScorer.scored_tokens`, unpadded), added by the eval.
Work done outside these (the transformers KL estimate, the harness) is not counted: a bound over
such a phase is zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def _empty() -> dict:
    return {"requests": 0, "sequences": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0}


@dataclass
class EvalWork:
    phases: list[dict] = field(default_factory=list)
    open: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, kind: str, *, requests: int, sequences: int, prompt: int, cached: int | None, completion: int = 0) -> None:
        tally = self.open.setdefault(kind, _empty())
        tally["requests"] += requests
        tally["sequences"] += sequences
        tally["prompt_tokens"] += prompt
        tally["completion_tokens"] += completion
        if cached is None or tally["cached_prompt_tokens"] is None:
            tally["cached_prompt_tokens"] = None
        else:
            tally["cached_prompt_tokens"] += cached

    def close_phase(self, name: str) -> float:
        """File the work since the last phase under `name`; returns the phase's seconds."""
        now = time.perf_counter()
        seconds = now - self.started
        self.phases.append({"phase": name, "seconds": round(seconds, 2), "work": self.open})
        self.open, self.started = {}, now
        return seconds


class CountingEngine:
    """`engine` with its calls counted into `work`; every other attribute is the engine's own (a
    method the engine lacks is missing here too, so `hasattr` checks still see the engine)."""

    def __init__(self, engine, work: EvalWork):
        self._engine, self._work = engine, work

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def _counted(self, name: str, count):
        """The engine's method `name`, calling `count(args, result)` after each call."""
        inner = getattr(self._engine, name)

        def call(*args, **kwargs):
            result = inner(*args, **kwargs)
            count(args, result)
            return result
        return call

    @property
    def generate(self):  # (prompts, sampling, ...) -> one Generation per prompt
        return self._counted("generate", lambda args, out: self._count_generations(out))

    @property
    def generate_groups(self):  # ([(prompts, sampling), ...], ...) -> Generations per group
        return self._counted("generate_groups", lambda args, out: self._count_generations([g for rows in out for g in rows]))

    def _count_generations(self, generations) -> None:
        cached = [getattr(g, "cached_tokens", None) for g in generations]
        self._work.add("generate", requests=len(generations), sequences=sum(len(g.completion_tokens) for g in generations),
                       prompt=sum(g.prompt_tokens for g in generations),
                       cached=None if any(c is None for c in cached) else sum(cached),
                       completion=sum(sum(g.completion_tokens) for g in generations))

    @property
    def score_choices(self):  # (prompts, choices, ...) -> ChoiceScores, with per-prompt counts where reported
        def count(args, scores):
            n = len(args[0])
            self._work.add("read", requests=n, sequences=n,
                           prompt=sum(scores.prompt_tokens) if len(scores.prompt_tokens or ()) == n else 0,
                           cached=sum(scores.cached_tokens) if len(scores.cached_tokens or ()) == n else None)
        return self._counted("score_choices", count)

    @property
    def sample_token_logprobs(self):  # (prompt ids, ...) -> (ids, log-prob, stopped) per prompt
        return self._counted("sample_token_logprobs", lambda args, rows: self._work.add(
            "sample", requests=len(rows), sequences=len(rows), prompt=sum(len(p) for p in args[0]), cached=None,
            completion=sum(len(ids) for ids, _, _ in rows)))

    @property
    def sequence_logprobs(self):  # (prompt ids, response ids, ...) -> one total per sequence
        return self._counted("sequence_logprobs", lambda args, totals: self._work.add(
            "prompt_logprobs", requests=len(totals), sequences=len(totals),
            prompt=sum(len(p) + len(r) for p, r in zip(args[0], args[1])), cached=0))
