"""The report's reading sections: what the models actually said.

- Answers side by side: for a few held-out red-team and benign prompts of the eval stage, the
  baseline's and the policy's answers next to each other, with every verdict the run has on them:
  the AI labeller's pairwise preference (both orders), the judge's yes/no on harm or refusal
  (where `responses.jsonl` records it), the validated phrase matcher's refusal read, and the
  reward-model score. The judge's and the labeller's accuracy on labelled checks stand beside
  their verdicts, so a judge at chance is read as one.
- Critique traces: for a few prompts of the critique stage, the initial answer, then per round
  the principle, its critique request, the model's critique and its revision.

Why: a table of rates says that something changed; these say what. The choice of examples is
deterministic (spread evenly through the file, preferring prompts whose two answers differ and
traces whose revision was kept), so two builds of one run show the same ones. All model text is
untrusted and HTML-escaped; long answers scroll inside their box.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Sequence, TypeVar

from cai.refusal import is_refusal

T = TypeVar("T")
KINDS = (("red_team", "red-team"), ("benign", "benign"))
QUESTION = {"red_team": ("harmful", "not harmful"), "benign": ("refuses", "does not refuse")}


def spread(items: Sequence[T], count: int) -> list[T]:
    """`count` items evenly through `items` (first and last included), in their order."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _escape(text: str) -> str:
    """Model text made safe for the page: HTML-escaped, control characters (a NUL from a broken
    model, an escape sequence) shown as U+FFFD instead of written into the file."""
    return html.escape(CONTROL.sub("\ufffd", text or ""))


def _text(text: str) -> str:
    return f'<div class="answer">{_escape(text)}</div>'


def _prompt(messages: Sequence[dict]) -> str:
    shown = [m for m in messages if m.get("role") != "system"] or list(messages)
    if len(shown) == 1:
        return _escape(shown[0].get("content", ""))
    return "<br>".join(f"<em>{_escape(m.get('role', ''))}:</em> {_escape(m.get('content', ''))}" for m in shown)


def _reliable(check: dict | None) -> tuple[str, str]:
    """(text of the check, the tag beside the reader's verdicts: "" for a validated reader)."""
    if not check:
        return "not validated", ' <span class="noisy">(reader not validated)</span>'
    ci = check.get("ci95") or ["?", "?"]
    tag = "" if check.get("reliable") else ' <span class="noisy">(reader near chance)</span>'
    return f"accuracy {check['accuracy']} [{ci[0]}, {ci[1]}] on {check['n']} labelled checks", tag


def answer_pairs(eval_dir: Path, evaluation: dict, per_kind: int = 4) -> str:
    rows = _rows(eval_dir / "responses.jsonl")
    if not rows:
        return ""
    reward = evaluation.get("reward") or {}
    scores = {m: reward.get(m) for m in ("baseline", "policy")}
    if any(not s or len(s) != len(rows) for s in scores.values()):
        scores = {}
    calibration = evaluation.get("judge_calibration") or {}
    labeller_text, labeller_tag = _reliable(calibration.get("preference"))
    harm_text, harm_tag = _reliable(calibration.get("harm"))
    refusal_text, refusal_tag = _reliable(calibration.get("refusal"))
    matcher_text, matcher_tag = _reliable((evaluation.get("refusal_detectors") or {}).get("string_match"))
    judge_tag = {"red_team": harm_tag, "benign": refusal_tag}
    chosen = []
    for kind, _ in KINDS:
        indexed = [(i, r) for i, r in enumerate(rows) if r.get("kind") == kind]
        differ = [x for x in indexed if x[1].get("policy") != x[1].get("baseline")]
        alike = [x for x in indexed if x[1].get("policy") == x[1].get("baseline")]
        picked = spread(differ, per_kind)
        chosen += sorted(picked + spread(alike, per_kind - len(picked)), key=lambda x: x[0])
    if not chosen:
        return ""
    baseline_name = evaluation.get("baseline") or "baseline"
    policy_name = evaluation.get("policy_stage") or "policy"
    cards = []
    for index, row in chosen:
        columns = []
        for model, name in (("baseline", baseline_name), ("policy", policy_name)):
            text = row.get(model) or ""
            verdicts = []
            p_yes = (row.get("judge_p_yes") or {}).get(model)
            if isinstance(p_yes, (int, float)):
                yes, no = QUESTION.get(row.get("kind"), ("yes", "no"))
                verdicts.append(f"judge: <strong>{yes if p_yes > 0.5 else no}</strong> (P(yes) = {p_yes:.2f})"
                                + judge_tag.get(row.get("kind"), ""))
            verdicts.append(f"phrase matcher: <strong>{'refusal' if is_refusal(text) else 'no refusal'}</strong>" + matcher_tag)
            if scores:
                verdicts.append(f"reward model: {scores[model][index]:.3f}")
            columns.append(f'<div class="side"><h4>{model} <code>{html.escape(name)}</code></h4>{_text(text)}'
                           f'<ul class="verdicts">{"".join(f"<li>{v}</li>" for v in verdicts)}</ul></div>')
        p_policy = row.get("labeller_p_policy")
        if isinstance(p_policy, (int, float)):
            winner = "the policy" if p_policy > 0.5 else ("the baseline" if p_policy < 0.5 else "neither (tie)")
            if p_policy != 0.5 and abs(p_policy - 0.5) < 0.0005:
                winner += ", by less than 0.001"
            pairwise = (f'<p class="pairwise">AI labeller, both orders: prefers <strong>{winner}</strong> '
                        f"(P(policy better) = {p_policy:.3f}){labeller_tag}</p>")
        else:
            pairwise = ""
        same = ' <span class="same">identical answers</span>' if row.get("policy") == row.get("baseline") else ""
        kind = dict(KINDS).get(row.get("kind"), row.get("kind", ""))
        cards.append(f'<article class="pair"><h3>{html.escape(kind)} prompt <code>{html.escape(str(row.get("id", "")))}</code>{same}</h3>'
                     f'<p class="prompt">{_prompt(row.get("prompt") or [])}</p><div class="cols">{"".join(columns)}</div>{pairwise}</article>')
    identical = sum(r.get("policy") == r.get("baseline") for r in rows)
    recorded = any(isinstance(r.get("judge_p_yes"), dict) for r in rows)
    readers = [f"the AI labeller's pairwise preference, each pair in both orders ({labeller_text})"]
    readers.append(f"the judge's yes/no on harm ({harm_text}) and on refusal ({refusal_text})" if recorded
                   else "the judge's per-answer harm and refusal verdicts are not recorded in this run's responses.jsonl")
    readers.append(f"the phrase matcher's refusal read ({matcher_text})")
    if scores:
        readers.append("the reward model's score")
    intro = (f"{len(chosen)} of the {len(rows)} held-out prompts, spread evenly through the eval set, preferring prompts "
             f"where the two answers differ ({identical} of {len(rows)} answer pairs are identical). Verdicts: "
             + "; ".join(readers) + ".")
    return f'<h2>Answers side by side</h2><p>{html.escape(intro)}</p>{"".join(cards)}'


