"""Blend preference sources (human comparisons, AI labels, SL-CAI pairs) into one dataset.

    cai blend hh.jsonl.gz:0.5 runs/labels/preferences.jsonl:1 --out runs/blend

Steps, in this order, each counted in the summary:
1. Load every source through the importers (any supported format; cai's own output as is).
   A source with `skip_malformed` skips rows the importer cannot read (an empty final turn,
   transcripts that differ before the last turn: real HH-RLHF has some) instead of failing;
   the summary lists each one with its row number and reason.
2. Deduplicate identical (prompt, chosen, rejected) triples, keeping the first.
3. Resolve conflicts: the same prompt and answer pair preferred in opposite directions. A human
   label beats an AI label; between two labels of the same kind the more confident one stays.
4. Hold out an evaluation split by *prompt*, stratified by source (about the same fraction of
   every source's prompts), before any resampling: every pair of a held-out prompt goes to
   evaluation (k > 2 samples and `pairing: all` give several pairs per prompt), and a prompt held
   out in one source is held out in all, so no evaluation prompt is ever trained on.
5. Mix the training rows by weight: `SRC:0.5` keeps a seeded half of that source, `SRC:2` every
   row twice. With `by="counts"`, `SRC:300` takes exactly 300 rows (repeating rows only when the
   source has fewer).
Outputs `train.jsonl` and `eval.jsonl` (schema-checked, TRL column names) and `summary.json`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from cai import cards, schema, store
from cai.data.importers import load_preferences
from cai.errors import CaiError

AI_SOURCES = {"ai", "sl-cai"}
AI_STAGES = {"label", "critique"}


@dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float = 1.0
    skip_malformed: bool = False


def parse_source(text: str) -> SourceSpec:
    """`path[:weight]`; a path that itself contains ':' is taken whole unless the tail is a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return SourceSpec(text)
        if not math.isfinite(weight) or weight < 0:
            raise CaiError(f"weight must be a finite number >= 0, got '{tail}'", source=head)
        return SourceSpec(head, weight)
    return SourceSpec(text)


def is_ai(record: dict) -> bool:
    return record["source"] in AI_SOURCES or record.get("provenance", {}).get("stage") in AI_STAGES


def blend(
    sources: Sequence[SourceSpec],
    out_dir: str | Path,
    *,
    by: Literal["weight", "counts"] = "weight",
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    if not sources:
        raise CaiError("blend needs at least one source")
    if not 0 <= eval_fraction < 1:
        raise CaiError("must be in [0, 1)", field="eval_fraction")
    rng = random.Random(seed)
    loaded: list[tuple[SourceSpec, list[dict]]] = []
    skipped: dict[str, list[dict]] = {}
    for spec in sources:
        records, report = load_preferences(spec.path, skip_malformed=spec.skip_malformed)
        loaded.append((spec, records))
        skipped[spec.path] = report.malformed_rows

    # 2-3: dedupe and conflicts, human sources first so their rows are the ones kept.
    ordered = sorted(range(len(loaded)), key=lambda i: any(is_ai(r) for r in loaded[i][1][:1]))
    kept: dict[tuple, dict] = {}
    by_pair: dict[tuple, tuple] = {}
    stats = {spec.path: {"source": spec.path, "read": len(rows), "malformed_skipped": len(skipped[spec.path]),
                         "malformed_rows": skipped[spec.path], "duplicates": 0, "conflicts_lost": 0} for spec, rows in loaded}
    conflicts = {"human_vs_ai": 0, "same_kind": 0}
    for index in ordered:
        spec, rows = loaded[index]
        for record in rows:
            prompt = _key(record["prompt"])
            chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
            triple = (prompt, chosen, rejected)
            if triple in kept:
                stats[spec.path]["duplicates"] += 1
                continue
            opposite = (prompt, rejected, chosen)
            if opposite in kept:
                other = kept[opposite]
                winner_is_new = _beats(record, other)
                conflicts["human_vs_ai" if is_ai(record) != is_ai(other) else "same_kind"] += 1
                if not winner_is_new:
                    stats[spec.path]["conflicts_lost"] += 1
                    continue
                stats[by_pair[opposite][0]]["conflicts_lost"] += 1
                del kept[opposite]
            kept[triple] = record
            by_pair[triple] = (spec.path,)
    per_source: dict[str, list[dict]] = {spec.path: [] for spec, _ in loaded}
    for triple, record in kept.items():
        per_source[by_pair[triple][0]].append(record)

    # 4-5: evaluation split by prompt, stratified by source, then weighted training mix.
    train, evaluation = [], []
    held_out: dict[tuple, bool] = {}  # prompt -> in evaluation; decided once, for every source
    for spec, _ in loaded:
        rows = sorted(per_source[spec.path], key=lambda r: r["id"])
        prompts = sorted({_key(r["prompt"]) for r in rows})
        wanted = round(len(prompts) * eval_fraction) - sum(held_out.get(p, False) for p in prompts)
        fresh = [p for p in prompts if p not in held_out]
        rng.shuffle(fresh)
        for index, prompt in enumerate(fresh):
            held_out[prompt] = index < wanted
        held = [r for r in rows if held_out[_key(r["prompt"])]]
        rest = [r for r in rows if not held_out[_key(r["prompt"])]]
        rng.shuffle(held)
        rng.shuffle(rest)
        evaluation += held
        chosen_rows = _resample(rest, spec.weight, by, rng)
        train += chosen_rows
        stats[spec.path].update(after_dedupe=len(rows), prompts=len(prompts), eval_prompts=sum(held_out[p] for p in prompts),
                                eval=len(held), train=len(chosen_rows), weight=spec.weight)
    rng.shuffle(train)
    for name, rows in (("train", train), ("eval", evaluation)):
        for number, record in enumerate(rows, 1):
            schema.validate_record("preference", record, f"{name} row {number}")
    out_dir = Path(out_dir)
    store.write_jsonl_atomic(out_dir / "train.jsonl", train)
    store.write_jsonl_atomic(out_dir / "eval.jsonl", evaluation)
    summary = {"sources": list(stats.values()), "conflicts": conflicts, "train": len(train), "eval": len(evaluation),
               "malformed_skipped": sum(len(rows) for rows in skipped.values()),
               "by": by, "seed": seed, "eval_fraction": eval_fraction}
    store.write_json_atomic(out_dir / "summary.json", summary)
    cards.write_dataset_card(out_dir, "blend")
    return summary


def _key(messages: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def _beats(new: dict, old: dict) -> bool:
    if is_ai(new) != is_ai(old):
        return not is_ai(new)
    return new["chosen_prob"] > old["chosen_prob"]


def _resample(rows: list[dict], weight: float, by: str, rng: random.Random) -> list[dict]:
    if not rows:
        return []
    if by == "counts":
        count = int(weight)
        if count != weight:
            raise CaiError(f"with --by counts the weight must be a whole number, got {weight}")
    else:
        count = round(len(rows) * weight)
    whole, part = divmod(count, len(rows))
    return rows * whole + rng.sample(rows, part)
