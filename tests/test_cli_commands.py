"""Every command the README shows, run as a user runs it: a subprocess on the tiny model, checked
for its exit code and its outputs. Then each command on a bad input: exit code 2, one line on
stderr, no traceback, and nothing written.

The commands form one small pipeline (critique -> sample -> label -> blend -> train-rm -> sft ->
dpo/ppo/grpo/rloo/best-of-n -> eval), sharing a module-scoped work folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def cai(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cai.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr
    return result


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_causal_lm_dir):
    folder = tmp_path_factory.mktemp("cli")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n" for i, text in enumerate(
        ["How do I bake bread?", "How can I hurt my neighbour?", "Write a poem about rain.", "How do I pick a lock?"])))
    sft = folder / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                    {"role": "assistant", "content": f"Answer number {i}."}]}) + "\n"
                           for i in range(4)))
    return {"dir": folder, "model": tiny_causal_lm_dir, "prompts": prompts, "sft_data": sft}


TRAIN = ["--set", "max_steps=1", "--set", "batch_size=2", "--set", "max_length=128", "--set", "lora.r=4", "--set", "lora.alpha=8"]


def test_constitution_validate_show_import(tmp_path):
    result = ok(cai("constitution", "validate", "constitutions/harmless.yaml", "constitutions/helpful-honest.yaml"))
    assert result.stdout.count("ok: ") == 2
    assert "physical-harm" in ok(cai("constitution", "show", "constitutions/harmless.yaml")).stdout
    out = tmp_path / "imported.yaml"
    ok(cai("constitution", "import", ROOT / "tests/fixtures/constitution_sources/llm_swarm.json", "-o", out))
    assert "ok: " in ok(cai("constitution", "validate", out)).stdout


def test_critique(work):
    out = work["dir"] / "critique"
    ok(cai("critique", "--constitution", "constitutions/harmless.yaml", "--prompts", work["prompts"], "--model", work["model"],
           "--out", out, "--rounds", "1", "--engine", "hf", "--max-tokens", "6", "--few-shot", "1"))
    assert len(rows(out / "trace.jsonl")) == 4
    assert (out / "sft.jsonl").exists() and (out / "preferences.jsonl").exists()


def test_sample_and_label(work):
    samples = work["dir"] / "sample"
    ok(cai("sample", "--prompts", work["prompts"], "--model", work["model"], "--out", samples, "-k", "2", "--engine", "hf",
           "--max-tokens", "6"))
    responses = rows(samples / "responses.jsonl")
    assert len(responses) == 4 and all(len(r["responses"]) == 2 for r in responses)
    labels = work["dir"] / "label"
    ok(cai("label", "--responses", samples / "responses.jsonl", "--constitution", "constitutions/harmless.yaml",
           "--model", work["model"], "--out", labels, "--engine", "hf"))
    assert rows(labels / "labels.jsonl") if (labels / "labels.jsonl").exists() else (labels / "preferences.jsonl").exists()


def test_label_eval(work):
    out = work["dir"] / "label-eval"
    ok(cai("label", "eval", "--human", "cai/data/human/hh_pairs.jsonl", "--constitution", "constitutions/helpful-honest.yaml",
           "--model", work["model"], "--out", out, "--engine", "hf"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == str(work["model"])


def test_blend(work):
    out = work["dir"] / "blend"
    result = ok(cai("blend", "cai/data/human/hh_pairs.jsonl:1", "--out", out, "--eval-fraction", "0.25"))
    assert "train" in result.stdout
    assert len(rows(out / "train.jsonl")) > 0 and len(rows(out / "eval.jsonl")) > 0


def test_train_rm(work):
    out = work["dir"] / "rm"
    ok(cai("train-rm", "--data", work["dir"] / "blend", "--model", work["model"], "--out", out, "--max-steps", "1",
           "--batch-size", "2", "--max-length", "128", "--lora-r", "4", "--lora-alpha", "8"))
    assert (out / "adapter").is_dir() and json.loads((out / "metrics.json").read_text())["steps"] == 1


def test_sft_and_dpo(work):
    sft = work["dir"] / "sft"
    ok(cai("sft", "--data", work["sft_data"], "--model", work["model"], "--out", sft, *TRAIN))
    assert (sft / "adapter" / "adapter_config.json").exists()
    dpo = work["dir"] / "dpo"
    train = [item if item == "--set" else f"train.{item}" for item in TRAIN]
    ok(cai("dpo", "--data", work["dir"] / "blend", "--model", work["model"], "--out", dpo, "--sft", sft, *train))
    assert (dpo / "adapter" / "adapter_config.json").exists()
    assert json.loads((dpo / "metrics.json").read_text())["steps"] == 1


def test_ppo(work):
    out = work["dir"] / "ppo"
    ok(cai("ppo", "--prompts", work["prompts"], "--reward", work["dir"] / "rm", "--model", work["model"], "--out", out,
           "--sft", work["dir"] / "sft",
           "--set", "steps=1", "--set", "batch_size=2", "--set", "mini_batch_size=2", "--set", "max_new_tokens=4",
           "--set", "lora.r=4", "--set", "lora.alpha=8"))
    assert (out / "adapter" / "adapter_config.json").exists()
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 1


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_grpo_rloo(work, method):
    out = work["dir"] / method
    ok(cai(method, "--prompts", work["prompts"], "--reward", work["dir"] / "rm", "--model", work["model"], "--out", out,
           "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "num_generations=2",
           "--set", "max_completion_length=4", "--set", "train.lora.r=4", "--set", "train.lora.alpha=8"))
    assert (out / "adapter" / "adapter_config.json").exists()


def test_best_of_n(work):
    out = work["dir"] / "bon"
    ok(cai("best-of-n", "--prompts", work["prompts"], "--reward", work["dir"] / "rm", "--model", work["model"], "--out", out,
           "-n", "2", "--max-tokens", "4", "--engine", "hf"))
    assert out.is_dir() and any(out.iterdir())


RECIPE = """\
name: cli
model: {model}
output_dir: {out}
constitution: constitutions/harmless.yaml
stages: [sft, rm, dpo, eval]
engine: {{kind: hf, batch_size: 8}}
eval:
  red_team: [{{path: cai/data/prompts/eval_red_team.jsonl, limit: 2}}]
  benign: [{{path: cai/data/prompts/eval_benign.jsonl, limit: 2}}]
  max_tokens: 6
