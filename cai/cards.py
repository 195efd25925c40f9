"""Dataset and model cards: a `README.md` beside every dataset and adapter cai writes.

Why: a folder of JSONL files or LoRA weights says nothing about where it came from. The card is
what the Hugging Face Hub shows, and what `datasets` and `peft` read:

- dataset folders (critique: `sft.jsonl` + `preferences.jsonl`; label: `preferences.jsonl`;
  blend: `train.jsonl` + `eval.jsonl`): YAML front matter with `license`, `tags`,
  `task_categories`, `size_categories` and `configs`, whose `data_files` make
  `datasets.load_dataset(folder)` read the right files (and not `work/*.jsonl` or `trace.jsonl`):
  every cai dataset folder loads as preference pairs by default, the critique folder's SFT rows
  as its `sft` config. Empty files are left out (`datasets` refuses an empty split). The body
  names the constitution and its content hash, the principles the rows used, the generating or
  labelling model, row counts and label statistics (mean `chosen_prob`, position consistency,
  agreement with human labels when `cai label eval` measured it).
- adapter folders (`<stage>/adapter` of sft, dpo, grpo, rloo, rm, ppo): `base_model` (a hub id
  when cai knows one), `library_name: peft`, tags; the body gives the method, the training data
  and its size, every setting, and the final metrics. peft's `save_pretrained` writes a card of
  its own (`PeftModel.create_or_update_model_card`, which loads and updates any README.md already
  there), so cai writes its card *after* saving: cai's is the one left. The eval stage runs
  later; `cai push` (hub.py) adds its figures with `add_eval_results` just before uploading,
  since a README edited after every eval would change the adapter folder's digest, which keys
  the merged-weights cache (cai/merge.py).

The licence is `other` until set (`cai push --license`, or `push.license` in a recipe): the terms
of generated data follow from the prompts, the generating model's licence and any human data
blended in, which cai cannot know. A card rewritten in place keeps the licence it had.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from cai import __version__, store
from cai.errors import CaiError

CARD = "README.md"
DEFAULT_LICENSE = "other"
TAGS = ["cai", "constitutional-ai", "rlaif"]
# Builtin model names -> the hub model their weights come from (converted from a GGUF file).
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# config name -> split -> file; the first config is the default one.
LAYOUTS: dict[str, dict[str, dict[str, str]]] = {
    "critique": {"preferences": {"train": "preferences.jsonl"}, "sft": {"train": "sft.jsonl"}},
    "label": {"default": {"train": "preferences.jsonl"}},
    "blend": {"default": {"train": "train.jsonl", "test": "eval.jsonl"}},
}
DESCRIPTIONS = {
    "critique": "SL-CAI data made by critique and revision under a constitution: each prompt was answered, then "
                "the answer was critiqued under a sampled principle and revised, round after round. `sft` holds "
                "the prompt with the final revision (TRL `messages`); `preferences` pairs the final revision "
                "(chosen) with the first answer (rejected), `chosen_prob` 1.",
    "label": "RLAIF preference pairs: two sampled answers per prompt, labelled by an AI feedback model under the "
             "constitution's comparison principles. Labels are soft (`chosen_prob`, the labeller's probability "
             "that `chosen` is better), read in both orders and averaged against position bias.",
    "blend": "A blend of preference sources (human comparisons, AI labels, SL-CAI pairs), deduplicated, with "
             "conflicts resolved (a human label beats an AI label) and an evaluation split held out by prompt "
             "(every pair of a held-out prompt is in `test`).",
}
METHODS = {
    "sft": ("SFT", "Supervised fine-tuning on the critique stage's final revisions (SL-CAI); the loss covers the "
                   "answer tokens only."),
    "dpo": ("DPO", "Direct preference optimisation with soft labels: each pair's `chosen_prob` enters the loss "
                   "(`soft_labels` mode below). The reference is the starting policy (adapter disabled). Started from "
                   "an SFT adapter on a full-precision base, the saved adapter stacks the two, so it applies to the "
                   "plain base."),
    "rm": ("reward model", "A LoRA sequence classifier (one `score` output, saved with the adapter) trained with "
                           "a Bradley-Terry cross-entropy against the soft labels `chosen_prob`."),
    "ppo": ("PPO", "cai's PPO: LoRA policy and value head, KL penalty against the frozen starting policy, reward "
                   "from the run's reward model. The adapter is the trained policy alone."),
    "grpo": ("GRPO", "TRL's GRPO against the run's reward model; the saved adapter applies to the plain base."),
    "rloo": ("RLOO", "TRL's RLOO against the run's reward model; the saved adapter applies to the plain base."),
    "kto": ("KTO", "TRL's KTO on AI labels: each preference pair gives a desirable and an undesirable example."),
    "online_dpo": ("online DPO", "Online DPO with AI feedback: the policy samples two answers per prompt, cai's "
                                 "labeller (or the reward model) labels them softly, and a soft-label DPO step follows."),
}
_EVAL_START, _EVAL_END = "<!-- cai:eval -->", "<!-- /cai:eval -->"


# -- reading and writing cards ------------------------------------------------------------------------


def read_card(folder: str | Path) -> tuple[dict, str] | None:
    """(front matter, body) of `folder/README.md`; None when there is none. Bad YAML is a CaiError."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n?", text, re.S)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise CaiError(f"front matter is not valid YAML: {str(exc).splitlines()[0]}", source=str(path)) from None
    if not isinstance(meta, dict):
        raise CaiError("front matter must be a YAML mapping", source=str(path))
    return meta, text[match.end():]