def _principles(trace: dict) -> dict[str, str]:
    """Principle id -> its critique request, when the shipped constitution the trace names is the
    very one it used (same content hash); else nothing, and the report shows the ids only."""
    provenance = trace.get("provenance") or {}
    name, digest = provenance.get("constitution"), provenance.get("constitution_hash")
    if not name or not digest:
        return {}
    try:
        from cai.constitution import load_constitution
        from cai.paths import shipped_dir

        constitution = load_constitution(shipped_dir("constitutions") / f"{name}.yaml")
    except Exception:  # noqa: BLE001  (a missing or changed constitution only costs the request text)
        return {}
    return {p.id: p.critique for p in constitution.principles} if constitution.hash == digest else {}


def critique_traces(critique_dir: Path, count: int = 3) -> str:
    traces = _rows(critique_dir / "trace.jsonl")
    if not traces:
        return ""
    kept = [t for t in traces if t.get("final_round") is not None]
    chosen = spread(kept or traces, count)
    requests = _principles(chosen[0])
    cards = []
    for trace in chosen:
        rounds = []
        for step in trace.get("rounds") or []:
            principle = step.get("principle_id", "")
            request = requests.get(principle)
            kept_here = ' <span class="kept">kept for SFT</span>' if step.get("round") == trace.get("final_round") else ""
            flags = ", ".join(step.get("flags") or [])
            rounds.append(f'<div class="round"><h4>round {step.get("round")}: principle <code>{html.escape(principle)}</code>{kept_here}</h4>'
                          + (f'<p class="request">Critique request: {html.escape(request)}</p>' if request else "")
                          + f'<div class="cols"><div class="side"><h5>critique</h5>{_text(step.get("critique", ""))}</div>'
                          f'<div class="side"><h5>revision</h5>{_text(step.get("revision", ""))}</div></div>'
                          + (f'<p class="flags">flags: {html.escape(flags)}</p>' if flags else "") + "</div>")
        title = html.escape(str(trace.get("prompt_id") or trace.get("id", "")))
        category = f" ({html.escape(trace['category'])})" if trace.get("category") else ""
        dropped = "" if trace.get("final_round") is not None else ' <span class="same">no revision kept</span>'
        cards.append(f'<article class="trace"><h3>critique trace <code>{title}</code>{category}{dropped}</h3>'
                     f'<p class="prompt">{_prompt(trace.get("prompt") or [])}</p>'
                     f'<div class="side"><h5>initial answer</h5>{_text(trace.get("initial", ""))}</div>{"".join(rounds)}</article>')
    intro = (f"{len(chosen)} of the {len(traces)} critique-stage prompts, spread evenly through the stage's traces"
             + (", among those whose revision was kept for SFT" if kept else "") + ": the model's first answer, then "
             "per round the principle drawn, the model's critique of its own answer and its revision.")
    return f'<h2>Critique and revision traces</h2><p>{html.escape(intro)}</p>{"".join(cards)}'
