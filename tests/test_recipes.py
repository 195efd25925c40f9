import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from cai.errors import CaiError
from cai.recipe import Recipe, load_recipe
from cai.run import RecipeRunner

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_file_loads(path):
    data = yaml.safe_load(path.read_text())
    if "distributed_type" in data:  # an accelerate launcher config shipped beside a recipe
        from accelerate.commands.config.config_args import ClusterConfig

        config = ClusterConfig.from_yaml_file(str(path))
        kind = path.stem.removeprefix("accelerate-")
        if kind.startswith("zero"):
            assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == int(kind[-1])
        else:
            assert kind == "fsdp" and config.distributed_type == "FSDP" and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        return
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.stages and recipe.name == path.stem


def test_quickstart_is_the_demo():
    makefile = (RECIPES.parent / "Makefile").read_text()
    assert "recipes/quickstart.yaml" in makefile
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert recipe.model == "smollm2-135m-instruct" and "eval" in recipe.stages and "dpo" in recipe.stages


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_key_and_bad_type_fail_before_work(tmp_path):
    bad = write(tmp_path / "r.yaml", "name: r\nstages: [critique]\ncritique:\n  settings:\n    roundz: 2\n")
    with pytest.raises(CaiError, match=r"r.yaml:5: field 'critique.settings.roundz': unknown key 'roundz'"):
        load_recipe(bad)
    typed = write(tmp_path / "t.yaml", "name: t\nstages: [critique]\ncritique:\n  settings:\n    rounds: two\n")
    with pytest.raises(CaiError, match=r"t.yaml:5: field 'critique.settings.rounds': must be an integer, got string 'two'"):
        load_recipe(typed)
    order = write(tmp_path / "o.yaml", "name: o\nstages: [dpo, critique]\n")
    with pytest.raises(CaiError, match="stages must follow the pipeline order"):
        load_recipe(order)
    unknown_stage = write(tmp_path / "u.yaml", "name: u\nstages: [critique, magic]\n")
    with pytest.raises(CaiError, match="unknown stage 'magic'"):
        load_recipe(unknown_stage)


def test_overrides(tmp_path):
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["critique.settings.rounds=1", "engine.kind=hf", "dpo.settings.beta=0.3"])
    assert recipe.critique.settings.rounds == 1 and recipe.engine.kind == "hf" and recipe.dpo.settings.beta == 0.3
    with pytest.raises(CaiError, match="must be one of"):
        load_recipe(RECIPES / "quickstart.yaml", ["engine.kind=tgi"])


MINI = """\
name: mini
model: {model}
output_dir: {out}
constitution: constitutions/harmless.yaml
stages: [critique, sft, sample, label, blend, rm, dpo, eval]
engine: {{kind: hf, batch_size: 8}}
critique:
  prompts: [{{path: cai/data/prompts/red_team.jsonl, limit: 4}}, {{path: cai/data/prompts/benign.jsonl, limit: 2}}]
  settings: {{rounds: 1, few_shot: 1, drop_truncated: false, sampling: {{temperature: 1.0, max_tokens: 8}}}}
sft:
  settings: {{max_steps: 2, batch_size: 2, max_length: 256, lora: {{r: 4, alpha: 8}}}}
sample:
  prompts: [{{path: cai/data/prompts/red_team.jsonl, limit: 6}}]
  sampling: {{temperature: 1.0, max_tokens: 8}}
label:
  settings: {{principles_per_pair: 2}}
blend:
  sources: [{{path: cai/data/human/hh_pairs.jsonl, weight: 0.1}}]
  eval_fraction: 0.3
rm:
  settings: {{max_steps: 2, batch_size: 2, max_length: 256, lora: {{r: 4, alpha: 8}}}}
dpo:
  settings: {{train: {{max_steps: 2, batch_size: 2, max_length: 256, lora: {{r: 4, alpha: 8}}}}}}
eval:
  red_team: [{{path: cai/data/prompts/eval_red_team.jsonl, limit: 3}}]
  benign: [{{path: cai/data/prompts/eval_benign.jsonl, limit: 3}}]
  max_tokens: 8
"""


