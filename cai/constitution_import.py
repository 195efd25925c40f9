"""Import public constitution formats into cai's YAML.

    cai constitution import llm_swarm_constitution.json -o mine.yaml
    cai constitution import CritiqueRevisionInstructions.json RLMadisonInstructions.json \
        CritiqueRevisionFewShotPrompts.json -o anthropic.yaml

Formats (detected from content, not from file names):
- llm-swarm JSON: {"constitutions": [{"critic", "revision"}], "system_chat": [[messages]]}, each chat the
  conversation up to the answer (one or more user turns) then critique request, critique, revision
  request, revision.
- The CAI paper's prompt files: CritiqueRevisionInstructions.json ({name: {"prompt": [critique],
  "edit_request": revision}}, texts wrapped in "CritiqueRequest:/Critique:" markers, which are
  stripped), RLMadisonInstructions.json (a list of comparison principles ending in "Options:"),
  and few-shot transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nCritiqueRequest: ...").

The result is built as plain data and validated by the same loader users' files go through,
so an import that succeeds always loads.
"""

from __future__ import annotations

import re
from pathlib import Path

from cai import store, yamlio
from cai.constitution import Constitution, constitution_from_document
from cai.errors import CaiError

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")


def import_files(paths: list[str | Path], name: str | None = None) -> Constitution:
    data: dict = {"name": name or Path(paths[0]).stem, "principles": [], "preferences": [], "few_shot": []}
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            _import_one(file, data)
    if not data["principles"]:
        raise CaiError(
            "no critique/revision principles found in the sources (an llm-swarm JSON or "
            "CritiqueRevisionInstructions.json is needed)",
            source=", ".join(map(str, paths)),
        )
    data = {key: value for key, value in data.items() if value}
    text = yamlio.dump(data)
    return constitution_from_document(yamlio.loads(text, source=f"import of {paths[0]}"))


