"""Dataset and model cards (cai/cards.py) and sharing on the Hub (cai/hub.py, `cai push`).

No network: the hub client is a stub that records calls (`FakeApi`), and the files it would upload
are worked out with huggingface_hub's own pattern filter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai import cards, hub
from cai.blend import SourceSpec, blend
from cai.constitution import loads_constitution
from cai.critique import CritiqueRun, CritiqueSettings
from cai.engines.base import ChoiceScores, Generation, SamplingSettings
from cai.errors import CaiError
from cai.labeling import LabelRun, LabelSettings, Pair
from cai.prompt_sets import Prompt
from cai.prompts import PromptSet
from cai.store import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
CONSTITUTION = """\
name: card-test
principles:
  - {id: harm, critique: Point out harm., revision: Remove the harm.}
  - {id: kind, critique: "Was it unkind?", revision: Be kind.}
preferences:
  - {id: less-harmful, text: "Which response is less harmful?"}
"""


@pytest.fixture
def constitution():
    return loads_constitution(CONSTITUTION, "card-test.yaml")


class Reviser:
    """Answers, critiques and revises by rule: every revision passes cai's quality filters."""

    name, model = "scripted", "scripted-generator"

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        out = []
        for prompt in prompts:
            question = next(m["content"] for m in prompt.messages if m["content"].startswith("question"))
            last = prompt.messages[-1]["content"]
            if len(prompt.messages) <= 2:
                text = f"first answer to {question}"
            elif "Reply with the rewritten" not in last:
                text = "The answer is curt and should explain more."
            else:
                text = f"A careful, complete and kind reply to {question}, with reasons."
            out.append(Generation([text], 10, [5], ["stop"]))
        return out


class KnowsBest:
    """A labeller that prefers the answer containing "good", in either slot."""

    name, model = "knows-best", "knows-best-labeller"

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        return [Generation(["(A)"], 10, [1], ["stop"]) for _ in prompts]

    def score_choices(self, prompts, choices, adapter=None):
        def first_is_good(prompt):
            content = prompt.messages[-1]["content"]
            return "good" in content[content.index("(A) ") + 4:].split("\n")[0]

        return ChoiceScores([[0.8, 0.2] if first_is_good(p) else [0.2, 0.8] for p in prompts], [0.9] * len(prompts))


def critique_folder(constitution, out: Path, n: int = 6) -> Path:
    prompts = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"question {i} about bread"},)) for i in range(n)]
    settings = CritiqueSettings(rounds=1, sampling=SamplingSettings(temperature=1.0, max_tokens=12), drop_truncated=False)
    CritiqueRun(Reviser(), constitution, prompts, PromptSet(), out, settings, show_progress=False).run()
    return out


def label_folder(constitution, out: Path, n: int = 6) -> Path:
    pairs = [Pair(f"pair{i}", ({"role": "user", "content": f"How do I stay safe, case {i}?"},),
                  f"good answer {i}: wear lights", f"bad answer {i}: close your eyes") for i in range(n)]
    LabelRun(KnowsBest(), constitution, pairs, PromptSet(), out, LabelSettings(), show_progress=False).run()
    return out


