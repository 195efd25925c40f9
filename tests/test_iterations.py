"""Iterative RLAIF: a recipe with `iterations: 2` repeats sample -> label -> blend -> rm -> dpo -> eval,
each iteration sampling from, starting from and referencing the previous iteration's policy."""

import json
from pathlib import Path

import pytest

from cai.errors import CaiError
from cai.recipe import load_recipe
from cai.run import RecipeRunner

ROOT = Path(__file__).resolve().parent.parent

ITERATIVE = """\
name: iterative
model: {model}
output_dir: {out}
iterations: 2
stages: [critique, sft, sample, label, blend, rm, dpo, eval]
engine: {{kind: hf, batch_size: 8}}
critique:
  prompts: [{{path: cai/data/prompts/red_team.jsonl, limit: 3}}]
  settings: {{rounds: 1, few_shot: 1, drop_truncated: false, sampling: {{temperature: 1.0, max_tokens: 6}}}}
sft:
  settings: {{max_steps: 1, batch_size: 2, max_length: 256, lora: {{r: 4, alpha: 8}}}}
sample:
  prompts: [{{path: cai/data/prompts/red_team.jsonl, limit: 4}}]
  sampling: {{temperature: 1.0, max_tokens: 6}}
label:
  settings: {{principles_per_pair: 1}}
blend:
  sources: [{{path: cai/data/human/hh_pairs.jsonl, weight: 0.05}}]
  eval_fraction: 0.3
rm:
  settings: {{max_steps: 1, batch_size: 2, max_length: 256, lora: {{r: 4, alpha: 8}}}}
dpo:
  settings: {{train: {{max_steps: 1, batch_size: 2, max_length: 256, lora: {{r: 4, alpha: 8}}}}}}
eval:
  red_team: [{{path: cai/data/prompts/eval_red_team.jsonl, limit: 2}}]
  benign: [{{path: cai/data/prompts/eval_benign.jsonl, limit: 2}}]
  max_tokens: 6
  kl: {{max_tokens: 6}}
  sycophancy: {{limit: 3, max_tokens: 6}}
  xstest: {{limit: 2, max_tokens: 6}}
"""


def recipe_file(tmp_path: Path, model: Path, text: str = ITERATIVE) -> Path:
    path = tmp_path / "iterative.yaml"
    path.write_text(text.format(model=model, out=tmp_path / "run"))
    return path