def _write(folder: Path, meta: dict, body: str) -> Path:
    """The card, written to a temporary file and renamed (never half-written), only when it changed."""
    path = folder / CARD
    text = "---\n" + yaml.safe_dump(_plain(meta), sort_keys=False, allow_unicode=True, width=1000) + "---\n\n" + body.strip() + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    store.make_dirs(folder)
    tmp = folder / f".{CARD}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    """JSON-able plain data (tuples -> lists, paths -> str) so safe_dump writes no Python tags."""
    return json.loads(json.dumps(value, default=str))


def update_front_matter(folder: str | Path, **fields: Any) -> Path:
    """Set front-matter fields of an existing card (None values are left alone); the licence line in
    the body follows `license`."""
    card = read_card(folder)
    if card is None:
        raise CaiError(f"has no card ({CARD})", source=str(folder))
    meta, body = card
    for key, value in fields.items():
        if value is not None:
            meta[key] = value
    if fields.get("license"):
        line = _licence_line(fields["license"], "adapter" if meta.get("library_name") == "peft" else "data")
        body = re.sub(r"^\*\*Licence:\*\* .*$", lambda _: line, body, flags=re.M)
    return _write(Path(folder), meta, body)


def _licence_line(license: str, what: str = "data") -> str:
    if license == DEFAULT_LICENSE:
        source = ("the prompts, the generating model's licence and any human comparisons in it" if what == "data"
                  else "the base model's licence and those of the training data")
        return f"**Licence:** `other`: not set. The terms of this {what} follow from {source}; set one with `cai push --license`."
    return f"**Licence:** `{license}`."


def _existing_license(folder: Path) -> str:
    try:
        card = read_card(folder)
    except CaiError:
        return DEFAULT_LICENSE
    return str(card[0].get("license") or DEFAULT_LICENSE) if card else DEFAULT_LICENSE


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value, default=str)}`"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def model_label(name: str | None) -> str:
    """A model as a reader should see it: a builtin with the hub model it came from, a local folder by
    its name (not the path of this machine), a hub id as is."""
    if not name:
        return "unknown"
    if name in BUILTIN_HUB_IDS:
        return f"`{name}` (cai builtin: {BUILTIN_HUB_IDS[name]}, GGUF Q4_1 dequantised to fp32)"
    if hub_model_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    if name.startswith(("/", ".", "~")) or Path(name).exists():
        return f"`{Path(name).name}` (local folder)"
    return f"`{name}`"


def hub_model_id(name: str | None) -> str | None:
    """The hub id of a model name when there is one (for `base_model`), else None."""
    if not name:
        return None
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    return name if _HUB_ID.match(name) and not Path(name).exists() and not name.startswith((".", "/", "~")) else None


# -- dataset cards ----------------------------------------------------------------------------------------


def data_files(folder: str | Path) -> list[str]:
    """The data files a folder's card lists in `configs` that exist and hold rows (what `cai push` uploads)."""
    card = read_card(folder)
    files: list[str] = []
    for config in (card[0].get("configs") or []) if card else []:
        entries = config.get("data_files") if isinstance(config, dict) else None
        entries = [entries] if isinstance(entries, (str, dict)) else entries or []
        for entry in entries:
            paths = entry.get("path") if isinstance(entry, dict) else entry
            for name in [paths] if isinstance(paths, str) else paths or []:
                path = Path(folder) / name
                if name not in files and path.is_file() and path.stat().st_size > 0:
                    files.append(name)
    return files


