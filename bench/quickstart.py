"""The CPU quickstart (`make demo`), stage by stage, against this machine's roofline.

    .venv/bin/python bench/quickstart.py [--recipe recipes/quickstart.yaml] [--output-dir /tmp/cai-bench-quickstart]
        [--from-run DIR] [--label before|after] [--out bench/results/quickstart.json]

Without --from-run: clears --output-dir (only a folder under the temp dir that is empty or holds
a cai run: never runs/), runs `cai run RECIPE output_dir=DIR` as a subprocess with its output
in a log beside the JSON, and times the whole run. Then, or with --from-run alone, reads each
stage's `done.json` ({"fingerprint", "seconds", "engine_start_seconds", "summary"}).

Per stage: `seconds` (the stage's wall time), `engine_start_seconds` (of it, starting inference
engines; null for a done.json written before cai recorded it), `work_seconds` (the difference;
null when unknown), and where the summary counts tokens, tokens/s and `roofline_fraction`: the
seconds bench/roofline.py's bound needs for the stage's work over its work seconds (its stage
seconds, engine starts included, when those are unknown: `fraction_of` says which).
- critique (phase by phase, from critique/summary.json) and sample: prefill of the prompt tokens
  the engine computed (prompt_tokens - cached_prompt_tokens) plus decode of the completion tokens,
  with every sequence of the phase in flight at once (the largest batch the work allows) at
  context = mean prompt + half the mean completion. A summary without `cached_prompt_tokens`
  leaves prefill out (a prefix cache may have served most of it), so its fraction is a lower
  bound (`prefill_counted: false`). `generate_fraction` is the same bound over the seconds the
  summary spent generating.
- label (logprob reads: prefill only), once its summary counts prompt tokens; the reads in its
  work log give the mean prompt length.
- sft, dpo: the tokens TRL counted (metrics.json `num_tokens`: non-padding tokens of every
  sequence, DPO's chosen and rejected both) over `train_seconds`; rm: blend/train.jsonl tokenised
  the way cai.train.reward does (both sides, less `truncated_tokens`) over its work seconds (rm reports
  no train_seconds, so model loading and eval scoring count against it).
- eval: phase by phase from eval/summary.json (`cai.eval_work`): greedy answers and the KL
  samples as generation (the samples' prefill left out: the engine does not say what its cache
  served), the KL reference's prompt log-probabilities as prefill with the LM head on every token,
  the judge's one-token reads and the reward model's scores as prefill. Work cai does not count
  there (the transformers KL estimate, the harness) adds seconds and no bound: the fraction is then
  a lower bound. A run written before cai counted the eval's work: time only.
- blend: time only.
Totals: wall (a timed run only), sum of stages, engine starts. With --label the result is stored
under that label, beside the labels already in the file, and a Markdown table of all labels is
printed: stage | <label> s ... | roofline fraction (of the last label).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import machine
from roofline import (DEFAULT_PATH, generation_bound_seconds, load_roofline, prefill_bound, train_flops_per_token,
                      training_fraction)

ROOT = Path(__file__).resolve().parent.parent
LABEL_ORDER = ("before", "after")


# --- running ----------------------------------------------------------------------------------

def clear_output_dir(path: Path) -> None:
    """Delete a previous benchmark run, refusing anything that is not a cai run under the temp dir."""
    path = path.resolve()
    temp = Path(tempfile.gettempdir()).resolve()
    if path == temp or temp not in path.parents:
        raise SystemExit(f"refusing to delete {path}: --output-dir must be a folder under {temp}")
    if path.exists():
        entries = list(path.iterdir())
        marked = any((e / "stage.json").exists() or (e / "done.json").exists() for e in entries if e.is_dir())
        if entries and not marked:
            raise SystemExit(f"refusing to delete {path}: it is not empty and holds no cai stage folders")
        shutil.rmtree(path)


def run_recipe(recipe: str, output_dir: Path, log: Path) -> tuple[int, float]:
    """`cai run RECIPE output_dir=DIR`, output teed to `log`: (exit status, wall seconds)."""
    cai = ROOT / ".venv" / "bin" / "cai"
    command = [str(cai) if cai.exists() else "cai", "run", recipe, f"output_dir={output_dir}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(command)}  (log: {log})", flush=True)
    began = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            sink.write(chunk)
            sink.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        status = process.wait()
    return status, time.perf_counter() - began


# --- reading a finished run -------------------------------------------------------------------

def stage_dirs(run_dir: Path) -> list[Path]:
    """Finished stage folders in pipeline order (iterations after the first, in order)."""
    from cai.recipe import STAGES

    found = [p.parent for p in list(run_dir.glob("*/done.json")) + list(run_dir.glob("iteration-*/*/done.json"))]

    def order(folder: Path):
        iteration = int(folder.parent.name.split("-")[1]) if folder.parent != run_dir else 1
        name = folder.name
        return iteration, STAGES.index(name) if name in STAGES else len(STAGES), name

    return sorted(found, key=order)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _rounded(value, digits=1):
    return None if value is None else round(value, digits)


def generation_phase(roof: dict, stats: dict, sequences_per_request: int = 1) -> dict:
    """Bound seconds for one batch of generation requests, from its token counts."""
    requests = stats.get("generated") or stats.get("rows") or stats.get("prompts")
    sequences = requests * sequences_per_request
    prompt, completion = stats.get("prompt_tokens", 0), stats.get("completion_tokens", 0)
    cached = stats.get("cached_prompt_tokens")
    mean_prompt = prompt / requests
    context = mean_prompt + completion / sequences / 2
    computed = 0 if cached is None else prompt - cached
    bound = generation_bound_seconds(roof, computed, completion, sequences, context, prefill_context=mean_prompt)
    return {"bound_seconds": bound, "prompt_tokens": prompt, "cached_prompt_tokens": cached, "computed_prompt_tokens": computed,
            "completion_tokens": completion, "batch": sequences, "context": round(context, 1), "prefill_counted": cached is not None}


def generating_stage(roof: dict, folder: Path, summary: dict) -> dict:
    phases = (_json(folder / "summary.json") or {}).get("stages") or summary.get("stages")
    if phases:  # critique: one batch per phase (initial, critique-1, revision-1, ...)
        parts = {name: generation_phase(roof, stats) for name, stats in phases.items()}
    else:
        parts = {folder.name: generation_phase(roof, summary, sequences_per_request=summary.get("k", 1))}
    keys = ("prompt_tokens", "computed_prompt_tokens", "completion_tokens")
    totals = {k: sum(p[k] for p in parts.values()) for k in keys}
    out = {**totals, "cached_prompt_tokens": None if any(p["cached_prompt_tokens"] is None for p in parts.values())
           else sum(p["cached_prompt_tokens"] for p in parts.values()),
           "prefill_counted": all(p["prefill_counted"] for p in parts.values()),
           "bound_seconds": sum(p["bound_seconds"] for p in parts.values()), "generate_seconds": summary.get("seconds"),
           "phases": {n: {k: v for k, v in p.items() if k in ("batch", "context", "completion_tokens", "computed_prompt_tokens")}
                      for n, p in parts.items()}}
    return out


def label_stage(roof: dict, folder: Path, summary: dict) -> dict:
    if "prompt_tokens" not in summary:
        return {"roofline_note": "summary counts no prompt tokens (written before cai counted them)"}
    from cai.labeling import read_masses

    log = folder / "work" / "labels.jsonl"
    reads = sum(len(read_masses(json.loads(line))) for line in log.read_text().splitlines() if line.strip()) if log.exists() else 0
    if not reads:
        return {"prompt_tokens": summary["prompt_tokens"], "roofline_note": "no work log to count the reads in"}
    cached = summary.get("cached_prompt_tokens")
    computed = summary["prompt_tokens"] - (cached or 0)
    mean_prompt = summary["prompt_tokens"] / reads
    return {"prompt_tokens": summary["prompt_tokens"], "cached_prompt_tokens": cached, "computed_prompt_tokens": computed,
            "reads": reads, "bound_seconds": computed / prefill_bound(roof, mean_prompt), "prefill_counted": True}


def eval_phase_bound(roof: dict, work: dict) -> tuple[float, bool]:
    """(bound seconds, whether every prompt's prefill was counted) for one eval phase's work."""
    bound, counted = 0.0, True
    for kind, w in work.items():
        if not w["requests"]:
            continue
        cached = w["cached_prompt_tokens"]
        counted = counted and cached is not None
        if kind in ("generate", "sample"):
            computed = 0 if cached is None else w["prompt_tokens"] - cached
            mean_prompt = w["prompt_tokens"] / w["requests"]
            context = mean_prompt + w["completion_tokens"] / max(w["sequences"], 1) / 2
            bound += generation_bound_seconds(roof, computed, w["completion_tokens"], w["sequences"], context,
                                              prefill_context=mean_prompt)
        else:  # read, prompt_logprobs, scores: prefill only
            computed = w["prompt_tokens"] - (cached or 0)
            bound += computed / prefill_bound(roof, w["prompt_tokens"] / w["requests"], lm_head=kind == "prompt_logprobs")
    return bound, counted


def eval_stage(roof: dict, folder: Path) -> dict:
    phases = (_json(folder / "summary.json") or {}).get("phases")
    if not phases:
        return {"roofline_note": "no eval/summary.json with the work of each phase (written before cai counted it): time only"}
    parts = {p["phase"]: (p["seconds"], *eval_phase_bound(roof, p["work"])) for p in phases}
    return {"bound_seconds": sum(b for _, b, _ in parts.values()),
            "prefill_counted": all(c for _, _, c in parts.values()),
            "phases": {name: {"seconds": sec, "bound_seconds": round(b, 2), "roofline_fraction": round(b / sec, 4) if sec else None}
                       for name, (sec, b, _) in parts.items()}}


def _trl_tokens(folder: Path) -> tuple[float | None, float]:
    """(tokens TRL counted over the whole training, epochs trained) from metrics.json."""
    history = (_json(folder / "metrics.json") or {}).get("log_history") or []
    last = next((h for h in reversed(history) if "num_tokens" in h), None)
    return (None, 1.0) if last is None else (last["num_tokens"], last.get("epoch") or 1.0)


def reward_tokens(run_dir: Path, model: str, truncated: int) -> int | None:
    """Tokens the reward model trained on: blend/train.jsonl as cai.train.reward tokenises it."""
    data = run_dir / "blend" / "train.jsonl"
    if not data.exists():
        return None
    from transformers import AutoTokenizer

    from cai import models
    from cai.train.reward import load_preference_file, reward_text

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(model))
    total = sum(len(tokenizer(reward_text(tokenizer, r["prompt"], side[0]["content"]), add_special_tokens=False)["input_ids"])
                for r in load_preference_file(data) for side in (r["chosen"], r["rejected"]))
    return total - truncated


def training_stage(roof: dict, run_dir: Path, folder: Path, summary: dict, work_seconds: float, model: str) -> dict:
    """Training tokens, tokens/s and roofline fraction; `fraction_of` is set only where it differs."""
    stage, extra = folder.name, {}
    if stage == "rm":
        tokens, sequences, seconds = reward_tokens(run_dir, model, summary.get("truncated_tokens", 0)), 2 * summary.get("train_rows", 0), work_seconds
    else:
        tokens, epochs = _trl_tokens(folder)
        rows = summary.get("rows") if stage == "sft" else 2 * summary.get("pairs", 0)
        sequences, seconds = (rows or 0) * epochs, summary.get("train_seconds")
        extra = {"train_seconds": seconds, "fraction_of": "train_seconds"}
    if not tokens or not sequences or not seconds:
        return {"steps": summary.get("steps"), "roofline_note": "no token count for this stage's training"}
    cost = train_flops_per_token(roof, seq_len=tokens / sequences, reference_forward=stage == "dpo", lm_head=stage != "rm")
    return {"steps": summary.get("steps"), "train_tokens": int(tokens), "mean_seq_len": round(tokens / sequences, 1), **extra,
            "train_tokens_per_s": round(tokens / seconds, 1),
            "roofline_fraction": round(training_fraction(roof, tokens, seconds, flops_per_token=cost), 4)}


def stage_report(roof: dict, run_dir: Path, folder: Path, model: str) -> dict:
    done = json.loads((folder / "done.json").read_text())
    summary = done.get("summary") or {}
    seconds = done["seconds"]
    started = done.get("engine_start_seconds")
    work = None if started is None else seconds - started
    report = {"seconds": seconds, "engine_start_seconds": started, "work_seconds": _rounded(work),
              "fraction_of": "work_seconds" if work is not None else "seconds (engine starts unknown, included)"}
    basis = work if work is not None else seconds
    stage = folder.name
    if "completion_tokens" in summary:
        gen = generating_stage(roof, folder, summary)
        report.update(gen, completion_tokens_per_s=_rounded(gen["completion_tokens"] / basis) if basis else None)
    elif stage == "label":
        report.update(label_stage(roof, folder, summary))
    elif stage in ("sft", "rm", "dpo"):
        report.update(training_stage(roof, run_dir, folder, summary, basis, model))
    elif stage == "eval":
        report.update(eval_stage(roof, folder))
    else:
        report["roofline_note"] = "no token counts in this stage's summary: time only"
    if "bound_seconds" in report:
        bound = report.pop("bound_seconds")
        report["bound_seconds"] = round(bound, 2)
        report["roofline_fraction"] = round(bound / basis, 4) if basis else None
        if report.get("generate_seconds"):
            report["generate_fraction"] = round(bound / report["generate_seconds"], 4)
    report.setdefault("roofline_fraction", None)
    return report


def read_run(run_dir: Path, roof: dict, model: str) -> dict:
    stages = {str(f.relative_to(run_dir)): stage_report(roof, run_dir, f, model) for f in stage_dirs(run_dir)}
    starts = [s["engine_start_seconds"] for s in stages.values() if s["engine_start_seconds"] is not None]
    total = sum(s["seconds"] for s in stages.values())
    return {
        "run_dir": str(run_dir),
        "stages": stages,
        "sum_of_stages_seconds": round(total, 1),
        "engine_start_seconds_total": round(sum(starts), 1) if starts else None,
        "engine_start_unknown_stages": [n for n, s in stages.items() if s["engine_start_seconds"] is None],
        "sum_excluding_engine_starts_seconds": round(total - sum(starts), 1) if starts else None,
    }


# --- storing and comparing --------------------------------------------------------------------

def store_label(out: Path, label: str, result: dict) -> dict:
    """Put `result` under `label` in the JSON at `out`, keeping the other labels; the whole file."""
    stored = _json(out) or {}
    runs = {**stored.get("runs", {}), label: {**result, "machine": machine()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return runs


def _cell(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(runs: dict) -> str:
    labels = [l for l in LABEL_ORDER if l in runs] + [l for l in runs if l not in LABEL_ORDER]
    last = runs[labels[-1]]
    names = list(dict.fromkeys(n for l in labels for n in runs[l]["stages"]))
    lines = ["| stage | " + " | ".join(f"{l} s" for l in labels) + f" | roofline fraction ({labels[-1]}) |",
             "|---" * (len(labels) + 2) + "|"]
    for name in names:
        cells = [_cell(runs[l]["stages"].get(name, {}).get("seconds")) for l in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(last['stages'].get(name, {}).get('roofline_fraction'), 3)} |")
    for key, title in (("engine_start_seconds_total", "engine starts"), ("sum_of_stages_seconds", "sum of stages"),
                       ("wall_seconds", "total wall")):
        lines.append(f"| {title} | " + " | ".join(_cell(runs[l].get(key)) for l in labels) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--output-dir", default=str(Path(tempfile.gettempdir()) / "cai-bench-quickstart"))
    parser.add_argument("--from-run", default=None, help="only read this finished run's done.json files")
    parser.add_argument("--label", default=None, help="store under this label (before, after, ...) beside the others")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the recipe's model, for the roofline")
    parser.add_argument("--roofline", default=DEFAULT_PATH)
    parser.add_argument("--out", default="bench/results/quickstart.json")
    args = parser.parse_args()

    out, label = Path(args.out), args.label or "run"
    roof = load_roofline(args.roofline, model=args.model)
    status, wall = 0, None
    if args.from_run:
        run_dir = Path(args.from_run)
    else:
        run_dir = Path(args.output_dir)
        clear_output_dir(run_dir)
        status, wall = run_recipe(args.recipe, run_dir, out.with_name(f"{out.stem}-{label}.log"))
    result = {"recipe": None if args.from_run else args.recipe, "exit_status": status,
              "wall_seconds": _rounded(wall), **read_run(run_dir, roof, args.model)}
    runs = store_label(out, label, result)
    print(json.dumps(result, indent=2))
    print(markdown_table(runs))
    raise SystemExit(status)


if __name__ == "__main__":
    main()