"""


def test_eval_and_run(work, tmp_path):
    """`cai eval` evaluates the adapters the commands above trained (laid out as a recipe's run);
    `cai run --only` runs a single stage of a recipe."""
    recipe = tmp_path / "cli.yaml"
    recipe.write_text(RECIPE.format(model=work["model"], out=work["dir"]))
    result = ok(cai("eval", recipe))
    assert "win rate" in result.stdout.lower() or "|" in result.stdout
    assert json.loads((work["dir"] / "eval" / "metrics.json").read_text())["policy_stage"] == "dpo"
    blend_only = tmp_path / "blend.yaml"
    blend_only.write_text(f"name: b\noutput_dir: {tmp_path / 'run'}\nstages: [blend]\n"
                          "blend: {sources: [{path: cai/data/human/hh_pairs.jsonl}], include_ai_labels: false}\n")
    stdout = ok(cai("run", blend_only)).stdout
    assert "[blend] running" in stdout
    summary = json.loads(stdout[stdout.rindex("\n{") :])
    assert list(summary["stage_seconds"]) == ["blend"] and (tmp_path / "run" / "blend" / "train.jsonl").exists()


# -- bad input: exit code 2, one line, nothing written -----------------------------------------------

BAD = {
    "critique": ["critique", "--constitution", "constitutions/harmless.yaml", "--prompts", "{missing}", "--out", "{out}"],
    "sample": ["sample", "--prompts", "{missing}", "--out", "{out}"],
    "label": ["label", "--responses", "{missing}", "--constitution", "constitutions/harmless.yaml", "--out", "{out}"],
    "label eval": ["label", "eval", "--human", "{missing}", "--constitution", "constitutions/harmless.yaml", "--out", "{out}"],
    "blend": ["blend", "{missing}", "--out", "{out}"],
    "train-rm": ["train-rm", "--data", "{missing}", "--out", "{out}"],
    "sft": ["sft", "--data", "{missing}", "--out", "{out}"],
    "dpo": ["dpo", "--data", "{missing}", "--out", "{out}"],
    "ppo": ["ppo", "--prompts", "{missing}", "--reward", "{missing}", "--out", "{out}"],
    "grpo": ["grpo", "--prompts", "{missing}", "--reward", "{missing}", "--out", "{out}"],
    "rloo": ["rloo", "--prompts", "{missing}", "--reward", "{missing}", "--out", "{out}"],
    "best-of-n": ["best-of-n", "--prompts", "{missing}", "--reward", "{missing}", "--out", "{out}"],
    "run": ["run", "{missing}"],
    "eval": ["eval", "{missing}"],
    "constitution validate": ["constitution", "validate", "{invalid}"],
    "constitution show": ["constitution", "show", "{invalid}"],
    "constitution import": ["constitution", "import", "{invalid}", "-o", "{out}/x.yaml"],
    "ask": ["ask", "hi", "--model", "{missing}"],
    "push": ["push", "{missing}", "me/x"],
    "sft --set": ["sft", "--data", "{sft}", "--out", "{out}", "--set", "no_such_key=1"],
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, tmp_path):
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("name: x\nprinciples: []\nbogus: 1\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    out = tmp_path / "out"
    args = [a.format(missing=tmp_path / "missing.jsonl", invalid=invalid, out=out, sft=sft) for a in BAD[name]]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cai(*args)
    assert result.returncode == 2, f"{name}: exit {result.returncode}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()


def test_interrupt_exits_130(monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt inside a command) exits 130, not 0."""
    from cai import cli, models

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "list_cached", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "list"])
    assert exit_info.value.code == 130