def front_matter(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def load(folder: Path, *args, **kwargs):
    import datasets

    return datasets.load_dataset(str(folder), *args, **kwargs)


# -- dataset cards -----------------------------------------------------------------------------------------


def test_critique_card_counts_constitution_and_two_loadable_configs(constitution, tmp_path):
    folder = critique_folder(constitution, tmp_path / "critique")
    sft, pairs = list(read_jsonl(folder / "sft.jsonl")), list(read_jsonl(folder / "preferences.jsonl"))
    assert len(sft) == len(pairs) == 6
    meta, body = front_matter(folder)
    assert meta["license"] == "other" and {"constitutional-ai", "rlaif", "cai"} <= set(meta["tags"])
    assert meta["task_categories"] == ["text-generation"] and meta["size_categories"] == ["n<1K"]
    assert meta["cai"]["rows"] == {"preferences.jsonl": 6, "sft.jsonl": 6}
    assert meta["cai"]["constitutions"] == [{"name": "card-test", "hash": constitution.hash}]
    assert meta["cai"]["models"] == [{"stage": "critique", "model": "scripted-generator"}]
    assert constitution.hash in body and "**Generator model:** `scripted-generator` (6 rows)" in body
    assert "| harm |" in body or "| kind |" in body  # the principles the rows used, with their text
    assert "Point out harm." in body or "Was it unkind?" in body
    # `configs` make datasets read the two files as two configs, preferences by default, and
    # leave trace.jsonl and work/*.jsonl alone.
    assert [c["config_name"] for c in meta["configs"]] == ["preferences", "sft"] and meta["configs"][0]["default"]
    default = load(folder)
    assert list(default) == ["train"] and default["train"].num_rows == 6
    assert {"prompt", "chosen", "rejected", "chosen_prob"} <= set(default["train"].column_names)
    assert "messages" not in default["train"].column_names
    sft_config = load(folder, "sft", split="train")
    assert sft_config.num_rows == 6 and "messages" in sft_config.column_names and "chosen" not in sft_config.column_names


def test_label_card_has_label_statistics_and_agreement(constitution, tmp_path):
    folder = label_folder(constitution, tmp_path / "label")
    summary = json.loads((folder / "summary.json").read_text())
    meta, body = front_matter(folder)
    stats = meta["cai"]["label_stats"]
    assert stats["pairs"] == summary["kept"] == 6
    assert stats["mean_chosen_prob"] == pytest.approx(summary["mean_chosen_prob"]) == pytest.approx(0.8)
    assert stats["position_bias_rate"] == summary["position_bias_rate"] == 0.0
    assert stats["position_consistent_rate"] == 1.0 and stats["sources"] == {"ai": 6}
    assert meta["cai"]["constitutions"][0]["hash"] == constitution.hash and constitution.hash in body
    assert "Labeller model:** `knows-best-labeller`" in body and "Which response is less harmful?" in body
    assert "## Label statistics" in body and "| mean_chosen_prob | 0.8 |" in body
    rows = load(folder, split="train")
    assert rows.num_rows == 6 and rows[0]["chosen"][0]["content"].startswith("good answer")
    # `cai label eval` writes metrics.json and rewrites the card: the agreement figures appear.
    (folder / "metrics.json").write_text(json.dumps({"human_file": "hh.jsonl", "agreement_swap_averaged": 0.75,
                                                     "agreement_single_order": 0.5}))
    cards.write_dataset_card(folder, "label", constitution)
    meta, body = front_matter(folder)
    assert meta["cai"]["label_stats"]["agreement_swap_averaged"] == 0.75 and "| agreement_single_order | 0.5 |" in body


def test_blend_card_lists_sources_and_loads_train_and_test(constitution, tmp_path):
    labels = label_folder(constitution, tmp_path / "label", n=10)
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(10)))
    out = tmp_path / "blend"
    summary = blend([SourceSpec(str(labels / "preferences.jsonl")), SourceSpec(str(human))], out, eval_fraction=0.5)
    meta, body = front_matter(out)
    assert meta["cai"]["rows"] == {"train.jsonl": summary["train"], "eval.jsonl": summary["eval"]}
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "train.jsonl"},
                                                                         {"split": "test", "path": "eval.jsonl"}], "default": True}]
    assert meta["cai"]["label_stats"]["sources"] == {"ai": 10, "human": 10}
    assert meta["cai"]["constitutions"][0]["hash"] == constitution.hash  # from the AI rows' provenance
    assert "## Sources" in body and str(human) in body
    loaded = load(out)
    assert loaded["train"].num_rows == summary["train"] and loaded["test"].num_rows == summary["eval"] > 0
    # No held-out split: an empty eval.jsonl is left out of `configs` (datasets refuses an empty split).
    summary = blend([SourceSpec(str(human))], tmp_path / "blend0", eval_fraction=0.0)
    assert summary["eval"] == 0 and list(load(tmp_path / "blend0")) == ["train"]


# -- model cards -------------------------------------------------------------------------------------------


