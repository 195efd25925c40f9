"""The engine interface every generation and AI-labelling call goes through.

Two operations, both over whole batches (the engines batch and schedule internally):
- `generate(prompts, sampling)`: n completions per chat prompt, with token counts;
- `score_choices(prompts, choices)`: the normalised probabilities of candidate continuations
  (e.g. "A"/"B", or the digits of a rating) at the next-token position, read from log-
  probabilities in one step. This is how soft AI-preference labels are made.

A `ChatPrompt` is chat messages plus an optional pre-filled start of the reply. Engines render
it with the model's own chat template (`cai.chat.render`), so the hf, vLLM and OpenAI engines
send the model the same text; identical prefixes (system prompt, few-shot) are what make
vLLM's automatic prefix caching pay off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from cai.errors import CaiError


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[dict, ...]
    assistant_prefix: str = ""

    @classmethod
    def of(cls, messages: Sequence[dict], assistant_prefix: str = "") -> "ChatPrompt":
        return cls(tuple({"role": m["role"], "content": m["content"]} for m in messages), assistant_prefix)


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise CaiError("n must be >= 1", field="sampling.n")
        if self.temperature < 0:
            raise CaiError("temperature must be >= 0", field="sampling.temperature")
        if not 0 < self.top_p <= 1:
            raise CaiError("top_p must be in (0, 1]", field="sampling.top_p")
        if self.max_tokens < 1:
            raise CaiError("max_tokens must be >= 1", field="sampling.max_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """The n completions of one prompt."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: list[int]
    finish_reasons: list[str] = field(default_factory=list)  # "stop" or "length" per text
    cached_tokens: int = 0  # of prompt_tokens, how many the engine served from its prefix cache


@dataclass
class ChoiceScores:
    """Per prompt: probabilities over the choices (summing to 1), and the share of the model's
    whole next-token distribution the choices held (low mass: the model wanted to say
    something else, so the label is less trustworthy)."""

    probs: list[list[float]]
    mass: list[float]
    prompt_tokens: list[int] = field(default_factory=list)  # per prompt, where the engine reports them
    cached_tokens: list[int] = field(default_factory=list)  # per prompt: of those, served from the prefix cache


class Engine(Protocol):
    name: str
    model: str

    def generate(
        self,
        prompts: Sequence[ChatPrompt],
        sampling: SamplingSettings,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        """`seeds` (one per prompt) make each prompt's samples independent of batching, so a
        resumed run regenerates exactly what an uninterrupted one would have."""
        ...

    def score_choices(
        self, prompts: Sequence[ChatPrompt], choices: Sequence[str], adapter: str | None = None
    ) -> ChoiceScores: ...

    def close(self) -> None: ...


def normalise(logprobs: Sequence[float]) -> tuple[list[float], float]:
    """Log-probabilities of the choices -> (probabilities summing to 1, total mass)."""
    finite = [lp for lp in logprobs if lp != -math.inf]
    if not finite:
        return [1.0 / len(logprobs)] * len(logprobs), 0.0
    top = max(finite)
    weights = [math.exp(lp - top) if lp != -math.inf else 0.0 for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights], total * math.exp(top)


def choice_token_ids(tokenizer, context: str, choices: Sequence[str]) -> list[int]:
    """The token each choice starts with when it follows `context`.

    Found by tokenising context+choice rather than the choice alone, because tokenizers merge
    across the boundary differently (SentencePiece adds "▁", BPE may fold "(A" into one token).
    The first tokens must differ, or the choices cannot be told apart in one step.
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = []
    for choice in choices:
        full = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            # The choice merged into the context's last token; fall back to its standalone first token.
            alone = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids.append(alone[0])
        else:
            ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        raise CaiError(
            f"choices {list(choices)} share a first token for this tokenizer; use choices that differ in their first token"
        )
    return ids


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
