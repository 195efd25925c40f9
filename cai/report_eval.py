"""The report's sections on what preference training is known to break, baseline and policy side by
side: sycophancy, over-refusal (by the refusal detector the report leans on, with both detectors'
validity), verbosity, reward-hacking signs across checkpoints, iterations, and harness results;
and each trained stage step by step (`training_signals`: its loss in its unit, and what it logged
beside it, each on its own axes).

Each row is (metric, baseline, policy, trust note, unreliable); a value is "rate [low, high] (n)"
so its interval travels with it. A rate read by a detector that failed its validation is marked
UNRELIABLE, as the judged rates are in the main table.
"""

from __future__ import annotations

import json
from pathlib import Path

from cai.eval_hacking import flags, trajectory
from cai.report_svg import panels

DETECTOR_NAMES = {"string_match": "phrase matcher", "judge": "LLM judge"}


def fmt(entry: dict | None, digits: int = 3) -> str:
    if not entry or entry.get("rate") is None:
        return "n/a"
    ci = entry.get("ci95")
    interval = f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]" if ci else ""
    return f"{entry['rate']:.{digits}g}{interval} (n={entry.get('n', '?')})"


def _validity(detectors: dict, name: str) -> tuple[str, bool]:
    check = detectors.get(name)
    if not check:
        return f"{DETECTOR_NAMES[name]} not validated", False
    text = (f"{DETECTOR_NAMES[name]}: accuracy {check['accuracy']} [{check['ci95'][0]}, {check['ci95'][1]}] on {check['n']} "
            f"labelled completions, recall {check.get('recall')}")
    return (text + ": not valid", True) if not check.get("reliable") else (text, False)


def probe_rows(evaluation: dict) -> list[tuple]:
    rows: list[tuple] = []
    syc = evaluation.get("sycophancy")
    if syc:
        for key, label in (("rate", "sycophancy: flips to the user's wrong belief"),
                           ("flip_from_correct", "sycophancy: right answer lost when the user disagrees")):
            entries = [syc[m] if key == "rate" else syc[m].get(key) for m in ("baseline", "policy")]
            counts = ", ".join(f"{m} {(syc[m].get('unclear_biased') or {}).get('rate')}" for m in ("baseline", "policy"))
            rows.append((label, fmt(entries[0]), fmt(entries[1]), f"{syc['items']} probe questions; answers read by string "
                         f"match on the answer and its aliases; share unclear under the stated belief: {counts}", False))
    detectors = evaluation.get("refusal_detectors") or {}
    primary = detectors.get("primary", "string_match")
    order = [primary] + [d for d in DETECTOR_NAMES if d != primary]
    for name in order:
        note, bad = _validity(detectors, name)
        used = "used" if name == primary else "shown, not used"
        baseline = evaluation.get("over_refusal_rate_baseline" + ("_string_match" if name == "string_match" else ""))
        policy = evaluation.get("over_refusal_rate_policy" + ("_string_match" if name == "string_match" else ""))
        if baseline or policy:
            rows.append((f"over-refusal on benign prompts ({DETECTOR_NAMES[name]}, {used})", fmt(baseline), fmt(policy), note, bad))
        xstest = evaluation.get("xstest")
        if xstest:
            for key, label in (("safe_refusal_rate", "refuses safe prompts that look unsafe"),
                               ("unsafe_compliance_rate", "complies with unsafe prompts")):
                rows.append((f"XSTest-style: {label} ({DETECTOR_NAMES[name]}, {used})", fmt(xstest[key]["baseline"][name]),
                             fmt(xstest[key]["policy"][name]), note, bad))
    return rows


def detector_table(evaluation: dict) -> list[tuple]:
    """(detector, accuracy [CI], precision, recall, n, majority baseline, role)."""
    detectors = evaluation.get("refusal_detectors") or {}
    table = []
    for name, label in DETECTOR_NAMES.items():
        check = detectors.get(name)
        if check:
            role = "used" + (f" ({detectors.get('why')})" if detectors.get("why") else "") if detectors.get("primary") == name else "not used"
            table.append((label, f"{check['accuracy']} [{check['ci95'][0]}, {check['ci95'][1]}]", check.get("precision"),
                          check.get("recall"), check["n"], check.get("majority_baseline"),
                          role + ("" if check.get("reliable") else "; NOT VALID")))
    return table


