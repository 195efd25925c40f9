"""Constitutions: the YAML files users edit to steer critique, revision and AI labelling.

    from cai.constitution import load_constitution
    constitution = load_constitution("constitutions/harmless.yaml")
    sampler = constitution.sampler(seed=0)
    sampler.principles("prompt-id", rounds=4)   # weighted, no repeats within one sample

Loading validates against `cai/schemas/constitution.schema.json`, then checks what a schema
cannot (duplicate ids, few-shot examples that point at missing principles). Every error names
the file, the line and the field. `constitution.hash` is a digest of the validated content, not
of the file's bytes, so reformatting or comments do not change it; it goes into every record.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cai import schema, yamlio
from cai.errors import CaiError


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    tags: tuple[str, ...] = ()
    weight: float = 1.0


@dataclass(frozen=True)
class PreferencePrinciple:
    id: str
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class FewShotExample:
    """One worked critique/revision exchange, shown before every request."""

    messages: tuple[dict, ...]  # the conversation up to the response: user turns and earlier replies
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    system: str | None
    principles: tuple[Principle, ...]
    preferences: tuple[PreferencePrinciple, ...]
    few_shot: tuple[FewShotExample, ...]
    hash: str
    source: str = ""

    def principle(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        raise CaiError(f"no principle with id '{principle_id}'", source=self.source)

    def sampler(self, seed: int) -> "PrincipleSampler":
        return PrincipleSampler(self, seed)


@dataclass(frozen=True)
class PrincipleSampler:
    """Seeded, weighted principle draws, independent per sample.

    Each sample key (a prompt id) gets its own generator derived from (seed, key), so a draw
    does not depend on the order prompts are processed in, on batch sizes, or on which rows a
    resumed run still has to do.
    """

    constitution: Constitution
    seed: int

    def principles(self, key: str, rounds: int) -> list[Principle]:
        return _weighted_draw(self.constitution.principles, rounds, self._rng("critique", key))

    def preferences(self, key: str, count: int = 1) -> list[PreferencePrinciple]:
        if not self.constitution.preferences:
            raise CaiError(
                "has no 'preferences' (comparison principles), which AI labelling needs",
                source=self.constitution.source,
                field="preferences",
            )
        return _weighted_draw(self.constitution.preferences, count, self._rng("preference", key))

    def _rng(self, purpose: str, key: str) -> random.Random:
        return random.Random(f"{self.seed}:{purpose}:{key}")


def _weighted_draw(items: Sequence, count: int, rng: random.Random) -> list:
    """Draw `count` items by weight, without replacement while distinct items remain.

    When `count` exceeds the number of items, the pool is refilled once exhausted, and the
    draw never returns the same item twice in a row (a critique round repeating the previous
    round's principle teaches nothing new).
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    chosen: list = []
    pool = list(items)
    while len(chosen) < count:
        if not pool:
            pool = [item for item in items if len(items) == 1 or item is not chosen[-1]]
        pick = rng.choices(range(len(pool)), weights=[item.weight for item in pool])[0]
        chosen.append(pool.pop(pick))
    return chosen


def load_constitution(path: str | Path) -> Constitution:
    document = yamlio.load(path)
    return constitution_from_document(document)


def loads_constitution(text: str, source: str = "<string>") -> Constitution:
    return constitution_from_document(yamlio.loads(text, source))


def constitution_from_document(document: yamlio.LocatedYaml) -> Constitution:
    if not isinstance(document.data, dict):
        raise CaiError("a constitution must be a YAML mapping with 'name' and 'principles'", source=document.source)
    schema.validate_located("constitution", document)
    data = document.data
    _check_unique_ids(document, "principles")
    _check_unique_ids(document, "preferences")
    principles = tuple(
        Principle(
            id=p["id"],
            critique=p["critique"].strip(),
            revision=p["revision"].strip(),
            tags=tuple(p.get("tags", ())),
            weight=float(p.get("weight", 1.0)),
        )
        for p in data["principles"]
    )
    by_id = {p.id: p for p in principles}
    preferences = tuple(
        PreferencePrinciple(id=p["id"], text=p["text"].strip(), weight=float(p.get("weight", 1.0)))
        for p in data.get("preferences", ())
    )
    few_shot = tuple(_few_shot(document, index, item, by_id) for index, item in enumerate(data.get("few_shot", ())))
    return Constitution(
        name=data["name"].strip(),
        version=str(data.get("version", "")),
        description=str(data.get("description", "")).strip(),
        system=data["system"].strip() if data.get("system") else None,
        principles=principles,
        preferences=preferences,
        few_shot=few_shot,
        hash=content_hash(data),
        source=document.source,
    )


def content_hash(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_unique_ids(document: yamlio.LocatedYaml, section: str) -> None:
    seen: dict[str, int] = {}
    for index, item in enumerate(document.data.get(section, ())):
        if item["id"] in seen:
            raise document.error(
                f"duplicate id '{item['id']}' (first used by {section}[{seen[item['id']]}])", [section, index, "id"]
            )
        seen[item["id"]] = index


def _few_shot(document: yamlio.LocatedYaml, index: int, item: dict, by_id: dict[str, Principle]) -> FewShotExample:
    path = ["few_shot", index]
    if ("prompt" in item) == ("messages" in item):
        raise document.error("give exactly one of 'prompt' or 'messages'", path)
    if "prompt" in item:
        messages = ({"role": "user", "content": item["prompt"].strip()},)
    else:
        messages = tuple({"role": m["role"], "content": m["content"].strip()} for m in item["messages"])
        if messages[-1]["role"] != "user":
            raise document.error("must end with a user message", [*path, "messages"])
    if "principle" in item:
        if "critique_request" in item or "revision_request" in item:
            raise document.error("give either 'principle' or the two request texts, not both", path)
        if item["principle"] not in by_id:
            raise document.error(f"unknown principle id '{item['principle']}'", [*path, "principle"])
        principle = by_id[item["principle"]]
        critique_request, revision_request = principle.critique, principle.revision
    elif "critique_request" in item and "revision_request" in item:
        critique_request, revision_request = item["critique_request"].strip(), item["revision_request"].strip()
    else:
        raise document.error("needs 'principle' or both 'critique_request' and 'revision_request'", path)
    return FewShotExample(
        messages=messages,
        response=item["response"].strip(),
        critique_request=critique_request,
        critique=item["critique"].strip(),
        revision_request=revision_request,
        revision=item["revision"].strip(),
    )


def to_yaml_data(constitution: Constitution) -> dict:
    """The plain-data form (as a YAML file would hold it)."""
    data: dict = {"name": constitution.name}
    if constitution.version:
        data["version"] = constitution.version
    if constitution.description:
        data["description"] = constitution.description
    if constitution.system:
        data["system"] = constitution.system
    data["principles"] = [_principle_data(p) for p in constitution.principles]
    if constitution.preferences:
        data["preferences"] = [
            {"id": p.id, "text": p.text, **({"weight": p.weight} if p.weight != 1.0 else {})}
            for p in constitution.preferences
        ]
    if constitution.few_shot:
        data["few_shot"] = [_few_shot_data(example) for example in constitution.few_shot]
    return data


def _principle_data(principle: Principle) -> dict:
    data: dict = {"id": principle.id, "critique": principle.critique, "revision": principle.revision}
    if principle.tags:
        data["tags"] = list(principle.tags)
    if principle.weight != 1.0:
        data["weight"] = principle.weight
    return data


def _few_shot_data(example: FewShotExample) -> dict:
    if len(example.messages) == 1:
        head: dict = {"prompt": example.messages[0]["content"]}
    else:
        head = {"messages": [dict(m) for m in example.messages]}
    return {
        **head,
        "response": example.response,
        "critique_request": example.critique_request,
        "critique": example.critique,
        "revision_request": example.revision_request,
        "revision": example.revision,
    }