def test_sft_adapter_card_is_cais_not_peft(tiny_causal_lm_dir, tmp_path):
    from cai.lora import LoraSettings
    from cai.train.policy import TrainSettings, train_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say hello {i}"},
                                                     {"role": "assistant", "content": "hello friend"}]}) + "\n" for i in range(4)))
    settings = TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), batch_size=4, max_steps=1, save_steps=1000, max_length=64)
    metrics = train_sft(data, str(tiny_causal_lm_dir), tmp_path / "sft", settings)
    adapter = tmp_path / "sft" / "adapter"
    meta, body = front_matter(adapter)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local folder is not a hub id
    assert {"cai", "constitutional-ai", "rlaif", "sft", "lora"} <= set(meta["tags"])
    assert meta["cai"]["stage"] == "sft" and meta["cai"]["data"] == str(data)
    assert meta["cai"]["metrics"]["rows"] == 4 and meta["cai"]["metrics"]["steps"] == metrics["steps"] == 1
    assert "Supervised fine-tuning" in body and f"`{data}`" in body and "| learning_rate | 0.0001 |" in body
    assert "| lora.r | 4 |" in body and "Not evaluated when this card was written" in body
    # peft's save_pretrained writes its own card (template headings, "### Framework versions"): gone.
    assert "Framework versions" not in body and "Model Card for Model ID" not in body
    # A builtin base gets its hub id as base_model.
    cards.write_model_card(adapter, {"stage": "dpo", "base_model": "smollm2-135m-instruct", "settings": {}}, {"soft_labels": "soft"})
    assert front_matter(adapter)[0]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# -- cai push ----------------------------------------------------------------------------------------------