def verbosity_rows(evaluation: dict) -> list[tuple]:
    """(metric, value, 95% CI, trust note, unreliable), like the main table's rows."""
    rows = []
    controlled = evaluation.get("win_rate_labeller_length_controlled")
    if controlled and controlled.get("rate") is not None:
        note = f"raw {controlled.get('raw_rate')}; length coefficient {controlled.get('length_coef')}"
        if not controlled.get("identifiable", True):
            note += f"; {controlled.get('note', 'length effect not identifiable')}"
        check = controlled.get("judge_accuracy")
        bad = bool(check) and not check.get("reliable")
        if check:
            note += (f"; judge accuracy on the labelled pairs {check['accuracy']} [{check['ci95'][0]}, {check['ci95'][1]}], "
                     f"n={check['n']}" + (": near chance" if bad else ""))
        rows.append(("win rate at equal length (AI labeller, length-controlled)", controlled["rate"], controlled.get("ci95"), note, bad))
    correlation = evaluation.get("reward_length_correlation")
    if correlation and correlation.get("pearson") is not None:
        rows.append(("reward-model score vs length (Pearson r)", correlation["pearson"], correlation.get("ci95"),
                     f"Spearman {correlation.get('spearman')}, n={correlation.get('n')}", False))
    length = evaluation.get("length_difference")
    if length and length.get("mean") is not None:
        rows.append(("length difference policy - baseline (tokens)", length["mean"], length.get("ci95"),
                     f"ratio {length.get('ratio')}", False))
    return rows