def test_miniature_recipe_runs_every_stage_then_skips(tiny_causal_lm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)
    path = write(tmp_path / "mini.yaml", MINI.format(model=tiny_causal_lm_dir, out=tmp_path / "run"))
    logs = []
    timings = RecipeRunner(load_recipe(path), log=logs.append).run()
    assert list(timings) == ["critique", "sft", "sample", "label", "blend", "rm", "dpo", "eval"]
    out = tmp_path / "run"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["policy_stage"] == "dpo" and metrics["baseline"] == "sft"
    for key in ("win_rate_labeller", "win_rate_reward_model"):
        assert 0 <= metrics[key]["all"]["rate"] <= 1 and metrics[key]["all"]["n"] == 6
    assert "kl_to_reference" in metrics and metrics["mean_length"]["policy"] > 0
    assert (out / "report.md").exists() and "<svg" in (out / "report.html").read_text()
    assert json.loads((out / "blend" / "summary.json").read_text())["train"] > 0
    # Every name a stage writes is one `--overwrite` and a changed stage know to clear (store.CAI_NAMES).
    from cai import store

    written = {f"{stage.name}/{entry.name}" for stage in out.iterdir() if stage.is_dir() for entry in stage.iterdir()}
    assert not {name for name in written if not store.is_cai_name(name.split("/", 1)[1])}

    logs.clear()
    assert RecipeRunner(load_recipe(path), log=logs.append).run() == {}
    assert sum("skipped" in line for line in logs) == 8

    # A rerun eval (as after a kill) reuses the answers it already generated.
    from cai.engines.hf import HFEngine

    def no_generation(*args, **kwargs):
        raise AssertionError("answers were regenerated")

    with monkeypatch.context() as patch:
        patch.setattr(HFEngine, "generate", no_generation)
        assert list(RecipeRunner(load_recipe(path), log=logs.append).run(only="eval")) == ["eval"]
    assert json.loads((out / "eval" / "metrics.json").read_text())["win_rate_labeller"] == metrics["win_rate_labeller"]

    logs.clear()
    changed = load_recipe(path, ["dpo.settings.beta=0.2"])
    assert list(RecipeRunner(changed, log=logs.append).run()) == ["dpo", "eval"]
    assert any(line.startswith("[dpo] settings or inputs changed") for line in logs)  # old partial work is not resumed
    assert list(RecipeRunner(changed, log=logs.append).run(only="blend")) == ["blend"]


def test_partial_sections_keep_their_own_defaults(tmp_path):
    """A section given in part keeps the field's own default for the rest, at every depth."""
    from cai.train.online import OnlineSettings

    path = write(tmp_path / "p.yaml", "name: p\nstages: [critique, grpo]\ncritique:\n  settings: {sampling: {max_tokens: 8}}\n"
                                      "grpo:\n  settings:\n    train: {max_steps: 2}\n")
    recipe = load_recipe(path, ["rloo.settings.train.lora.r=4"])
    sampling = recipe.critique.settings.sampling
    assert sampling.max_tokens == 8 and sampling.temperature == 0.7  # CritiqueSettings' 0.7, not SamplingSettings' 1.0
    assert recipe.grpo.settings.train.max_steps == 2 and recipe.grpo.settings.train.learning_rate == 1e-5
    assert recipe.rloo.settings.train.lora.r == 4 and recipe.rloo.settings.train.learning_rate == 1e-5
    assert recipe.rloo.settings.train.lora.alpha == 32 and recipe.dpo.settings.train.learning_rate == 1e-4
    assert recipe.grpo.settings == OnlineSettings(train=dataclasses.replace(OnlineSettings().train, max_steps=2))
