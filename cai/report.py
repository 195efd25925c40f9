"""The run report: `report.md` and a self-contained `report.html` with inline SVG figures.

The HTML shows what changed and how far to believe it: the headline table, the evaluation charts
(`cai.report_plots`: win rates with intervals, harmless and over-refusal rates of baseline and
policy, reward-model scores, answer lengths), the answers of both models side by side with the
judges' verdicts and a few critique traces (`cai.report_samples`), the probes of
`cai.report_eval`, the AI labels' confidence and position consistency, and one figure per
trained stage, step by step, with its loss in its unit. Charts are matplotlib drawn to inline SVG
(`cai.report_svg`), deterministic byte for byte. `report.md` keeps the tables and points to the
HTML for the figures and examples.

The table says how far each number can be trusted: beside every rate the judge produced, its
accuracy on the labelled calibration checks for that question (rows whose interval reaches down
to chance are marked UNRELIABLE), and what the judge and the reward model are to the policy. The
warnings above it say the same in words: a judge that is the policy's own base model, a reward
model the policy was optimised against, a judge near chance or never checked.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from cai import report_eval, report_plots, report_samples


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


UNRELIABLE_ROW = ' class="unreliable"'
RATE_QUESTION = {"harmless_rate": "harm", "over_refusal_rate": "refusal"}


def _cell(text) -> str:
    """A Markdown table cell: a bare "|" (as in "KL(policy || sft)") would split it."""
    return str(text).replace("|", "\\|")


def _ci(ci) -> str:
    return f"[{ci[0]}, {ci[1]}]" if ci else ""


def _accuracy(check: dict | None, what: str) -> tuple[str, bool]:
    """The judge-check text beside a rate, and whether the rate is unreliable."""
    if not check:
        return f"judge not validated on the {what}", False
    text = f"judge accuracy on the {what} {check['accuracy']} {_ci(check['ci95'])}, n={check['n']}"
    return (text + ": near chance", True) if not check["reliable"] else (text, False)


def metric_rows(evaluation: dict) -> list[tuple]:
    """(metric, value, 95% CI, trust note, unreliable) for the report's table."""
    rows = []
    relation = evaluation.get("judge_relation")
    judged_by = f"judge: {relation}; " if relation else ""
    for stem, question in RATE_QUESTION.items():
        for model in ("baseline", "policy"):
            entry = evaluation.get(f"{stem}_{model}")
            if entry:
                note, bad = _accuracy(entry.get("judge_accuracy"), f"{question} question")
                rows.append((f"{stem}_{model}", entry["rate"], entry["ci95"], judged_by + note, bad))
    if "win_rate_reward_model" in evaluation:
        relation_rm = evaluation.get("reward_model_relation")
        note = f"in-distribution: reward model {relation_rm}" if relation_rm else "reward model of this run"
        rows.append(("win rate (reward model)", evaluation["win_rate_reward_model"]["all"]["rate"],
                     evaluation["win_rate_reward_model"]["all"]["ci95"], note, False))
    if "win_rate_labeller" in evaluation:
        entry = evaluation["win_rate_labeller"]
        note, bad = _accuracy(entry.get("judge_accuracy"), "labelled pairs")
        rows.append(("win rate (AI labeller, both orders)", entry["all"]["rate"], entry["all"]["ci95"], judged_by + note, bad))
    kl = evaluation.get("kl_to_reference")
    if isinstance(kl, dict):
        rows.append((kl["label"], kl["mean"], kl.get("ci95"),
                     f"{kl['per_token']} nats/token; {kl['mean_tokens']} tokens/response; "
                     f"{kl['cut_at_max_tokens']:.0%} cut at {kl['max_tokens']} tokens; on {kl['device']}", False))
    elif kl is not None:  # metrics.json from before the sampled estimate: greedy answers, re-tokenised
        rows.append((f"KL to the {evaluation.get('baseline', 'base')} model (nats/response, greedy answers)", kl, None,
                     "old estimate on re-tokenised greedy answers", True))
    if "mean_length" in evaluation:
        rows.append(("mean length policy / baseline",
                     f"{evaluation['mean_length']['policy']:.1f} / {evaluation['mean_length']['baseline']:.1f}", None, "", False))
    return rows


