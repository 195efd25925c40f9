"""RLAIF: label response pairs with a feedback model under the constitution.

    cai label --responses runs/samples/responses.jsonl --constitution constitutions/harmless.yaml \
        --model smollm2-135m-instruct --out runs/labels

Why it is written this way (see the CAI and RLAIF papers):
- Soft labels: the label is the normalised probability of "A" vs "B" at the answer position,
  not a sampled letter; soft labels trained better reward models than hard ones.
- Position bias: small labellers prefer a slot (SmolLM2-135M picked "(A)" 112 times out of 120
  in one check). Every pair is scored in both orders and the two probabilities averaged; a pair
  whose two orders disagree is flagged `position_consistent: false`, and the share of such pairs
  is reported as the position-bias rate.
- Ensembles: with `principles_per_pair > 1` each pair is judged under several sampled preference
  principles and the probabilities averaged.
- Modes: `logprob` (read A/B directly); `cot` (greedy reasoning first, then A/B read after it,
  clamped to [0.4, 0.6] because chain-of-thought labels are over-confident); `score` (d-RLAIF:
  each answer gets an expected 1-10 rating from the probability-weighted digits, rescaled to
  [-1, 1]; the pair's `chosen_prob` is 0.5 + |difference| / 4). The rating is pre-filled up to
  "Rating: [[" so the first digit follows "[[" with no space in every tokenizer, and 10 is read
  both ways a tokenizer can spell it: as a token of its own (GPT-2, Llama 3) and as "1" then "0"
  (SmolLM2, Llama 2, Qwen), so a model answering 10 is read as 10, not as 1.
- Choice mass: every read (one order, or one answer, under one principle) records how much of the
  model's next-token probability the choice tokens held (`label.mass`). A read with none at all
  carries no information: it counts as 0.5 (a neutral rating in `score` mode). A label none of
  whose reads had any mass is empty and always dropped; when more than `max_zero_mass_rate` (half)
  of the reads are empty the stage stops with an error, because such a labeller is not answering
  with the choices (wrong template prefix, wrong answer format) and its labels are coin flips.
- Ties: a pair whose reads average to exactly 0.5 says neither answer is better, so it is dropped
  from `preferences.jsonl` (counted in the summary) unless `keep_ties`; kept, it trains as
  chosen_prob 0.5, which soft-label DPO and the reward model read as "no preference".

- Prefix cache: the template puts the conversation first, then the principle, then the answers,
  so all requests of a pair share the conversation and both orders under one principle share the
  principle too. The summary reports the prompt tokens sent and how many the engine's prefix
  cache served. (vLLM caches whole blocks, 128 tokens by default on a CPU: longer than the
  ~60-80 tokens those requests share, so on a CPU nothing is served unless the block is smaller.)

TRL has no AI labeller (its judges were removed in 1.1), hence this module. Work is chunked and
logged durably like every generating stage, so a killed labelling run resumes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from cai import __version__, cards, schema, store
from cai.constitution import Constitution
from cai.durable import cached_share, request_seed
from cai.engines.base import ChatPrompt, Engine, SamplingSettings
from cai.errors import CaiError
from cai.progress import StageProgress
from cai.prompts import PromptSet

Mode = Literal["logprob", "cot", "score"]
DIGITS = [str(d) for d in range(1, 10)]
RATINGS = [*DIGITS, "10"]


@dataclass(frozen=True)
class LabelSettings:
    mode: Mode = "logprob"
    principles_per_pair: int = 1
    swap: bool = True
    seed: int = 0
    min_confidence: float = 0.5  # drop pairs whose chosen_prob is below this
    pairing: Literal["adjacent", "all"] = "adjacent"
    cot_max_tokens: int = 128
    cot_clamp: tuple[float, float] = (0.4, 0.6)
    chunk_size: int = 64
    keep_ties: bool = False  # keep pairs labelled exactly 0.5 (as chosen_prob 0.5) instead of dropping them
    max_zero_mass_rate: float = 0.5  # stop when more of the reads than this put no probability on the choices

    def __post_init__(self) -> None:
        if self.mode not in ("logprob", "cot", "score"):
            raise CaiError(f"unknown mode '{self.mode}' (logprob, cot or score)", field="label.mode")
        if self.principles_per_pair < 1:
            raise CaiError("must be >= 1", field="label.principles_per_pair")
        if not 0.5 <= self.min_confidence < 1:
            raise CaiError("must be in [0.5, 1)", field="label.min_confidence")
        if self.pairing not in ("adjacent", "all"):
            raise CaiError("must be adjacent or all", field="label.pairing")
        if not 0 <= self.max_zero_mass_rate <= 1:
            raise CaiError("must be in [0, 1]", field="label.max_zero_mass_rate")


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: tuple[dict, ...]
    a: str
    b: str


def pairs_from_responses(rows: Sequence[dict], pairing: str = "adjacent") -> list[Pair]:
    """Rows of `responses.jsonl` -> pairs of distinct responses to the same prompt."""
    pairs = []
    for row in rows:
        responses = row["responses"]
        if pairing == "all":
            combos = itertools.combinations(range(len(responses)), 2)
        else:
            combos = ((i, i + 1) for i in range(0, len(responses) - 1, 2))
        for i, j in combos:
            a, b = responses[i], responses[j]
            if not a.strip() or not b.strip() or a.strip() == b.strip():
                continue  # nothing to compare
            pairs.append(Pair(store.stable_id(row["prompt"], a, b), tuple(row["prompt"]), a, b))
    return pairs


def pairs_from_preferences(records: Sequence[dict]) -> list[Pair]:
    """Existing preference records -> pairs with a = chosen, b = rejected."""
    return [
        Pair(r["id"], tuple(r["prompt"]), r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records
    ]


class LabelRun:
    def __init__(
        self,
        engine: Engine,
        constitution: Constitution,
        pairs: Sequence[Pair],
        templates: PromptSet,
        out_dir: str | Path,
        settings: LabelSettings = LabelSettings(),
        *,
        overwrite: bool = False,
        show_progress: bool = True,
    ):
        self.engine = engine
        self.constitution = constitution
        self.pairs = list(pairs)
        self.templates = templates
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.overwrite = overwrite
        self.show_progress = show_progress
        sampler = constitution.sampler(settings.seed)
        self.principles = {p.id: sampler.preferences(p.id, settings.principles_per_pair) for p in self.pairs}
        template = {"logprob": "preference", "cot": "preference_cot", "score": "score"}[settings.mode]
        self.template_name = template
        self._ten_is_a_choice: bool | None = None  # score mode: can the engine read "10" beside "1"?
        # Prompt tokens this run sent, and how many of them the engine's prefix cache served.
        self.tokens = {"prompt_tokens": 0, "cached_prompt_tokens": 0}

    def fingerprint(self) -> dict:
        s = self.settings
        return {
            "stage": "label",
            "model": self.engine.model,
            "engine": self.engine.name,
            "constitution_hash": self.constitution.hash,
            "template_hash": self.templates.hash(self.template_name),
            "mode": s.mode,
            "principles_per_pair": s.principles_per_pair,
            "swap": s.swap,
            "seed": s.seed,
            "cot_max_tokens": s.cot_max_tokens if s.mode == "cot" else None,
            "cot_clamp": list(s.cot_clamp) if s.mode == "cot" else None,
        }

    # -- requests -------------------------------------------------------------------------------------
    def _comparison(self, pair: Pair, principle_text: str, first: str, second: str):
        return self.templates.render(
            self.template_name, conversation=list(pair.prompt), principle=principle_text, response_a=first, response_b=second
        )

    def _orders(self) -> list[str]:
        return ["ab", "ba"] if self.settings.swap else ["ab"]

    def _score_chunk(self, chunk: list[Pair]) -> list[dict]:
        if self.settings.mode == "score":
            return self._rate_chunk(chunk)
        keys, requests = [], []
        for pair in chunk:
            for index, principle in enumerate(self.principles[pair.id]):
                for order in self._orders():
                    first, second = (pair.a, pair.b) if order == "ab" else (pair.b, pair.a)
                    turn = self._comparison(pair, principle.text, first, second)
                    keys.append((pair.id, index, order))
                    requests.append((turn, ChatPrompt.of([{"role": "user", "content": turn.content}], turn.assistant_prefix)))
        reasoning: list[str] = []
        if self.settings.mode == "cot":
            greedy = SamplingSettings(temperature=0.0, max_tokens=self.settings.cot_max_tokens, stop=("Therefore",))
            seeds = [request_seed(*key) for key in keys]
            generations = self.engine.generate([r for _, r in requests], greedy, seeds=seeds)
            self._count(prompt=sum(g.prompt_tokens for g in generations), cached=sum(g.cached_tokens for g in generations))
            reasoning = [g.texts[0].rstrip() for g in generations]
            requests = [
                (turn, ChatPrompt(request.messages, turn.assistant_prefix + thought + turn.answer_prefix))
                for (turn, request), thought in zip(requests, reasoning)
            ]
        scores = self._counted(self.engine.score_choices([r for _, r in requests], ["A", "B"]))
        rows: dict[str, dict] = {}
        for p in chunk:
            k = len(self.principles[p.id])
            rows[p.id] = {"id": p.id, "ab": [None] * k, "ba": [None] * k, "mass": {o: [None] * k for o in self._orders()}}
        for position, ((pair_id, index, order), probs, mass) in enumerate(zip(keys, scores.probs, scores.mass)):
            # Stored as P(first-listed answer of the pair, `a`, is better) in both orders.
            p_a = probs[0] if order == "ab" else probs[1]
            if self.settings.mode == "cot":
                low, high = self.settings.cot_clamp
                p_a = min(max(p_a, low), high)
            rows[pair_id][order][index] = p_a
            rows[pair_id]["mass"][order][index] = mass
            if reasoning:
                rows[pair_id].setdefault("reasoning", {}).setdefault(order, []).append(reasoning[position])
        return list(rows.values())

    def _rate_chunk(self, chunk: list[Pair]) -> list[dict]:
        """d-RLAIF: expected 1-10 rating per answer, one request per (answer, principle)."""
        keys, requests = [], []
        for pair in chunk:
            for index, principle in enumerate(self.principles[pair.id]):
                for which, answer in (("a", pair.a), ("b", pair.b)):
                    turn = self.templates.render("score", conversation=list(pair.prompt), principle=principle.text, response=answer)
                    keys.append((pair.id, index, which))
                    requests.append(ChatPrompt.of([{"role": "user", "content": turn.content}], turn.assistant_prefix))
        first = self._score_ratings(requests)
        # Where "10" is spelled "1" then "0", P(10) includes P("1") * P("0" | "1"), read in a second step.
        after_one = self._counted(
            self.engine.score_choices([ChatPrompt(r.messages, r.assistant_prefix + "1") for r in requests], ["0"])
        )
        rows = {}
        for p in chunk:
            k = len(self.principles[p.id])
            rows[p.id] = {"id": p.id, "a": [None] * k, "b": [None] * k, "mass": {"a": [None] * k, "b": [None] * k}}
        for (pair_id, index, which), probs, mass, zero in zip(keys, first.probs, first.mass, after_one.mass):
            # A read with no mass on any rating says nothing: the scale's midpoint, 0.
            rows[pair_id][which][index] = expected_rating(probs, zero) if mass > 0 else 0.0
            rows[pair_id]["mass"][which][index] = mass
        return list(rows.values())

    def _score_ratings(self, requests: list[ChatPrompt]):
        """Probabilities of the ratings 1..10 at the first digit, or of 1..9 where the engine
        cannot tell "10" from "1" there (a digit-by-digit tokenizer: both start with the token
        "1"; the engine refuses such choices). Decided on the first chunk, then reused."""
        if self._ten_is_a_choice is not False:
            try:
                scores = self._counted(self.engine.score_choices(requests, RATINGS))
                self._ten_is_a_choice = True
                return scores
            except CaiError:
                if self._ten_is_a_choice:  # it worked before: a real error
                    raise
                self._ten_is_a_choice = False
        return self._counted(self.engine.score_choices(requests, DIGITS))

    def _count(self, *, prompt: int, cached: int) -> None:
        self.tokens["prompt_tokens"] += prompt
        self.tokens["cached_prompt_tokens"] += cached

    def _counted(self, scores):
        self._count(prompt=sum(scores.prompt_tokens), cached=sum(scores.cached_tokens))
        return scores

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        with store.RunLock(self.out_dir):
            return self._run()

    def _run(self) -> dict:
        resumed = store.prepare_run_dir(self.out_dir, self.fingerprint(), overwrite=self.overwrite)
        worklog = store.WorkLog(self.out_dir / "work" / "labels.jsonl")
        done = worklog.read()
        todo = [p for p in self.pairs if p.id not in done]
        with StageProgress(f"label/{self.settings.mode}", total=len(self.pairs), completed=len(self.pairs) - len(todo), enabled=self.show_progress) as bar:
            for start in range(0, len(todo), self.settings.chunk_size):
                chunk = todo[start : start + self.settings.chunk_size]
                rows = self._score_chunk(chunk)
                worklog.append(rows)
                done.update({row["id"]: row for row in rows})
                bar.advance(len(chunk), 0)
                self._check_choice_mass(done.values())
        return self._write_outputs(done, resumed)

    def _check_choice_mass(self, rows) -> None:
        """Stop when more than `max_zero_mass_rate` of the reads put no probability on the choices."""
        masses = [m for row in rows for m in read_masses(row)]
        empty = sum(m == 0 for m in masses)
        if masses and empty / len(masses) > self.settings.max_zero_mass_rate:
            choices = "the ratings 1-10" if self.settings.mode == "score" else "(A) and (B)"
            raise CaiError(
                f"the labeller '{self.engine.model}' put no probability on {choices} in {empty} of {len(masses)} reads "
                f"(more than max_zero_mass_rate {self.settings.max_zero_mass_rate:.0%}), so its labels would be coin flips: "
                f"check that prompts/{self.template_name}.jinja's assistant prefix ends right before the answer and "
                "that the model answers in that form",
                source=str(self.out_dir),
            )

    def label(self, pair: Pair, raw: dict) -> dict:
        """One pair's record (before the confidence filter)."""
        principle_ids = [p.id for p in self.principles[pair.id]]
        if self.settings.mode == "score":
            rating_a = sum(raw["a"]) / len(raw["a"])
            rating_b = sum(raw["b"]) / len(raw["b"])
            p_a = min(1.0, max(0.0, 0.5 + (rating_a - rating_b) / 4))
            consistent, order_probs = None, None
            details = {"mode": "score", "rating_a": rating_a, "rating_b": rating_b}
        else:
            p_ab = sum(raw["ab"]) / len(raw["ab"])
            if self.settings.swap:
                p_ba = sum(raw["ba"]) / len(raw["ba"])
                p_a = (p_ab + p_ba) / 2
                consistent = (p_ab > 0.5) == (p_ba > 0.5) and p_ab != 0.5 and p_ba != 0.5
            else:
                p_a, consistent = p_ab, None
            order_probs = {"ab": raw["ab"], **({"ba": raw["ba"]} if self.settings.swap else {})}
            details = {"mode": self.settings.mode}
        details["mass"] = raw["mass"]  # per order (or answer), per principle: P(choice tokens) before normalising
        chosen, rejected = (pair.a, pair.b) if p_a >= 0.5 else (pair.b, pair.a)
        record = {
            "id": pair.id,
            "prompt": [dict(m) for m in pair.prompt],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "chosen_prob": max(p_a, 1 - p_a),
            "source": "ai",
            "principle_ids": principle_ids,
            "position_consistent": consistent,
            "label": {**details, "p_a": p_a},
            "provenance": {"stage": "label", "cai_version": __version__, **self.fingerprint(), "constitution": self.constitution.name},
        }
        if order_probs is not None:
            record["order_probs"] = order_probs
        return record

    def records(self) -> list[dict]:
        """All labelled records of a finished run (before the confidence filter)."""
        done = store.WorkLog(self.out_dir / "work" / "labels.jsonl").read()
        return [self.label(pair, done[pair.id]) for pair in self.pairs]

    def judge(self) -> list[dict]:
        """Every pair's record, scored now and kept in memory (no work log, no files): online
        DPO's judge (cai/train/online_dpo.py). Pair ids must be distinct."""
        raws = {row["id"]: row for row in self._score_chunk(self.pairs)}
        self._check_choice_mass(raws.values())
        return [self.label(pair, raws[pair.id]) for pair in self.pairs]

    def _write_outputs(self, done: dict, resumed: bool) -> dict:
        self._check_choice_mass(done[pair.id] for pair in self.pairs)
        records = [self.label(pair, done[pair.id]) for pair in self.pairs]
        empty = [is_empty(r) for r in records]
        ties = [r["label"]["p_a"] == 0.5 and not e for r, e in zip(records, empty)]
        low = [r["chosen_prob"] < self.settings.min_confidence and not e and not t for r, e, t in zip(records, empty, ties)]
        kept = [r for r, e, t, lo in zip(records, empty, ties, low) if not (e or lo or (t and not self.settings.keep_ties))]
        for index, record in enumerate(kept):
            schema.validate_record("preference", record, f"{self.out_dir}/preferences row {index + 1}")
        store.write_jsonl_atomic(self.out_dir / "preferences.jsonl", kept)
        summary = {
            "pairs": len(records),
            "kept": len(kept),
            "zero_mass_labels": sum(empty),  # no read had any mass on the choices: always dropped
            "zero_mass_reads": sum(m == 0 for r in records for m in read_masses(r["label"])),
            "ties": sum(ties),
            "dropped_ties": 0 if self.settings.keep_ties else sum(ties),
            "dropped_low_confidence": sum(low),
            **position_stats(records),
            "mean_chosen_prob": round(sum(r["chosen_prob"] for r in records) / len(records), 4) if records else None,
            "resumed": resumed,
            # What this run sent (a resumed run: only the rest); engines without a prefix cache report 0 cached.
            **self.tokens,
            "cached_prompt_share": cached_share(self.tokens["cached_prompt_tokens"], self.tokens["prompt_tokens"]),
        }
        store.write_json_atomic(self.out_dir / "summary.json", summary)
        cards.write_dataset_card(self.out_dir, "label", self.constitution)
        return summary


