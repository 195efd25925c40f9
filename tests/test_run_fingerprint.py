"""`cai run` reruns exactly the stages whose inputs changed: edits to the constitution, prompt
files, templates and blend sources count, as content; unchanged reruns skip everything.

The stage bodies are replaced by recorders so the test exercises the real fingerprints and skip
logic in seconds; test_recipes.py runs the real stages on the tiny model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cai.recipe import STAGES, load_recipe
from cai.run import RecipeRunner

ROOT = Path(__file__).resolve().parent.parent
ALL = ["critique", "sft", "sample", "label", "blend", "rm", "dpo", "eval"]

RECIPE = """\
name: fp
output_dir: {out}
constitution: {work}/harmless.yaml
stages: [critique, sft, sample, label, blend, rm, dpo, eval]
critique:
  prompts: [{{path: {work}/red_team.jsonl}}]
  prompt_dir: {work}/templates
sample:
  prompts: [{{path: {work}/sample.jsonl}}]
blend:
  sources: [{{path: {work}/human.jsonl, weight: 0.5}}]
eval:
  red_team: [{{path: cai/data/prompts/eval_red_team.jsonl, limit: 3}}]
  benign: [{{path: cai/data/prompts/eval_benign.jsonl, limit: 3}}]
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", work / "harmless.yaml")
    shutil.copy(ROOT / "cai" / "data" / "prompts" / "red_team.jsonl", work / "red_team.jsonl")
    shutil.copy(ROOT / "cai" / "data" / "prompts" / "benign.jsonl", work / "sample.jsonl")
    shutil.copy(ROOT / "cai" / "data" / "human" / "hh_pairs.jsonl", work / "human.jsonl")
    (work / "templates").mkdir()
    shutil.copy(ROOT / "prompts" / "critique.jinja", work / "templates" / "critique.jinja")
    recipe = tmp_path / "fp.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "run", work=work))
    ran: list[str] = []
    for stage in STAGES:
        monkeypatch.setattr(RecipeRunner, f"_{stage}", lambda self, stage=stage: ran.append(stage) or {})

    def rerun() -> list[str]:
        ran.clear()
        RecipeRunner(load_recipe(recipe), log=lambda line: None).run()
        return list(ran)

    assert rerun() == ALL
    assert rerun() == []  # nothing edited: everything skips
    return work, rerun


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_editing_one_principle_reruns_from_critique(setup):
    work, rerun = setup
    edit(work / "harmless.yaml", "even indirectly.", "even indirectly or by omission.")
    assert rerun() == ALL
    assert rerun() == []


def test_a_comment_in_the_constitution_changes_nothing(setup):
    work, rerun = setup
    edit(work / "harmless.yaml", "principles:\n", "# reviewed by the safety team\nprinciples:\n")
    assert rerun() == []


def test_edited_prompt_file_reruns_its_stage_and_the_ones_after(setup):
    work, rerun = setup
    with (work / "sample.jsonl").open("a") as handle:
        handle.write('{"id": "extra", "prompt": "What is a good name for a cat?"}\n')
    assert rerun() == ["sample", "label", "blend", "rm", "dpo", "eval"]


def test_edited_template_reruns_from_critique(setup):
    work, rerun = setup
    (work / "templates" / "critique.jinja").write_text((work / "templates" / "critique.jinja").read_text() + "\nBe specific.")
    assert rerun() == ALL


def test_edited_blend_source_reruns_from_blend(setup):
    work, rerun = setup
    lines = (work / "human.jsonl").read_text().splitlines(keepends=True)
    (work / "human.jsonl").write_text("".join(lines[:-1]))
    assert rerun() == ["blend", "rm", "dpo", "eval"]