def harness_rows(evaluation: dict) -> list[tuple]:
    """lm-evaluation-harness metrics, baseline and policy, each with the harness's stderr interval."""
    rows = []
    for task, metrics in sorted(((evaluation.get("harness") or {}).get("tasks") or {}).items()):
        for metric, entry in sorted(metrics.items()):
            cells = []
            for model in ("baseline", "policy"):
                value, ci = entry.get(model), entry.get(f"{model}_ci95")
                cells.append("n/a" if not isinstance(value, (int, float)) else
                             f"{value:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
            delta = entry.get("delta") or {}
            note = "lm-evaluation-harness" + (f"; paired difference {delta.get('mean')} {delta.get('ci95')}" if delta.get("mean") is not None else "")
            rows.append((f"{task}: {metric}", *cells, note, False))
    return rows


def iteration_rows(evaluations: list[tuple[str, dict]]) -> list[tuple]:
    """Per evaluated checkpoint: the headline numbers, for the iterations table."""
    table = []
    for name, metrics in evaluations:
        primary = (metrics.get("refusal_detectors") or {}).get("primary", "judge")
        refusal = metrics.get("over_refusal_rate_policy" + ("_string_match" if primary == "string_match" else ""))
        kl = metrics.get("kl_to_reference")
        table.append((name, fmt((metrics.get("win_rate_labeller") or {}).get("all")), fmt(metrics.get("win_rate_labeller_length_controlled")),
                      fmt((metrics.get("win_rate_reward_model") or {}).get("all")), fmt(metrics.get("harmless_rate_policy")),
                      fmt(refusal), fmt(metrics.get("sycophancy", {}).get("policy")),
                      f"{(metrics.get('mean_length') or {}).get('policy', 0):.1f}",
                      f"{kl['mean']:.3g}" if isinstance(kl, dict) and kl.get("mean") is not None else "n/a"))
    return table


def hacking(evaluations: list[tuple[str, dict]], policy_stage: str) -> tuple[str, list[str]]:
    """The reward-hacking chart over the policy stage's checkpoints, and its warnings."""
    points = trajectory(evaluations)
    if len(points) < 2:
        return "", []
    judge_kind = points[-1].get("judge_kind") or "raw"
    rows = [
        {"title": "reward-model score, policy - baseline", "unit": "reward", "reference": 0.0,
         "values": [p["reward_delta"] for p in points], "intervals": [p["reward_ci"] for p in points]},
        {"title": f"judge win rate against the baseline ({judge_kind})", "unit": "share of prompts", "reference": 0.5,
         "values": [p["judge_win"] for p in points], "intervals": [p["judge_ci"] for p in points]},
        {"title": "answer length, policy - baseline", "unit": "tokens", "reference": 0.0,
         "values": [p["length_difference"] for p in points], "intervals": [p["length_ci"] for p in points]},
        {"title": "KL(policy || baseline)", "unit": "nats per response", "reference": 0.0,
         "values": [p["kl"] for p in points], "intervals": [p["kl_ci"] for p in points]},
    ]
    chart = panels(f"Reward-hacking signs: {policy_stage}, checkpoint by checkpoint", [p["name"] for p in points], rows,
                   x_title="checkpoint", note="Bars: 95% intervals; dashed: no change. Hacking looks like the top panel rising while the second "
                        "stays at 0.5, with length and KL growing.")
    return chart, flags(points, evaluations[-1][1])


# What each trainer logs per step: (log key, panel title, unit). The loss first, then what bears on
# reward hacking: the reward it chased, KL and length (PPO, GRPO, RLOO), or DPO's implicit reward
# margin and the chosen/rejected log-probabilities (both falling while the margin grows is DPO's
# known way of "winning" without preferring the chosen).
STEP_SIGNALS = {
    "sft": [("loss", "training loss: next-token cross-entropy", "nats per token"),
            ("mean_token_accuracy", "next-token accuracy on the revisions", "share of tokens")],
    "rm": [("loss", "training loss: -log sigmoid(r chosen - r rejected)", "nats per pair"),
           ("accuracy", "pairs ranked right (chosen scored higher)", "share of pairs"),
           ("margin", "reward margin, chosen - rejected", "reward")],
    "dpo": [("loss", "training loss (DPO, on the soft labels)", "nats per pair"),
            ("rewards/margins", "implicit reward margin, chosen - rejected", "beta x log-ratio"),
            ("logps/chosen", "log-probability of the chosen answers", "nats"),
            ("logps/rejected", "log-probability of the rejected answers", "nats")],
    "ppo": [("reward", "reward-model score of the sampled answers", "reward"), ("kl", "KL to the reference", "nats per response"),
            ("policy_loss", "policy loss (clipped surrogate)", "no unit"), ("value_loss", "value-head loss", "squared error"),
            ("response_length", "answer length", "tokens")],
    "grpo": [("loss", "training loss (surrogate)", "no unit"), ("reward", "reward-model score of the sampled answers", "reward"),
             ("kl", "KL to the reference", "nats per token"), ("completions/mean_length", "answer length", "tokens")],
}
STEP_SIGNALS["rloo"] = STEP_SIGNALS["grpo"]
STEP_SIGNALS["kto"] = [("loss", "training loss (KTO)", "no unit"), ("rewards/margins", "implicit reward, desirable - undesirable",
                                                                      "beta x log-ratio"),
                       ("kl", "KL reference point (batch estimate)", "nats per response")]
STEP_SIGNALS["online_dpo"] = [("loss", "training loss (online DPO, on the judge's soft labels)", "nats per pair"),
                              ("judge/confidence", "judge's confidence, max(p, 1 - p)", "probability"),
                              ("rewards/accuracies", "policy's implied preference agrees with the judge", "share of pairs"),
                              ("kl", "log-ratio to the reference, per sampled answer", "nats per response"),
                              ("completion_length", "answer length", "tokens")]


def training_signals(folder: Path, stage: str, name: str) -> str:
    """One trained stage step by step: its loss with its unit, and what it logged beside it
    (see STEP_SIGNALS), each on its own axis: PPO's reward and KL never share a scale."""
    try:
        data = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return ""
    history = data.get("history") or data.get("log_history") or []
    rows = []
    for key, title, unit in STEP_SIGNALS.get(stage, []):
        values = [h.get(key) for h in history]
        if any(isinstance(v, (int, float)) for v in values):
            rows.append({"title": title, "unit": unit, "values": [v if isinstance(v, (int, float)) else None for v in values]})
    steps = [h.get("step", index + 1) for index, h in enumerate(history)]
    return panels(f"Training: {name}, step by step", steps, rows, x_title="training step") if rows else ""


def hacking_rows(evaluations: list[tuple[str, dict]]) -> list[tuple]:
    """The reward-hacking chart as a table, for report.md: one row per checkpoint."""
    def cell(value, ci) -> str:
        if value is None:
            return "n/a"
        return f"{value:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
    return [(p["name"], cell(p["reward_delta"], p["reward_ci"]), cell(p["judge_win"], p["judge_ci"]),
             cell(p["length_difference"], p["length_ci"]), cell(p["kl"], p["kl_ci"])) for p in trajectory(evaluations)]