def _import_one(file: Path, data: dict) -> None:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaiError("file not found", source=str(file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CaiError(f"cannot read: {exc}", source=str(file)) from None
    raw = store.parse_json(text, str(file))
    if isinstance(raw, dict) and "constitutions" in raw:
        _llm_swarm(raw, data, str(file))
    elif isinstance(raw, dict) and raw and all(isinstance(v, dict) and "edit_request" in v for v in raw.values()):
        _anthropic_instructions(raw, data, str(file))
    elif isinstance(raw, list) and raw and all(isinstance(s, str) for s in raw):
        if all(s.rstrip().endswith("Options:") for s in raw):
            _anthropic_preferences(raw, data)
        elif all("CritiqueRequest:" in s for s in raw):
            for index, transcript in enumerate(raw):
                data["few_shot"].append(parse_transcript(transcript, f"{file}[{index}]"))
        else:
            raise CaiError(
                "a list of strings, but neither comparison principles (ending in 'Options:') nor "
                "critique/revision transcripts (with 'CritiqueRequest:')",
                source=str(file),
            )
    else:
        raise CaiError(
            "unrecognised format: expected an llm-swarm constitution JSON or one of the CAI paper's prompt files",
            source=str(file),
        )


def _llm_swarm(raw: dict, data: dict, source: str) -> None:
    items = raw.get("constitutions")
    if not isinstance(items, list):
        raise CaiError("must be a list", source=source, field="constitutions")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not {"critic", "revision"} <= set(item):
            raise CaiError("needs 'critic' and 'revision'", source=source, field=f"constitutions[{index}]")
        data["principles"].append(
            {"id": _unique_id(data["principles"], f"principle-{index + 1:02d}"), "critique": item["critic"], "revision": item["revision"]}
        )
    chats = raw.get("system_chat") or []
    if not isinstance(chats, list):
        raise CaiError("must be a list of few-shot conversations", source=source, field="system_chat")
    for index, chat in enumerate(chats):
        data["few_shot"].append(_llm_swarm_chat(chat, source, f"system_chat[{index}]"))


def _llm_swarm_chat(chat, source: str, field: str) -> dict:
    """One few-shot conversation: any number of user/assistant turns up to the answer, then
    critique request, critique, revision request, revision (six messages for a one-turn prompt)."""
    if not isinstance(chat, list) or len(chat) < 6 or len(chat) % 2 or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in chat
    ):
        raise CaiError(
            "must be an even number (>= 6) of messages: the conversation up to the answer, then critique request, "
            "critique, revision request, revision", source=source, field=field,
        )
    roles = [m.get("role") for m in chat]
    if roles != ["user", "assistant"] * (len(chat) // 2):
        raise CaiError(f"roles must alternate user/assistant, got {roles}", source=source, field=field)
    conversation, answer = chat[:-5], chat[-5]["content"]
    critique_request, critique, revision_request, revision = (m["content"] for m in chat[-4:])
    head: dict = (
        {"prompt": conversation[0]["content"]} if len(conversation) == 1
        else {"messages": [{"role": m["role"], "content": m["content"]} for m in conversation]}
    )
    return {
        **head,
        "response": answer,
        "critique_request": critique_request,
        "critique": critique,
        "revision_request": revision_request,
        "revision": revision,
    }


def _anthropic_instructions(raw: dict, data: dict, source: str) -> None:
    for name, item in raw.items():
        prompts = item.get("prompt")
        critique = prompts[0] if isinstance(prompts, list) and prompts else prompts
        if not isinstance(critique, str) or not isinstance(item.get("edit_request"), str):
            raise CaiError("needs a 'prompt' text and an 'edit_request' text", source=source, field=name)
        data["principles"].append(
            {
                "id": _unique_id(data["principles"], _slug(name)),
                "critique": _strip_markers(critique, "CritiqueRequest", "Critique"),
                "revision": _strip_markers(item["edit_request"], "RevisionRequest", "Revision"),
            }
        )


def _anthropic_preferences(raw: list[str], data: dict) -> None:
    for index, text in enumerate(raw):
        body = text.strip()
        body = body[: -len("Options:")].rstrip()
        data["preferences"].append({"id": _unique_id(data["preferences"], f"preference-{index + 1:02d}"), "text": body})


def parse_transcript(transcript: str, source: str) -> dict:
    """A "Human:/Assistant:/CritiqueRequest:/..." transcript -> one few-shot item."""
    markers = list(_TURN.finditer(transcript))
    turns = []
    for current, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following else len(transcript)
        turns.append((current.group(1), transcript[current.end() : end].strip()))
    while turns and turns[-1][0] == "Human" and not turns[-1][1]:
        turns.pop()  # the trailing "Human:" that invites the next example
    labels = [label for label, _ in turns]
    if labels[-4:] != ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"] or len(turns) < 6:
        raise CaiError("must end with CritiqueRequest, Critique, RevisionRequest, Revision turns", source=source)
    conversation, (critique_request, critique, revision_request, revision) = turns[:-4], [t for _, t in turns[-4:]]
    if conversation[-1][0] != "Assistant" or conversation[0][0] != "Human":
        raise CaiError("the conversation must start with Human: and end with Assistant:", source=source)
    messages = [{"role": "user" if label == "Human" else "assistant", "content": text} for label, text in conversation[:-1]]
    if any(not m["content"] for m in messages) or not conversation[-1][1]:
        raise CaiError("has an empty turn", source=source)
    item: dict = {"prompt": messages[0]["content"]} if len(messages) == 1 else {"messages": messages}
    item.update(
        response=conversation[-1][1],
        critique_request=critique_request,
        critique=critique,
        revision_request=revision_request,
        revision=revision,
    )
    return item


def _strip_markers(text: str, request_marker: str, answer_marker: str) -> str:
    body = text.strip()
    if body.startswith(f"{request_marker}:"):
        body = body[len(request_marker) + 1 :]
    body = body.strip()
    if body.endswith(f"{answer_marker}:"):
        body = body[: -len(answer_marker) - 1]
    return body.strip()


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "principle"


def _unique_id(existing: list[dict], candidate: str) -> str:
    taken = {item["id"] for item in existing}
    candidate = candidate[:60]
    unique, counter = candidate, 2
    while unique in taken:
        unique, counter = f"{candidate}-{counter}", counter + 1
    return unique