def _rows(path: Path) -> list[dict]:
    return list(store.read_jsonl(path)) if path.is_file() else []


def _preference_stats(rows: list[dict]) -> dict:
    probs = [float(r["chosen_prob"]) for r in rows if isinstance(r.get("chosen_prob"), (int, float))]
    consistent = [r["position_consistent"] for r in rows if isinstance(r.get("position_consistent"), bool)]
    stats: dict[str, Any] = {"pairs": len(rows)}
    if probs:
        stats.update(mean_chosen_prob=round(sum(probs) / len(probs), 4), hard_label_share=round(sum(p == 1 for p in probs) / len(probs), 4))
    if consistent:
        stats["position_consistent_rate"] = round(sum(consistent) / len(consistent), 4)
    stats["sources"] = dict(Counter(str(r.get("source", "unknown")) for r in rows))
    return stats


def _provenance(rows: list[dict]) -> tuple[Counter, Counter, Counter]:
    """(constitution (name, hash), model (stage, name), principle id) counts over the rows."""
    constitutions, models, principles = Counter(), Counter(), Counter()
    for row in rows:
        prov = row.get("provenance") if isinstance(row.get("provenance"), dict) else {}
        if prov.get("constitution_hash"):
            constitutions[(str(prov.get("constitution")), str(prov["constitution_hash"]))] += 1
        if prov.get("model"):
            models[(str(prov.get("stage")), str(prov["model"]))] += 1
        principles.update(str(p) for p in row.get("principle_ids") or [])
    return constitutions, models, principles


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_dataset_card(folder: str | Path, stage: str, constitution=None) -> Path:
    """Write `folder/README.md` for the critique, label or blend output in `folder`, from its data files,
    its `summary.json` (and `metrics.json` of `cai label eval`); `constitution` adds principle texts."""
    folder = Path(folder)
    layout = LAYOUTS[stage]
    loaded = {name: _rows(folder / name) for splits in layout.values() for name in splits.values()}
    counts = {name: len(rows) for name, rows in loaded.items()}
    configs = []
    for index, (config, splits) in enumerate(layout.items()):
        files = [{"split": split, "path": name} for split, name in splits.items() if counts[name]]
        if files:
            configs.append({"config_name": config, "data_files": files, **({"default": True} if index == 0 else {})})
    preference_rows = [row for name in ("preferences.jsonl", "train.jsonl", "eval.jsonl") for row in loaded.get(name, [])]
    sft_rows = loaded.get("sft.jsonl", [])
    constitutions, models, principles = _provenance(sft_rows or preference_rows)
    if constitution is not None:
        constitutions = Counter({(constitution.name, constitution.hash): max(1, sum(constitutions.values()))})
    summary = _read_json(folder / "summary.json")
    agreement = {k: v for k, v in _read_json(folder / "metrics.json").items() if k.startswith("agreement") or k == "human_file"}
    stats = {**_preference_stats(preference_rows), **{k: summary[k] for k in ("position_bias_rate", "ties", "dropped_ties",
             "dropped_low_confidence", "zero_mass_labels") if k in summary}, **agreement}
    license = _existing_license(folder)
    total = sum(counts.values())
    meta = {
        "license": license,
        "pretty_name": f"cai {stage}" + (f": {constitution.name}" if constitution is not None else ""),
        "tags": TAGS + {"critique": ["sl-cai", "synthetic", "sft", "dpo"], "label": ["synthetic", "preference", "dpo", "ai-feedback"],
                        "blend": ["preference", "dpo", "reward-modeling"]}[stage],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(total)],
        "configs": configs,
        "cai": {"stage": stage, "cai_version": __version__, "rows": counts,
                "constitutions": [{"name": n, "hash": h} for n, h in constitutions],
                "models": [{"stage": s, "model": m} for s, m in models], "label_stats": stats},
    }
    lines = [f"# {meta['pretty_name']}", "", DESCRIPTIONS[stage], "",
             f"Written by cai {__version__} (Constitutional AI / RLAIF toolkit).", "", _licence_line(license), "", "## Provenance", ""]
    for (name, digest), n in constitutions.items():
        lines.append(f"- **Constitution:** `{name}`, content hash `{digest}` ({n} rows)")
    if not constitutions:
        lines.append("- **Constitution:** none recorded in the rows (human comparisons only)")
    for (where, model), n in models.items():
        role = {"critique": "Generator", "label": "Labeller"}.get(where, f"Model ({where})")
        lines.append(f"- **{role} model:** {model_label(model)} ({n} rows)")
    if principles:
        texts = {}
        if constitution is not None:
            texts = {p.id: p.critique for p in constitution.principles} | {p.id: p.text for p in constitution.preferences}
        header, rows = (["principle", "rows", "text"], [[p, n, texts.get(p, "")] for p, n in principles.most_common()])
        lines += ["", "Principles the rows were made under (a row may list several):", "",
                  _table(header, rows) if texts else _table(header[:2], [r[:2] for r in rows])]
    lines += ["", "## Files", "", _table(["config", "split", "file", "rows"],
              [[c, s, f, counts[f]] for c, splits in layout.items() for s, f in splits.items()]),
              "", "Empty files are not listed in `configs`. Load them with:", "", "```python", "from datasets import load_dataset",
              "", f'pairs = load_dataset("THIS_FOLDER_OR_REPO")  # the {next(iter(layout))!r} config'
              + ('\nsft = load_dataset("THIS_FOLDER_OR_REPO", "sft")' if stage == "critique" else ""), "```",
              "", "Columns follow TRL: `prompt`/`chosen`/`rejected` (conversational) with `chosen_prob`, `source`, "
              "`principle_ids` and `provenance` (model, constitution hash, template hash, cai version)"
              + ("; `sft` rows hold `messages`." if stage == "critique" else ".")]
    if preference_rows:
        lines += ["", "## Label statistics", "", _table(["statistic", "value"], [[k, v] for k, v in stats.items()]),
                  "", "`mean_chosen_prob` (the labels' confidence), `hard_label_share` (pairs with `chosen_prob` 1), "
                  "`position_consistent_rate` (pairs whose two orders agreed) and `sources` are over the rows in this folder"
                  + ("; `position_bias_rate`, ties and drops over every labelled pair, before filtering" if "position_bias_rate" in stats else "")
                  + ("; `agreement_*`: agreement with the human labels of `human_file` (`cai label eval`)" if agreement else "") + "."]
    if stage == "blend" and summary.get("sources"):
        lines += ["", "## Sources", "", _table(["source", "read", "malformed skipped", "duplicates", "conflicts lost", "train", "test", "weight"],
                  [[s.get("source"), s.get("read"), s.get("malformed_skipped"), s.get("duplicates"), s.get("conflicts_lost"),
                    s.get("train"), s.get("eval"), s.get("weight")] for s in summary["sources"]])]
    elif summary:
        shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, list)) and k not in stats and k != "resumed"}
        lines += ["", "## Stage summary", "", _table(["figure", "value"], [[k, v] for k, v in shown.items()])]
    return _write(folder, meta, "\n".join(lines))