def read_masses(raw: dict) -> list[float]:
    """Every read's choice mass, from a work-log row or a record's `label` (a flat list in work
    logs written before masses were kept per order)."""
    masses = raw["mass"]
    return [m for group in masses.values() for m in group] if isinstance(masses, dict) else list(masses)


def is_empty(record: dict) -> bool:
    """No read of this label put any probability on the choices: it is the engine's 0.5 fallback."""
    return all(m == 0 for m in read_masses(record["label"]))


def expected_rating(rating_probs: Sequence[float], p_zero_after_one: float) -> float:
    """Probabilities over "1".."9", or "1".."10" where "10" is a token of its own, plus the chance
    that "1" continues as "10" -> the expected rating rescaled to [-1, 1]."""
    probs = dict(zip(range(1, 11), rating_probs))
    probs[10] = probs.get(10, 0.0) + probs[1] * p_zero_after_one
    probs[1] = probs[1] * (1 - p_zero_after_one)
    expected = sum(score * p for score, p in probs.items())
    return (expected - 5.5) / 4.5


def position_stats(records: Sequence[dict]) -> dict:
    """Position-bias rate: the share of two-order pairs whose preferred *slot* survived the swap."""
    judged = [r for r in records if r.get("position_consistent") is not None]
    if not judged:
        return {"position_bias_rate": None, "position_consistent_rate": None}
    inconsistent = sum(not r["position_consistent"] for r in judged)
    return {
        "position_bias_rate": round(inconsistent / len(judged), 4),
        "position_consistent_rate": round(1 - inconsistent / len(judged), 4),
    }


