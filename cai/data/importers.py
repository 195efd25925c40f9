"""Import human (or other) comparisons into cai's preference record.

    from cai.data.importers import load_preferences
    records = load_preferences("hh.jsonl.gz")                       # format detected per file
    records = load_preferences("pairs.csv", columns={"prompt": "q", "chosen": "good", "rejected": "bad"})

Every format ends as the record `cai/schemas/preference.schema.json` describes (TRL
conversational `prompt`/`chosen`/`rejected` plus `chosen_prob` and `source`), so TRL's
RewardTrainer and DPOTrainer read the output without renaming columns.

Formats:
- `hh`: HH-RLHF transcripts `{"chosen", "rejected"}`, each "\\n\\nHuman: ...\\n\\nAssistant: ...";
  the turns both share up to the final Assistant turn are the prompt. `.jsonl.gz` is read directly.
- `trl`: `prompt`/`chosen`/`rejected` as strings (standard) or message lists (conversational).
- `ultrafeedback`: `prompt` string, `chosen`/`rejected` as whole conversations (user + assistant),
  `score_chosen`/`score_rejected` kept under `scores`.
- `columns`: any CSV/JSONL with a column map (`prompt`, `chosen`, `rejected`, optional `chosen_prob`).
A malformed row is never dropped silently: by default the import fails naming every bad line
(up to ten); with `skip_malformed=True` they are skipped and listed in the report.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cai import schema
from cai.csvio import read_csv
from cai.errors import CaiError
from cai.store import parse_json, parse_jsonl, stable_id

FORMATS = ("auto", "cai", "hh", "trl", "ultrafeedback", "columns")
_CAI_KEYS = {"id", "prompt", "chosen", "rejected", "chosen_prob", "source", "provenance"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class ImportReport:
    source: str
    format: str
    rows_read: int = 0
    imported: int = 0
    malformed: list[str] = field(default_factory=list)  # "file:row: reason", for messages
    malformed_rows: list[dict] = field(default_factory=list)  # {"row", "reason"}, for summaries


class MalformedRow(ValueError):
    pass


def load_preferences(
    source: str,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    name: str | None = None,
    split: str = "train",
    skip_malformed: bool = False,
) -> tuple[list[dict], ImportReport]:
    if format not in FORMATS:
        raise CaiError(f"unknown format '{format}' (choose {', '.join(FORMATS)})", field="format")
    rows = list(_read_rows(source, split))
    if not rows:
        raise CaiError("contains no rows", source=source)
    if columns:
        format = "columns"
    elif format == "auto":
        format = detect_format(rows[0][1], source)
    source_name = name or _default_name(source)
    report = ImportReport(source=source, format=format, rows_read=len(rows))
    if format == "cai":  # cai's own output (AI labels, SL-CAI pairs): kept as written, only validated
        for number, row in rows:
            schema.validate_record("preference", row, f"{source}:{number}")
        report.imported = len(rows)
        return [row for _, row in rows], report
    records = []
    for number, row in rows:
        where = f"{source}:{number}"
        try:
            record = _convert(row, format, columns or {})
        except MalformedRow as exc:
            report.malformed.append(f"{where}: {exc}")
            report.malformed_rows.append({"row": number, "reason": str(exc)})
            continue
        record.update(
            id=stable_id(record["prompt"], record["chosen"], record["rejected"]),
            source=source_name,
            provenance={"stage": "import", "format": format, "file": source, "line": number},
        )
        record = {key: record[key] for key in ("id", "prompt", "chosen", "rejected", "chosen_prob", "source", *(("scores",) if "scores" in record else ()), "provenance")}
        schema.validate_record("preference", record, where)
        records.append(record)
    if report.malformed and not skip_malformed:
        shown = "; ".join(report.malformed[:10])
        more = f" (and {len(report.malformed) - 10} more)" if len(report.malformed) > 10 else ""
        raise CaiError(f"{len(report.malformed)} malformed row(s): {shown}{more}", source=source)
    report.imported = len(records)
    return records, report


def detect_format(row: Any, source: str) -> str:
    if not isinstance(row, dict):
        raise CaiError("rows must be objects", source=source)
    keys = {str(key) for key in row}  # CSV rows with extra fields carry a None key
    if _CAI_KEYS <= keys:
        return "cai"
    if {"chosen", "rejected"} <= keys and "prompt" not in keys:
        if isinstance(row["chosen"], str) and "Assistant:" in row["chosen"]:
            return "hh"
    if {"prompt", "chosen", "rejected"} <= keys:
        if "score_chosen" in keys or _starts_with_user(row["chosen"]):
            return "ultrafeedback"
        return "trl"
    raise CaiError(
        f"cannot tell the format from columns {sorted(keys)}: expected HH-RLHF (chosen/rejected transcripts), "
        "TRL (prompt/chosen/rejected) or UltraFeedback; or pass a column map",
        source=source,
    )


def _starts_with_user(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and value[0].get("role") == "user"


# -- readers ---------------------------------------------------------------------------------------


def _default_name(source: str) -> str:
    name = Path(source).name
    for suffix in (".gz", ".jsonl", ".json", ".csv"):
        name = name.removesuffix(suffix)
    return name or "human"


def _read_rows(source: str, split: str) -> Iterable[tuple[int, Any]]:
    path = Path(source)
    if path.is_file():
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
            raise CaiError(f"cannot read: {exc}", source=source) from None
        name = path.name.removesuffix(".gz")
        if name.endswith(".csv"):
            return read_csv(text, source)
        if name.endswith(".json"):
            data = parse_json(text, source)
            if not isinstance(data, list):
                raise CaiError("a JSON file must hold a list of rows", source=source)
            return list(enumerate(data, 1))
        return parse_jsonl(text, source, objects=False)  # split on "\n" only: rows may hold U+2028
    if path.is_dir() or "/" in source:
        try:
            import datasets

            if path.is_dir() and (path / "dataset_info.json").exists():
                dataset = datasets.load_from_disk(source)
                dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
            else:
                dataset = datasets.load_dataset(source, split=split)
        except Exception as exc:  # datasets raises many types for missing/offline/malformed sources
            raise CaiError(f"cannot load dataset: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", source=source) from None
        return list(enumerate(dataset, 1))
    raise CaiError("file not found", source=source)


# -- converters -------------------------------------------------------------------------------------


def _convert(row: Any, format: str, columns: dict[str, str]) -> dict:
    if not isinstance(row, dict):
        raise MalformedRow("not an object")
    if format == "hh":
        return _from_hh(row)
    if format == "trl":
        return _from_trl(row)
    if format == "ultrafeedback":
        return _from_ultrafeedback(row)
    return _from_columns(row, columns)


def parse_transcript(text: Any) -> list[dict]:
    if not isinstance(text, str):
        raise MalformedRow("transcript is not a string")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    markers = list(_HH_TURN.finditer(text))
    if not markers or markers[0].start() != 0:
        raise MalformedRow("does not start with a Human: or Assistant: turn")
    turns = []
    for current, following in zip(markers, markers[1:] + [None]):
        content = text[current.end() : following.start() if following else len(text)].strip()
        turns.append({"role": "user" if current.group(1) == "Human" else "assistant", "content": content})
    return turns


def _from_hh(row: dict) -> dict:
    if "chosen" not in row or "rejected" not in row:
        raise MalformedRow("needs 'chosen' and 'rejected' transcripts")
    chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
    for turns, name in ((chosen, "chosen"), (rejected, "rejected")):
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise MalformedRow(f"'{name}' does not end with an Assistant turn")
        if not turns[-1]["content"]:
            raise MalformedRow(f"'{name}' has an empty final Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise MalformedRow("'chosen' and 'rejected' differ before the final Assistant turn")
    prompt = chosen[:-1]
    if prompt[-1]["role"] != "user" or any(not t["content"] for t in prompt):
        raise MalformedRow("the shared conversation must end with a non-empty Human turn")
    return _record(prompt, chosen[-1]["content"], rejected[-1]["content"])


def _messages(value: Any, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant" if name != "prompt" else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise MalformedRow(f"'{name}' must be a string or a non-empty list of messages")
    out = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
            raise MalformedRow(f"'{name}' has a message without a valid role and text content")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _from_trl(row: dict) -> dict:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise MalformedRow(f"missing '{key}'")
    prompt = _messages(row["prompt"], "prompt")
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if len(chosen) != 1 or len(rejected) != 1 or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise MalformedRow("'chosen' and 'rejected' must each hold one assistant answer")
    return _record(prompt, chosen[0]["content"], rejected[0]["content"], row.get("chosen_prob"))


def _from_ultrafeedback(row: dict) -> dict:
    chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise MalformedRow("'chosen' and 'rejected' must end with the assistant answer")
    prompt = chosen[:-1] or _messages(row.get("prompt"), "prompt")
    record = _record(prompt, chosen[-1]["content"], rejected[-1]["content"])
    scores = {k.removeprefix("score_"): row[k] for k in ("score_chosen", "score_rejected") if isinstance(row.get(k), (int, float))}
    if scores:
        record["scores"] = scores
    return record


def _from_columns(row: dict, columns: dict[str, str]) -> dict:
    mapped = {}
    for role in ("prompt", "chosen", "rejected"):
        column = columns.get(role, role)
        if column not in row:
            raise MalformedRow(f"no '{column}' column (columns: {', '.join(sorted(map(str, row)))})")
        mapped[role] = row[column]
    probability = row.get(columns["chosen_prob"]) if "chosen_prob" in columns else None
    return _from_trl({**mapped, **({"chosen_prob": probability} if probability is not None else {})})


def _record(prompt: list[dict], chosen: str, rejected: str, chosen_prob: Any = None) -> dict:
    if not chosen.strip() or not rejected.strip():
        raise MalformedRow("empty answer")
    if prompt[-1]["role"] != "user":
        raise MalformedRow("the prompt must end with a user turn")
    probability = 1.0
    if chosen_prob not in (None, ""):
        try:
            probability = float(chosen_prob)
        except (TypeError, ValueError):
            raise MalformedRow(f"chosen_prob '{chosen_prob}' is not a number") from None
        if not 0.5 <= probability <= 1.0:
            raise MalformedRow(f"chosen_prob {probability} must be in [0.5, 1] (swap chosen and rejected otherwise)")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_prob": probability,
    }
