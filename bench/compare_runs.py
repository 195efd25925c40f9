"""How far apart two finished runs of the same recipe are, stage by stage: did a change that should
only make cai faster leave its outputs alone?

    .venv/bin/python bench/compare_runs.py RUN_A RUN_B [--out bench/results/compare.json]

Per text-producing step, the share of rows whose text is byte-identical and, for the first rows
that differ, the character where they part (a sampled token that flipped on a near-tie shows as a
late split): critique (initial answers, then each round's critique and revision, matched by row
id), sample (each response), eval (both models' greedy answers). Per score-producing step, the
largest absolute difference over the rows both runs have with the same inputs: label (each
pair's chosen_prob, pairs matched by id, which hashes the two answers), the eval's KL samples
(log-probabilities of identical token ids), the training stages' final train loss. Nothing here
knows what changed between the runs; it only reads their folders.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from results_io import write_results


def _rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["id"]: row for row in rows}


def texts(pairs: list[tuple[str, str]]) -> dict:
    """Share of identical texts, and where the first few differing ones split (character index)."""
    differing = [(a, b) for a, b in pairs if a != b]
    return {"rows": len(pairs), "identical": len(pairs) - len(differing),
            "identical_share": round(1 - len(differing) / len(pairs), 4) if pairs else None,
            "first_split_chars": [len(os.path.commonprefix([a, b])) for a, b in differing[:5]]}


def critique(a: Path, b: Path) -> dict:
    left, right = _rows(a / "critique" / "trace.jsonl"), _rows(b / "critique" / "trace.jsonl")
    shared = sorted(set(left) & set(right))
    steps: dict[str, list[tuple[str, str]]] = {"initial": [(left[i]["initial"], right[i]["initial"]) for i in shared]}
    for i in shared:
        for ra, rb in zip(left[i]["rounds"], right[i]["rounds"]):
            for part in ("critique", "revision"):
                steps.setdefault(f"{part}-{ra['round']}", []).append((ra[part], rb[part]))
    return {step: texts(pairs) for step, pairs in steps.items()}


def sample(a: Path, b: Path) -> dict:
    """Matched by prompt id: a sampled row's id (and its requests' seeds) hash the adapter's path,
    so runs in different folders sample differently; compare runs made in the same folder."""
    left, right = ({r["prompt_id"]: r for r in _rows(run / "sample" / "responses.jsonl").values()} for run in (a, b))
    return texts([(x, y) for i in sorted(set(left) & set(right)) for x, y in zip(left[i]["responses"], right[i]["responses"])])


def _pair_key(row: dict) -> str:
    return json.dumps([row["prompt"], sorted(json.dumps(row[side]) for side in ("chosen", "rejected"))])


def label(a: Path, b: Path) -> dict:
    """Pairs matched by their prompt and two answers (either order); chosen_prob compared as the
    probability of the same answer."""
    left, right = ({_pair_key(r): r for r in _rows(run / "label" / "preferences.jsonl").values()} for run in (a, b))
    shared = sorted(set(left) & set(right))
    gaps = [abs(left[k]["chosen_prob"] - (right[k]["chosen_prob"] if right[k]["chosen"] == left[k]["chosen"]
                                          else 1 - right[k]["chosen_prob"])) for k in shared]
    return {"pairs": [len(left), len(right)], "same_pairs": len(shared), "max_abs_chosen_prob_difference": max(gaps, default=None)}


def evaluation(a: Path, b: Path) -> dict:
    left, right = _rows(a / "eval" / "responses.jsonl"), _rows(b / "eval" / "responses.jsonl")
    shared = sorted(set(left) & set(right))
    out = {model: texts([(left[i][model], right[i][model]) for i in shared]) for model in ("policy", "baseline")}
    try:
        ka, kb = (json.loads((run / "eval" / "kl_samples.json").read_text())["rows"] for run in (a, b))
    except (OSError, KeyError, json.JSONDecodeError):
        return out
    same = [(x, y) for x, y in zip(ka, kb) if x["token_ids"] == y["token_ids"]]
    out["kl_samples"] = {"rows": len(ka), "same_token_ids": len(same), "max_abs_logprob_difference": max(
        (abs(x[k] - y[k]) for x, y in same for k in ("policy_logprob", "reference_logprob")), default=None)}
    return out


def train_loss(run: Path, stage: str) -> float | None:
    try:
        return json.loads((run / stage / "metrics.json").read_text()).get("train_loss")
    except (OSError, json.JSONDecodeError):
        return None


def compare(a: Path, b: Path) -> dict:
    result = {"runs": [str(a), str(b)], "critique": critique(a, b), "sample": sample(a, b), "label": label(a, b),
              "eval": evaluation(a, b)}
    result["train_loss"] = {stage: [train_loss(a, stage), train_loss(b, stage)] for stage in ("sft", "rm", "dpo")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", default="bench/results/compare.json")
    args = parser.parse_args()
    result = compare(args.run_a, args.run_b)
    write_results(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