# -- model cards --------------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [item for key, sub in value.items() for item in _flatten(sub, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), value)]


def _headline(metrics: dict) -> dict:
    """The final figures worth a table: scalars and small dicts, not per-step logs."""
    shown = {k: v for k, v in metrics.items()
             if k not in ("history", "settings", "base_model", "stage", "data", "sft_adapter") and not isinstance(v, (list, tuple))}
    history = metrics.get("history")
    if history:
        last = history[-1]
        shown.update(steps=len(history), first_reward=history[0].get("reward"), last_reward=last.get("reward"),
                     last_kl=last.get("kl"), last_kl_coef=last.get("kl_coef"), last_response_length=last.get("response_length"))
    return shown


def write_model_card(adapter_dir: str | Path, meta: dict, metrics: dict) -> Path:
    """Write `adapter_dir/README.md` (after peft's save_pretrained, which writes its own) for a trained
    adapter. `meta`: stage, base_model, settings and, where known, data, rows/pairs/prompts, sft_adapter."""
    adapter_dir = Path(adapter_dir)
    stage = meta["stage"]
    method, explanation = METHODS.get(stage, (stage, f"cai's `{stage}` stage."))
    base = meta.get("base_model")
    license = _existing_license(adapter_dir)
    card: dict[str, Any] = {}
    if hub_model_id(base):
        card["base_model"] = hub_model_id(base)
    card.update({"library_name": "peft", "license": license,
                 "pipeline_tag": "text-classification" if stage == "rm" else "text-generation",
                 "tags": TAGS + ["peft", "lora", {"rm": "reward-model"}.get(stage, stage)]})
    if meta.get("datasets"):
        card["datasets"] = meta["datasets"]
    figures = _headline(metrics)
    card["cai"] = {"stage": stage, "method": method, "cai_version": __version__, "base_model": base,
                   "data": meta.get("data"), "metrics": {k: v for k, v in _flatten(figures) if not isinstance(v, (list, dict))}}
    loader = "AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"
    extra = ", num_labels=1" if stage == "rm" else ""
    lines = [f"# cai {method} adapter" + (f" for {hub_model_id(base)}" if hub_model_id(base) else ""), "",
             f"A LoRA adapter written by cai {__version__} (Constitutional AI / RLAIF toolkit).", "", _licence_line(license, "adapter"),
             "", "## Method", "", explanation, "", "## Base model and data", "",
             f"- **Base model:** {model_label(base)}"]
    if meta.get("sft_adapter"):
        lines.append(f"- **Started from:** the SFT adapter `{meta['sft_adapter']}`")
    if meta.get("data"):
        lines.append(f"- **Training data:** `{meta['data']}`")
    for key, label in (("rows", "SFT rows"), ("pairs", "preference pairs trained"), ("train_rows", "preference pairs"),
                       ("prompts", "prompts")):
        if metrics.get(key, meta.get(key)) is not None:
            lines.append(f"- **{label.capitalize()}:** {metrics.get(key, meta.get(key))}")
    lines += ["", "## Final metrics", "", _table(["metric", "value"], [[k, v] for k, v in _flatten(figures)]),
              "", "## Settings", "", _table(["setting", "value"], [[k, v] for k, v in _flatten(meta.get("settings") or {})]),
              "", "## Evaluation", "", _EVAL_START,
              "Not evaluated when this card was written. A recipe's `eval` stage writes `eval/metrics.json` beside the "
              "stage folder; `cai push` adds its figures here before uploading.", _EVAL_END,
              "", "## Use", "", "```python", "from peft import PeftModel", f"from transformers import {loader}", "",
              f'base = {loader}.from_pretrained("{hub_model_id(base) or "BASE_MODEL"}"{extra})',
              'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")', "```"]
    return _write(adapter_dir, card, "\n".join(lines))