class FakeApi:
    """huggingface_hub.HfApi's three calls cai makes, recorded; never the network."""

    calls: list = []

    def __init__(self, token=None, **_):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def uploaded(call: dict) -> set[str]:
    """The files `upload_folder` would send: huggingface_hub's own filter over the folder."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(call["folder_path"])
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return set(filter_repo_objects(files, allow_patterns=call["allow_patterns"], ignore_patterns=call.get("ignore_patterns")))


def fake_adapter(folder: Path, stage: str = "dpo") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    cards.write_model_card(folder, {"stage": stage, "base_model": "smollm2-135m-instruct", "settings": {"beta": 0.1}},
                           {"train_loss": 0.5, "steps": 3})
    return folder


def run_cli(*args) -> int:
    from cai.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def test_push_dataset_folder_uploads_card_and_data_only(constitution, tmp_path, fake_hub, monkeypatch, capsys):
    folder = critique_folder(constitution, tmp_path / "critique")
    monkeypatch.setenv("MY_HF_TOKEN", "hf_secret")
    assert run_cli("push", folder, "me/critique-data", "--private", "--revision", "v1", "--token-env", "MY_HF_TOKEN",
                   "--license", "cc-by-4.0") == 0
    calls = dict(fake_hub)
    assert calls["init"] == {"token": "hf_secret"}
    assert calls["create_repo"] == {"repo_id": "me/critique-data", "repo_type": "dataset", "private": True, "exist_ok": True}
    assert calls["create_branch"] == {"repo_id": "me/critique-data", "branch": "v1", "repo_type": "dataset", "exist_ok": True}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/critique-data" and upload["repo_type"] == "dataset" and upload["revision"] == "v1"
    assert Path(upload["folder_path"]) == folder
    assert uploaded(upload) == {"README.md", "preferences.jsonl", "sft.jsonl"}  # no work/, trace, manifest, summary
    meta, body = front_matter(folder)
    assert meta["license"] == "cc-by-4.0" and "**Licence:** `cc-by-4.0`." in body
    assert "https://huggingface.co/datasets/me/critique-data" in capsys.readouterr().out


def test_push_adapter_as_model_with_eval_figures(tmp_path, fake_hub):
    adapter = fake_adapter(tmp_path / "run" / "dpo" / "adapter")
    (tmp_path / "run" / "dpo" / "metrics.json").write_text("{}")
    eval_dir = tmp_path / "run" / "eval"
    eval_dir.mkdir()
    rate = {"rate": 0.75, "ci95": [0.5, 0.9], "n": 8, "judge_accuracy": {"accuracy": 0.5, "reliable": False}}
    (eval_dir / "metrics.json").write_text(json.dumps({"policy_stage": "dpo", "baseline": "sft", "judge_model": "/x/judge",
                                                       "harmless_rate_policy": rate, "harmless_rate_baseline": rate,
                                                       "win_rate_labeller": {"all": rate, "judge_accuracy": rate["judge_accuracy"]}}))
    assert run_cli("push", tmp_path / "run" / "dpo", "me/policy") == 0  # the stage folder means its adapter/
    calls = dict(fake_hub)
    assert calls["create_repo"] == {"repo_id": "me/policy", "repo_type": "model", "private": False, "exist_ok": True}
    assert "create_branch" not in calls and calls["init"] == {"token": None}
    upload = calls["upload_folder"]
    assert Path(upload["folder_path"]) == adapter and upload["repo_type"] == "model"
    assert uploaded(upload) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    meta, body = front_matter(adapter)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert "| harmless rate (red-team) | 0.75 [0.5, 0.9] (n=8) | 0.75 [0.5, 0.9] (n=8) | UNRELIABLE" in body
    assert "Not evaluated" not in body and meta["cai"]["eval"]["harmless rate (red-team)"].startswith("0.75")


def test_push_bad_folder_exits_2_with_one_line(constitution, tmp_path, fake_hub, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.jsonl").write_text('{"a": 1}\n')
    result = subprocess.run([sys.executable, "-m", "cai.cli", "push", str(tmp_path / "plain"), "me/x"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "has no card (README.md)" in lines[0], result.stderr
    # A card whose data files are all empty: nothing to push. An adapter without weights: refused.
    empty = tmp_path / "empty"
    summary = blend([SourceSpec(str(label_folder(constitution, tmp_path / "label") / "preferences.jsonl"))], empty)
    (empty / "train.jsonl").write_text("")
    (empty / "eval.jsonl").write_text("")
    assert summary["train"] > 0 and run_cli("push", empty, "me/x") == 2
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text("{}")
    (tmp_path / "noweights" / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    assert run_cli("push", tmp_path / "noweights", "me/x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "has no data to push" in err[0] and "no adapter weights" in err[1]
    assert fake_hub == []  # refused before any hub client was made


# -- the recipe's push section -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_still_loads(path):
    from cai.recipe import load_recipe

    if "accelerate" in path.name:  # an accelerate config, not a recipe
        return
    assert load_recipe(path).push == hub.PushSettings()


def test_recipe_push_section_checked_and_pushes_each_output(constitution, tmp_path):
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nstages: [critique, sft, blend, dpo]\noutput_dir: {tmp_path / 'run'}\n"
                      "push: {repo_prefix: me/run, outputs: [critique, blend, dpo, sft], license: mit}\n")
    for bad, message in (("outputs: [rm]", "'rm' is not a stage of this recipe"), ("repo_prefix: nope", "namespace/name"),
                         ("outputs: [trace]", "unknown output 'trace'"), ("colour: red", "unknown key 'colour'")):
        (tmp_path / "bad.yaml").write_text(f"name: r\nstages: [critique, sft]\npush: {{{bad}}}\n")
        with pytest.raises(CaiError, match=message):
            load_recipe(tmp_path / "bad.yaml")
    run = tmp_path / "run"
    critique_folder(constitution, run / "critique")
    blend([SourceSpec(str(run / "critique" / "preferences.jsonl"))], run / "blend")
    fake_adapter(run / "dpo" / "adapter")
    api, logs = FakeApi(), []
    FakeApi.calls = []
    results = hub.push_run(RecipeRunner(load_recipe(recipe)), log=logs.append, api=api)
    assert [(r["repo_id"], r["repo_type"]) for r in results] == [
        ("me/run-critique", "dataset"), ("me/run-blend", "dataset"), ("me/run-dpo", "model")]
    assert any("sft" in line and "skipped" in line for line in logs)  # listed, but never trained here
    assert all(c[1]["private"] for c in FakeApi.calls if c[0] == "create_repo")
    dpo_meta, _ = front_matter(run / "dpo" / "adapter")
    assert dpo_meta["datasets"] == ["me/run-blend"] and dpo_meta["license"] == "mit"
    assert front_matter(run / "blend")[0]["license"] == "mit"