def test_two_iterations_each_start_from_the_last_policy(tiny_causal_lm_dir, tmp_path, monkeypatch, capsys):
    from cai.engines.hf import HFEngine

    monkeypatch.chdir(ROOT)
    asked = []
    generate = HFEngine.generate

    def recording(self, prompts, sampling, adapter=None, seeds=None):
        asked.append(adapter)
        return generate(self, prompts, sampling, adapter=adapter, seeds=seeds)

    monkeypatch.setattr(HFEngine, "generate", recording)
    path = recipe_file(tmp_path, tiny_causal_lm_dir)
    timings = RecipeRunner(load_recipe(path), log=lambda line: None).run()
    iterated = ["sample", "label", "blend", "rm", "dpo", "eval"]
    assert list(timings) == ["critique", "sft", *iterated, *(f"iteration-2/{s}" for s in iterated)]
    out = tmp_path / "run"
    # run.log: the runner's lines and each stage's progress, as plain timestamped lines.
    run_log = (out / "run.log").read_text()
    for line in ("[critique] running ->", "sft: started at 0/", "dpo: 1/", "[iteration-2/dpo] done in", "label/logprob: "):
        assert line in run_log, line
    assert "\x1b" not in run_log and "\r" not in run_log
    first_policy, second_policy = out / "dpo" / "adapter", out / "iteration-2" / "dpo" / "adapter"
    # Iteration 2 samples from iteration 1's policy (not the SFT model) with a seed of its own ...
    first_rows = [json.loads(line) for line in (out / "sample" / "responses.jsonl").read_text().splitlines()]
    second_rows = [json.loads(line) for line in (out / "iteration-2" / "sample" / "responses.jsonl").read_text().splitlines()]
    assert first_rows[0]["provenance"]["adapter"] == str(out / "sft" / "adapter")
    assert second_rows[0]["provenance"]["adapter"] == str(first_policy)
    assert second_rows[0]["provenance"]["seed"] == first_rows[0]["provenance"]["seed"] + 1
    # ... labels its own samples, and trains DPO on them starting from (and referenced to) iteration 1's policy.
    second_labels = (out / "iteration-2" / "label" / "preferences.jsonl").read_text()
    assert second_labels and second_labels != (out / "label" / "preferences.jsonl").read_text()
    meta = json.loads((second_policy / "cai-policy.json").read_text())
    assert meta["sft_adapter"] == str(first_policy)
    assert json.loads((first_policy / "cai-policy.json").read_text())["sft_adapter"] == str(out / "sft" / "adapter")
    # Each iteration is evaluated against the same SFT baseline, and the report puts them side by side.
    for folder in (out / "eval", out / "iteration-2" / "eval"):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["baseline"] == "sft" and metrics["win_rate_labeller"]["all"]["n"] == 4
    # The SFT baseline's answers (main set, sycophancy probe twice, XSTest) are generated once, not per iteration.
    assert asked.count("baseline") == 4 and asked.count("policy") == 8
    assert (out / "iteration-2" / "eval" / "answers-baseline.json").read_text() == (out / "eval" / "answers-baseline.json").read_text()
    report = (out / "report.md").read_text()
    assert "## Iterations" in report and "| iteration 1 |" in report and "| iteration 2 |" in report
    assert "Reward hacking" in (out / "report.html").read_text()

    # --dry-run says what a changed recipe would run and why, and touches nothing.
    def snapshot():
        return sorted((str(f), f.stat().st_mtime_ns) for f in out.rglob("*"))
    before = snapshot()
    preview = RecipeRunner(load_recipe(path, ["dpo.settings.beta=0.3"]), log=lambda line: None).preview()
    assert [(p["step"], p["action"]) for p in preview][5:9] == [("rm", "skip"), ("dpo", "run"), ("eval", "run"), ("iteration-2/sample", "run")]
    assert preview[6]["why"] == "settings, inputs or an upstream step changed since its last run"
    # Settings of an engine kind the recipe does not use change nothing.
    unused = ["engine.openai.max_concurrency=7", "engine.ray.actors=3"]
    assert {p["action"] for p in RecipeRunner(load_recipe(path, unused), log=lambda line: None).preview()} == {"skip"}
    assert RecipeRunner(load_recipe(path), log=lambda line: None).preview(only="iteration-2/rm")[11] == {
        "step": "iteration-2/rm", "action": "run", "why": "asked for by --only", "folder": str(out / "iteration-2" / "rm")}
    from cai.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        main(["run", str(path), "dpo.settings.beta=0.3", "--dry-run"])
    printed = capsys.readouterr().out.splitlines()
    assert exit_code.value.code == 0 and len(printed) == 14 and printed[6].startswith("run   dpo ")
    assert snapshot() == before

    # A rerun skips every step; a change to the DPO settings reruns both iterations' dpo and what follows.
    logs = []
    assert RecipeRunner(load_recipe(path), log=logs.append).run() == {}
    assert sum("skipped" in line for line in logs) == 14
    changed = list(RecipeRunner(load_recipe(path, ["dpo.settings.beta=0.3"]), log=logs.append).run())
    assert changed == ["dpo", "eval", *(f"iteration-2/{s}" for s in iterated)]
    # --only with a bare stage name runs it in every iteration; a step name runs just that step.
    assert list(RecipeRunner(load_recipe(path, ["dpo.settings.beta=0.3"]), log=logs.append).run(only="blend")) == [
        "blend", "iteration-2/blend"]
    assert list(RecipeRunner(load_recipe(path, ["dpo.settings.beta=0.3"]), log=logs.append).run(only="iteration-2/blend")) == [
        "iteration-2/blend"]


@pytest.mark.parametrize("stages, missing", [("[sft, dpo, eval]", "sample, label"), ("[sample, label, blend]", "a policy stage")])
def test_iterations_need_sampling_labelling_and_a_policy_stage(tmp_path, stages, missing):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\niterations: 2\nstages: {stages}\n")
    with pytest.raises(CaiError, match=f"field 'iterations'.*needs {missing}"):
        load_recipe(path)
    path.write_text("name: r\niterations: 0\nstages: [sample]\n")
    with pytest.raises(CaiError, match="r.yaml:2: field 'iterations': must be >= 1"):
        load_recipe(path)