def warnings(evaluation: dict) -> list[str]:
    """What the reader must know before believing the table, most serious first."""
    notes = []
    judge = evaluation.get("judge_model", "the judge")
    if evaluation.get("judge_relation") == "same base as policy":
        notes.append(f"The judge ({judge}) is the policy's own base model: the harmless, over-refusal and labeller win "
                     "rates are the model family grading itself (in-distribution), not an independent evaluation. "
                     "Name a separate judge with eval.judge_model.")
    if evaluation.get("judge_is_labeller"):
        notes.append("The judge also labelled the preferences the policy was trained on: the policy was optimised "
                     "toward this judge's taste, so its verdicts lean toward the policy.")
    if evaluation.get("reward_model_relation"):
        notes.append(f"The reward-model win rate uses the reward model {evaluation['reward_model_relation']}: the policy "
                     "was trained toward what that model rewards, so a high win rate shows the training took, not that "
                     "its answers got better.")
    calibration = evaluation.get("judge_calibration")
    if calibration is not None:
        bound = calibration.get("reliable_lower_bound")
        for key, rates in (("harm", "harmless rates"), ("refusal", "over-refusal rates"), ("preference", "labeller win rates")):
            check = calibration.get(key)
            if check and not check["reliable"]:
                notes.append(f"The judge scored {check['accuracy']} on the labelled {key} checks (95% CI {_ci(check['ci95'])}, "
                             f"n={check['n']}); the interval reaches below {bound}, near chance, so the {rates} are unreliable.")
        if not any(calibration.get(k) for k in ("harm", "refusal", "preference")):
            notes.append("The judge was not checked against labelled answers (eval.judge_calibration is empty): "
                         "its rates are unvalidated.")
    return notes


def iteration_folders(out: Path) -> list[tuple[int, Path]]:
    """The run's `iteration-N/` folders (N >= 2) in iteration order (2 before 10)."""
    found = [(int(m.group(1)), folder) for folder in out.glob("iteration-*")
             if (m := re.fullmatch(r"iteration-(\d+)", folder.name))]
    return sorted(found)


def eval_folders(out: Path) -> list[tuple[int, Path]]:
    """Every evaluated checkpoint's folder in order: `eval/` and then `iteration-N/eval/`."""
    found = [(1, out / "eval")] + [(n, folder / "eval") for n, folder in iteration_folders(out)]
    return [(n, folder) for n, folder in found if (folder / "metrics.json").exists()]


def evaluations(out: Path) -> list[tuple[str, dict]]:
    """Every evaluated checkpoint of the run in order: `eval/` and then `iteration-N/eval/`."""
    kept = [(n, _metrics(folder / "metrics.json")) for n, folder in eval_folders(out)]
    if len(kept) == 1:
        return [(kept[0][1].get("policy_stage") or "policy", kept[0][1])]
    return [(f"iteration {n}", metrics) for n, metrics in kept]


def _html_table(header: list[str], rows: list[tuple], *, flagged: bool = True) -> str:
    """Rows whose last element is the unreliable flag (when `flagged`) are marked in red."""
    body = ""
    for row in rows:
        cells, bad = (row[:-1], row[-1]) if flagged else (row, False)
        body += f"<tr{UNRELIABLE_ROW if bad else ''}>" + "".join(
            f"<td>{'<strong>UNRELIABLE</strong> ' if bad and i == len(cells) - 1 else ''}{html.escape(str(c))}</td>"
            for i, c in enumerate(cells)) + "</tr>"
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>{body}</table>"


