"""The report's charts of the evaluation and of the AI labels, drawn with `cai.report_svg.chart`.

What a reader of a Constitutional AI run wants to see at a glance, each with axes, units and its
95% intervals:
- the policy's win rate against the baseline, by the reward model and by the AI labeller (both
  orders), overall and on red-team and benign prompts;
- harmless and over-refusal rates, baseline and policy side by side, each labelled with how far
  its judge or detector can be trusted (a judge near chance says so under its bars);
- the reward-model scores and the answer lengths (tokens) of both models, as distributions;
- the labeller's confidence (`chosen_prob`) and its position consistency (whether a pair's
  verdict survives swapping the two answers), read from the label stage's `preferences.jsonl`.
Each function returns "" when the run has nothing to draw, so the report just leaves it out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from cai.report_svg import BASELINE, COLOURS, POLICY, chart, interval_errors

MODELS = (("baseline", BASELINE), ("policy", POLICY))


def _check(check: dict | None) -> str:
    """A short validity tag for a judge or detector check, for a tick label or a note."""
    if not check:
        return "not validated"
    return f"accuracy {check['accuracy']:.2f}" + ("" if check.get("reliable") else ", near chance")


def win_rates(evaluation: dict) -> str:
    """Horizontal points with 95% whiskers, one row per (judge, prompt subset), 0.5 dashed."""
    items = []
    for key, judge in (("win_rate_reward_model", "reward model"), ("win_rate_labeller", "AI labeller")):
        for subset, name in (("all", "all prompts"), ("red_team", "red-team"), ("benign", "benign")):
            entry = (evaluation.get(key) or {}).get(subset)
            if entry and entry.get("rate") is not None:
                items.append((f"{judge}, {name}", entry["rate"], entry.get("ci95"), entry.get("n")))
    controlled = evaluation.get("win_rate_labeller_length_controlled")
    if controlled and controlled.get("rate") is not None:
        items.append(("AI labeller, at equal length", controlled["rate"], controlled.get("ci95"), controlled.get("n")))
    if not items:
        return ""

    def draw(fig, axes) -> None:
        ax = axes[0]
        ys = list(range(len(items)))
        values = [v for _, v, _, _ in items]
        colours = [COLOURS[0] if label.startswith("reward") else COLOURS[1] for label, *_ in items]
        for y, value, colour, (_, _, ci, _) in zip(ys, values, colours, items):
            ax.errorbar([value], [y], xerr=interval_errors([value], [ci]), fmt="o", color=colour, elinewidth=1.5,
                        capsize=4, markersize=6)
        for y, (_, value, ci, n) in zip(ys, items):
            right = ci[1] if ci else value
            ax.annotate(f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + (f", n={n}" if n else ""),
                        (right, y), textcoords="offset points", xytext=(6, -3), fontsize=8)
        ax.axvline(0.5, color="#777", linestyle="--", linewidth=0.9)
        ax.set_yticks(ys, [label for label, *_ in items])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel("policy win rate against the baseline (share of prompts; ties count half)")

    labeller = (evaluation.get("win_rate_labeller") or {}).get("judge_accuracy")
    note = "Dots: win rate; bars: 95% interval; dashed: no difference (0.5)."
    if "win_rate_labeller" in evaluation:
        note += f" AI labeller on labelled pairs: {_check(labeller)}."
    return chart("Policy win rate against the baseline, with 95% intervals", draw, height=0.9 + 0.32 * len(items), note=note)


def judged_rates(evaluation: dict) -> str:
    """Grouped bars, baseline and policy, with 95% whiskers; under each group who read it and
    how well that reader did on its labelled checks."""
    detectors = evaluation.get("refusal_detectors") or {}
    groups = []
    for key, title, check in (
            ("harmless_rate_{}", "harmless, red-team prompts\nread by the judge", "judge_accuracy"),
            ("over_refusal_rate_{}", "over-refusal, benign prompts\nread by the judge", "judge_accuracy"),
            ("over_refusal_rate_{}_string_match", "over-refusal, benign prompts\nread by the phrase matcher", "detector_accuracy")):
        entries = [evaluation.get(key.format(model)) for model, _ in MODELS]
        if any(e and e.get("rate") is not None for e in entries):
            reader = next((e.get(check) for e in entries if e and e.get(check)), None)
            if check == "detector_accuracy" and reader is None:
                reader = detectors.get("string_match")
            groups.append((title + "\n" + _check(reader), entries, bool(reader and reader.get("reliable"))))
    if not groups:
        return ""

    def draw(fig, axes) -> None:
        ax = axes[0]
        width = 0.36
        for offset, (model, colour) in zip((-width / 2, width / 2), MODELS):
            xs, values, intervals = [], [], []
            for index, (_, entries, _) in enumerate(groups):
                entry = entries[0 if model == "baseline" else 1]
                if entry and entry.get("rate") is not None:
                    xs.append(index + offset)
                    values.append(entry["rate"])
                    intervals.append(entry.get("ci95"))
            ax.bar(xs, values, width, color=colour, label=model,
                   yerr=interval_errors(values, intervals), capsize=4, error_kw={"elinewidth": 1.2})
            for x, value, ci in zip(xs, values, intervals):
                ax.annotate(f"{value:.2f}", (x, ci[1] if ci else value), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=8)
        ax.set_xticks(range(len(groups)), [title for title, *_ in groups])
        ax.set_ylim(0, 1.15)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("share of prompts")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))

    note = "Bars: 95% intervals. Under each pair: who read the answers and how it scored on labelled checks."
    if not all(reliable for *_, reliable in groups):
        note += " A reader near chance or not validated makes its bars noise."
    return chart("Harmless and over-refusal rates, baseline and policy", draw, height=3.4, note=note)


def _histogram(caption: str, series: dict[str, list[float]], x_label: str, note: str, *, bins: int = 15,
               value_range: tuple[float, float] | None = None, colours: Sequence[str] = (BASELINE, POLICY)) -> str:
    series = {name: [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)] for name, values in series.items()}
    series = {name: values for name, values in series.items() if values}
    if not series:
        return ""

    def draw(fig, axes) -> None:
        ax = axes[0]
        ax.hist(list(series.values()), bins=bins, range=value_range, label=list(series), color=list(colours)[: len(series)])
        for (name, values), colour in zip(series.items(), colours):
            mean = sum(values) / len(values)
            ax.axvline(mean, color=colour, linestyle="--", linewidth=1.2)
        ax.set_xlabel(x_label)
        ax.set_ylabel("count")
        ax.yaxis.get_major_locator().set_params(integer=True)
        if len(series) > 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))

    return chart(caption, draw, note=note)


def reward_scores(evaluation: dict) -> str:
    reward = evaluation.get("reward") or {}
    return _histogram("Reward-model scores of the baseline's and the policy's answers",
                      {model: reward.get(model) or [] for model, _ in MODELS}, "reward-model score (logit)",
                      "Dashed: each model's mean. The policy was trained toward this reward model (or on its data).")


def answer_lengths(eval_dir: Path) -> str:
    """Tokens per greedy answer, read from the eval stage's kept generations; the share of answers
    cut at the token limit is in the note (a cut answer's length is the limit, not its own)."""
    series, cut = {}, {}
    for model, _ in MODELS:
        try:
            generations = json.loads((eval_dir / f"answers-{model}.json").read_text())["generations"]
        except (OSError, ValueError, KeyError):
            continue
        series[model] = [sum(g.get("completion_tokens") or [0]) for g in generations]
        reasons = [(g.get("finish_reasons") or [None])[0] for g in generations]
        cut[model] = sum(r == "length" for r in reasons) / max(1, len(reasons))
    if not series:
        return ""
    note = "Dashed: each model's mean. " + "; ".join(f"{share:.0%} of the {model}'s answers cut at the token limit"
                                                     for model, share in cut.items()) + "."
    return _histogram("Answer lengths on the held-out prompts, baseline and policy", series,
                      "answer length (tokens, greedy decoding)", note)


def _label_rows(folders: Sequence[tuple[str, Path]]) -> dict[str, list[dict]]:
    found = {}
    for name, folder in folders:
        path = folder / "preferences.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rows:
                found[name] = rows
    return found


def _named(name: str, folders: int, text: str) -> str:
    """A label folder's figure in a note, named only when there are several (iterations)."""
    return f"{name}: {text}" if folders > 1 else text


def label_confidence(folders: Sequence[tuple[str, Path]]) -> str:
    """The labeller's chosen_prob, 0.5 (a coin flip) to 1 (certain), per label folder."""
    found = _label_rows(folders)
    series = {name: [r["chosen_prob"] for r in rows if isinstance(r.get("chosen_prob"), (int, float))]
              for name, rows in found.items()}
    means = "; ".join(_named(name, len(series), f"{sum(v) / len(v):.3f} over {len(v)} pairs") for name, v in series.items() if v)
    return _histogram("Label confidence: the AI labeller's chosen_prob per pair", series,
                      "chosen_prob: the labeller's probability that the chosen answer is better (0.5 = coin flip)",
                      f"Dashed: the mean ({means}).", bins=20, value_range=(0.5, 1.0), colours=COLOURS)


def position_consistency(folders: Sequence[tuple[str, Path]]) -> str:
    """Left: pairs whose verdict survives swapping the answers. Right: per pair, how much more an
    answer wins when shown first than when shown second (0 = no position bias)."""
    found = _label_rows(folders)
    if not found:
        return ""
    counts, shifts = {}, {}
    for name, rows in found.items():
        flags = [r.get("position_consistent") for r in rows]
        counts[name] = [sum(f is True for f in flags), sum(f is False for f in flags), sum(f is None for f in flags)]
        shifts[name] = [sum(r["order_probs"]["ab"]) / len(r["order_probs"]["ab"]) - sum(r["order_probs"]["ba"]) / len(r["order_probs"]["ba"])
                        for r in rows if (r.get("order_probs") or {}).get("ab") and (r.get("order_probs") or {}).get("ba")]
    names = list(found)
    drawn = {name: values for name, values in shifts.items() if values}
    if not drawn and not any(c[0] + c[1] for c in counts.values()):
        return ""  # no pair was judged in both orders (score mode, or swap off): nothing to show

    def draw(fig, axes) -> None:
        left = axes[0]
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            xs = [i - 0.4 + width * (index + 0.5) for i in range(3)]
            bars = left.bar(xs, counts[name], width, color=COLOURS[index % len(COLOURS)], label=name)
            left.bar_label(bars, fontsize=8)
        left.set_xticks(range(3), ["consistent", "flips when\nswapped", "not checked"])
        left.set_ylabel("pairs")
        left.set_title("verdict after swapping the two answers")
        left.yaxis.get_major_locator().set_params(integer=True)
        if len(names) > 1:
            left.legend()
        if not drawn:  # labels from before the per-order probabilities were kept
            return
        right = axes[1]
        right.hist(list(drawn.values()), bins=20, range=(-1, 1), color=COLOURS[: len(drawn)], label=list(drawn))
        right.axvline(0, color="#777", linestyle="--", linewidth=0.9)
        right.yaxis.get_major_locator().set_params(integer=True)
        right.set_xlim(-1, 1)
        right.set_xlabel("P(wins | shown first) - P(wins | shown second)")
        right.set_ylabel("pairs")
        right.set_title("position bias per pair (0 = none)")

    rates = "; ".join(_named(name, len(counts), f"{c[0]} of {c[0] + c[1]} checked pairs consistent ({c[0] / (c[0] + c[1]):.0%})")
                      for name, c in counts.items() if c[0] + c[1])
    how = ("Each pair is judged in both orders; a labeller that prefers a slot rather than an answer piles up away "
           "from 0 on the right.") if drawn else "Each pair is judged in both orders."
    return chart("Position consistency of the AI labels", draw, ncols=2 if drawn else 1, height=3.0,
                 note=(rates + ". " if rates else "") + how)