def _eval_metrics_for(adapter_dir: Path) -> dict | None:
    """The eval stage's metrics of the run this adapter belongs to, when they evaluated this adapter's
    stage after it was saved (`<run>/<stage>/adapter` <- `<run>/eval/metrics.json`)."""
    stage_dir = adapter_dir.parent
    path = stage_dir.parent / "eval" / "metrics.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not path.is_file() or not weights.is_file() or path.stat().st_mtime < weights.stat().st_mtime:
        return None
    metrics = _read_json(path)
    return metrics if metrics.get("policy_stage") == stage_dir.name else None


def _rate(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("rate") is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['rate']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "") + f" (n={entry.get('n', '?')})"


def _trust(entry: Any) -> str:
    check = entry.get("judge_accuracy") if isinstance(entry, dict) else None
    if not isinstance(check, dict):
        return ""
    return ("UNRELIABLE: " if not check.get("reliable") else "") + f"judge accuracy {check.get('accuracy')}"


def add_eval_results(adapter_dir: str | Path, metrics: dict | None = None) -> bool:
    """Put the eval stage's headline figures (policy vs baseline) into the adapter's card; without
    `metrics`, those of the run's `eval/metrics.json` when it evaluated this adapter. True if added."""
    adapter_dir = Path(adapter_dir)
    metrics = metrics if metrics is not None else _eval_metrics_for(adapter_dir)
    card = read_card(adapter_dir)
    if not metrics or card is None or _EVAL_START not in card[1]:
        return False
    meta, body = card
    m = metrics
    rows = [["harmless rate (red-team)", _rate(m.get("harmless_rate_baseline")), _rate(m.get("harmless_rate_policy")),
             _trust(m.get("harmless_rate_policy"))],
            ["over-refusal rate (benign, judge)", _rate(m.get("over_refusal_rate_baseline")),
             _rate(m.get("over_refusal_rate_policy")), _trust(m.get("over_refusal_rate_policy"))],
            ["over-refusal rate (benign, phrase matcher)", _rate(m.get("over_refusal_rate_baseline_string_match")),
             _rate(m.get("over_refusal_rate_policy_string_match")), ""],
            ["labeller win rate over the baseline", "", _rate((m.get("win_rate_labeller") or {}).get("all")),
             _trust(m.get("win_rate_labeller"))],
            ["length-controlled win rate", "", _rate(m.get("win_rate_labeller_length_controlled")),
             _trust(m.get("win_rate_labeller_length_controlled"))],
            ["reward-model win rate (in-distribution)", "", _rate((m.get("win_rate_reward_model") or {}).get("all")), ""]]
    kl = m.get("kl_to_reference")
    if isinstance(kl, dict):
        rows.append([kl.get("label", "KL to the baseline"), "", f"{kl.get('mean')} nats/response", f"{kl.get('per_token')} nats/token"])
    rows = [r for r in rows if r[1] not in ("", "n/a") or r[2] not in ("", "n/a")]
    text = (f"Judge: `{Path(str(m.get('judge_model', '?'))).name}` ({m.get('judge_relation', 'relation unknown')}); baseline: "
            f"{m.get('baseline', '?')}; 95% intervals in brackets. Every figure is in the run's `eval/metrics.json` and `report.md`.\n\n"
            + _table(["metric", "baseline", "policy", "trust"], rows))
    start, end = body.index(_EVAL_START) + len(_EVAL_START), body.index(_EVAL_END)
    meta.setdefault("cai", {})["eval"] = {r[0]: r[2] for r in rows}
    _write(adapter_dir, meta, body[:start] + "\n" + text + "\n" + body[end:])
    return True