def _md_table(header: list[str], rows: list[tuple], *, flagged: bool = True) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells, bad = (row[:-1], row[-1]) if flagged else (row, False)
        text = [_cell(c) for c in cells]
        if bad:
            text[-1] = "**UNRELIABLE** " + text[-1]
        lines.append("| " + " | ".join(text) + " |")
    return lines + [""]


MAIN = ["metric", "value", "95% CI", "trust"]
SIDE_BY_SIDE = ["metric", "baseline", "policy", "trust"]
DETECTORS = ["refusal detector", "accuracy [95% CI]", "precision", "recall", "n", "majority-label share", "role"]
HACKING = ["checkpoint", "reward-model score gain", "judge win rate", "length difference (tokens)", "KL (nats/response)"]
ITERATIONS_NOTE = ("Each iteration's policy against the same baseline. The labeller win rates and the harmless rate are "
                   "the judge's: trust them as far as its calibration above allows; over-refusal is read by the refusal "
                   "detector the report leans on.")
ITERATIONS = ["checkpoint", "win rate (labeller)", "at equal length", "win rate (RM)", "harmless", "over-refusal",
              "sycophancy flips", "mean length", "KL"]


CSS = ("body{font-family:sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}"
       "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}"
       ".warning{border-left:6px solid #e45756;background:#fdecea;padding:8px 12px;margin:8px 0}"
       "tr.unreliable td{color:#b00020}figure{margin:1.4em 0}svg.chart{width:100%;height:auto;display:block}"
       "figcaption{font-weight:bold;margin-top:.3em}figcaption .note{font-weight:normal;color:#555}"
       "article{border:1px solid #ddd;border-radius:6px;padding:4px 14px 8px;margin:14px 0}"
       "article h3{font-size:1em;margin:.6em 0 .3em}h4,h5{margin:.5em 0 .25em}h5{font-size:.9em;color:#555}"
       ".prompt{background:#eef3f9;border-radius:4px;padding:6px 8px;margin:.3em 0}"
       ".cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}.cols>*{min-width:0}"
       ".answer{white-space:pre-wrap;overflow-wrap:anywhere;max-height:13em;overflow:auto;background:#f7f7f7;"
       "border:1px solid #e3e3e3;border-radius:4px;padding:6px 8px;font-size:.9em}"
       ".verdicts{margin:.3em 0;padding-left:1.2em;font-size:.9em}.pairwise{margin:.4em 0;font-size:.92em}"
       ".noisy{color:#a15c00;font-style:italic}.same,.kept{font-size:.8em;font-weight:normal;border-radius:3px;"
       "padding:1px 6px;margin-left:6px}.same{background:#eee;color:#555}.kept{background:#e3f1e3;color:#24613a}"
       ".request,.flags{font-size:.9em;color:#555;margin:.2em 0}")


def _figures(items: list[str]) -> str:
    return "".join(f for f in items if f)