def human_eval_pairs(records: Sequence[dict], seed: int = 0) -> tuple[list[Pair], dict[str, bool]]:
    """Human-labelled records -> pairs with the human's choice shown first at random.

    Randomising which answer is listed first keeps "always pick (A)" at chance in the
    single-order score, so that number measures the labeller rather than the file's layout.
    Returns the pairs and, per pair id, whether the human-preferred answer is `a`.
    """
    import random

    rng = random.Random(seed)
    pairs, human_first = [], {}
    for record in records:
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        first = rng.random() < 0.5
        a, b = (chosen, rejected) if first else (rejected, chosen)
        pair = Pair(store.stable_id(record["id"], first), tuple(record["prompt"]), a, b)
        pairs.append(pair)
        human_first[pair.id] = first
    return pairs, human_first


def agreement_with_humans(records: Sequence[dict], human_first: dict[str, bool]) -> dict:
    """Agreement of AI labels with human choices: swap-averaged, and from the first order alone.

    A probability of exactly 0.5 is a tie and earns half credit.
    """

    def credit(p_a: float, first: bool) -> float:
        if p_a == 0.5:
            return 0.5
        return float((p_a > 0.5) == first)

    averaged = [credit(r["label"]["p_a"], human_first[r["id"]]) for r in records]
    result = {
        "pairs": len(records),
        "agreement_swap_averaged": round(sum(averaged) / len(records), 4) if records else None,
        **position_stats(records),
    }
    single = [
        credit(sum(r["order_probs"]["ab"]) / len(r["order_probs"]["ab"]), human_first[r["id"]])
        for r in records
        if "order_probs" in r
    ]
    result["agreement_single_order"] = round(sum(single) / len(single), 4) if single else None
    result["mean_confidence"] = round(sum(r["chosen_prob"] for r in records) / len(records), 4) if records else None
    return result
