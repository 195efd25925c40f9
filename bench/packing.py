"""Packed vs padded training rows (cai/train/packing.py) on a finished quickstart run's data.

    .venv/bin/python bench/packing.py [--run /tmp/cai-bench-quickstart] [--recipe recipes/quickstart.yaml]
        [--stages rm dpo] [--repeats 1] [--out bench/results/packing.json]

Trains the recipe's reward model and DPO policy on the run's blend (DPO from the run's SFT
adapter), once with packing and once with it switched off, each in its own process and taking
turns at going first, so both see the same host. Reports per stage: seconds of the training
call, train loss (equal to float rounding when dropout is off; with LoRA dropout on, the masks
are drawn for another shape, so losses differ as two seeds do), and how many rows the packed
forwards saw against the padded ones. Why this exists: on a shared 2-core host a whole
quickstart run wanders by more than packing saves, so the effect is measured here, back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_results


def _child(stage: str, mode: str, run: Path, recipe_path: str, out_dir: str) -> None:
    """One training call in this process; prints one JSON line."""
    from cai.recipe import load_recipe
    from cai.train import packing

    if mode == "padded":
        packing.install = lambda model: False
        packing.sequence_scores = lambda model, ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    recipe = load_recipe(recipe_path)
    started = time.perf_counter()
    if stage == "rm":
        from cai.train.reward import train_reward_model

        settings = dataclasses.replace(recipe.rm.settings, threads=recipe.threads, seed=recipe.seed)
        metrics = train_reward_model(run / "blend" / "train.jsonl", recipe.rm.model or recipe.model, out_dir, settings)
    else:
        from cai.train.policy import train_dpo

        train = dataclasses.replace(recipe.dpo.settings.train, threads=recipe.threads, seed=recipe.seed)
        settings = dataclasses.replace(recipe.dpo.settings, train=train)
        metrics = train_dpo(run / "blend", recipe.model, out_dir, settings, sft_adapter=str(run / "sft" / "adapter"))
    seconds = time.perf_counter() - started
    print("RESULT " + json.dumps({"seconds": round(seconds, 2), "train_loss": metrics.get("train_loss"),
                                  "rows_in": packing.STATS["rows_in"], "rows_out": packing.STATS["rows_out"],
                                  "packed_calls": packing.STATS["packed_calls"]}), flush=True)


def _measure(stage: str, mode: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        done = subprocess.run([sys.executable, __file__, "--child", stage, mode, "--run", args.run, "--recipe", args.recipe,
                               "--child-out", out_dir], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{stage} ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(Path(tempfile.gettempdir()) / "cai-bench-quickstart"))
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--stages", nargs="+", default=["rm", "dpo"], choices=["rm", "dpo"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="bench/results/packing.json")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], Path(args.run), args.recipe, args.child_out)
        return
    if not (Path(args.run) / "blend" / "train.jsonl").exists():
        raise SystemExit(f"{args.run} has no blend/train.jsonl: run bench/quickstart.py (or cai run) first")
    results: dict = {"run": args.run, "recipe": args.recipe, "stages": {}}
    for stage in args.stages:
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for repeat in range(args.repeats):
            order = ("padded", "packed") if repeat % 2 == 0 else ("packed", "padded")
            for mode in order:
                runs[mode].append(_measure(stage, mode, args))
                print(f"{stage} {mode}: {runs[mode][-1]}", flush=True)
        padded = sum(r["seconds"] for r in runs["padded"]) / args.repeats
        packed = sum(r["seconds"] for r in runs["packed"]) / args.repeats
        results["stages"][stage] = {"runs": runs, "padded_seconds": round(padded, 2), "packed_seconds": round(packed, 2),
                                    "packed_over_padded": round(packed / padded, 3)}
    write_results(args.out, results)
    print(json.dumps({s: {k: v for k, v in r.items() if k != "runs"} for s, r in results["stages"].items()}, indent=2))


if __name__ == "__main__":
    main()