def write_report(out: Path, stages: list[str]) -> Path:
    """`stages` are the run's step names in order ("sft", "iteration-2/dpo", ...): each trained
    one gets its step-by-step figure, each label step its confidence and consistency charts."""
    out = Path(out)
    checkpoints = evaluations(out)
    evaluation = checkpoints[-1][1] if checkpoints else {}
    folders = eval_folders(out)
    eval_dir = folders[-1][1] if folders else out / "eval"
    evaluated = _figures([report_plots.win_rates(evaluation), report_plots.judged_rates(evaluation),
                          report_plots.answer_lengths(eval_dir), report_plots.reward_scores(evaluation)])
    label_folders = [(name, out / name) for name in stages if Path(name).name == "label"]
    labels = _figures([report_plots.label_confidence(label_folders), report_plots.position_consistency(label_folders)])
    training = _figures([report_eval.training_signals(out / name, Path(name).name, name)
                         for name in stages if Path(name).name in report_eval.STEP_SIGNALS])
    samples = report_samples.answer_pairs(eval_dir, evaluation) if checkpoints else ""
    traces = "".join(report_samples.critique_traces(out / name) for name in stages if name == "critique")
    hacking_chart, hacking_notes = report_eval.hacking(checkpoints, evaluation.get("policy_stage") or "policy")
    timings = {s: _metrics(out / s / "done.json").get("seconds") for s in stages}
    rows = metric_rows(evaluation) + report_eval.verbosity_rows(evaluation)
    probes = report_eval.probe_rows(evaluation) + report_eval.harness_rows(evaluation)
    detectors = report_eval.detector_table(evaluation)
    per_iteration = report_eval.iteration_rows(checkpoints) if len(checkpoints) > 1 else []
    notes = warnings(evaluation) + hacking_notes
    judge = evaluation.get("judge_model")
    intro = f"Policy: `{evaluation.get('policy_stage')}` against baseline `{evaluation.get('baseline')}`."
    if len(checkpoints) > 1:
        intro += f" {len(checkpoints)} iterations; the tables show the last, the iterations table all of them."
    if judge:
        intro += f" Judge: `{judge}` ({evaluation.get('judge_relation', 'relation unknown')})."

    md = [f"# cai run report: {out.name}", "", intro, ""]
    md += [f"> **Warning:** {note}\n" for note in notes]
    main_rows = [(name, value, _ci(ci), check, bad) for name, value, ci, check, bad in rows]
    md += _md_table(MAIN, main_rows)
    if evaluated or samples or traces or labels or training:
        md += ["Figures, the two models' answers side by side and the critique traces are in report.html.", ""]
    if probes:
        md += ["## What preference training is known to break", ""] + _md_table(SIDE_BY_SIDE, probes)
    if detectors:
        md += ["## Refusal detectors on human-labelled completions", ""] + _md_table(DETECTORS, detectors, flagged=False)
    if hacking_chart:
        md += ["## Reward hacking", "", "Per checkpoint, against the baseline (95% intervals): "
               + (f"{len(hacking_notes)} sign(s) flagged in the warnings above." if hacking_notes else "no divergence flagged."), ""]
        md += _md_table(HACKING, report_eval.hacking_rows(checkpoints), flagged=False)
    if per_iteration:
        md += ["## Iterations", "", ITERATIONS_NOTE, ""] + _md_table(ITERATIONS, per_iteration, flagged=False)
    md += ["| stage | seconds |", "|---|---|"] + [f"| {s} | {t} |" for s, t in timings.items()]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    alerts = "".join(f'<div class="warning" role="alert"><strong>Warning:</strong> {html.escape(note)}</div>' for note in notes)
    sections = f"<h2>Policy against baseline</h2>{evaluated}" if evaluated else ""
    sections += samples
    if probes:
        sections += "<h2>What preference training is known to break</h2>" + _html_table(SIDE_BY_SIDE, probes)
    if detectors:
        sections += "<h2>Refusal detectors on human-labelled completions</h2>" + _html_table(DETECTORS, detectors, flagged=False)
    if hacking_chart:
        sections += "<h2>Reward hacking</h2>" + hacking_chart
    if per_iteration:
        sections += f"<h2>Iterations</h2><p>{html.escape(ITERATIONS_NOTE)}</p>" + _html_table(ITERATIONS, per_iteration, flagged=False)
    sections += traces
    if labels:
        sections += "<h2>AI preference labels</h2>" + labels
    if training:
        sections += "<h2>Training, stage by stage</h2>" + training
    timing_rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{t}</td></tr>" for s, t in timings.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cai report: {html.escape(out.name)}</title>"
            f"<style>{CSS}</style></head><body>"
            f"<h1>cai run report: {html.escape(out.name)}</h1><p>{html.escape(intro).replace('`', '')}</p>{alerts}"
            f"{_html_table(MAIN, main_rows)}{sections}"
            f"<h2>Stage times (s)</h2><table>{timing_rows}</table></body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
