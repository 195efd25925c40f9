"""Training stages launched by `cai run` on two real processes (torchrun, gloo on this CPU), against
the same stages trained in the driver: same artifacts, world size seen from inside the trainers."""

import json
from pathlib import Path

import pytest

from cai.config import ConfigError
from cai.errors import CaiError
from cai.lora import LoraSettings
from cai.train.policy import DPOSettings, TrainSettings
from cai.prompt_sets import Prompt
from cai.recipe import load_recipe
from cai.run import RecipeRunner
from cai.train.distributed import DistributedSettings, command, decode, encode

RECIPE = """\
name: dist
model: {model}
output_dir: {out}
stages: [sft, rm, dpo]
{distributed}
sft:
  settings: {{max_steps: 4, batch_size: {batch}, learning_rate: 0.01, max_length: 96, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
rm:
  settings: {{max_steps: 4, batch_size: {batch}, learning_rate: 0.01, max_length: 96, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
dpo:
  settings: {{train: {{max_steps: 4, batch_size: {batch}, learning_rate: 0.01, max_length: 96, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}}}
"""


def rows(path: Path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


def prepared_run(tmp_path: Path, name: str, model: Path, distributed: str, batch: int) -> Path:
    """A recipe whose training stages read inputs already in place (no generation needed)."""
    out = tmp_path / name
    rows(out / "critique" / "sft.jsonl", [{"id": str(i), "messages": [
        {"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": "hello friend"}]} for i in range(16)])
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": [{"role": "assistant", "content": "yes please"}], "rejected": [{"role": "assistant", "content": "no way"}],
              "chosen_prob": 1.0, "source": "ai", "provenance": {"stage": "label"}} for i in range(16)]
    rows(out / "blend" / "train.jsonl", pairs[:12])
    rows(out / "blend" / "eval.jsonl", pairs[12:])
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(model=model, out=out, distributed=distributed, batch=batch))
    return recipe


def test_sft_on_two_processes_through_cai_run(tiny_causal_lm_dir, tmp_path):
    """The default run's check (about 40 s): one stage launched on two real processes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = prepared_run(tmp_path, "double", tiny_causal_lm_dir, "distributed: {processes: 2}", batch=2)
    logs = []
    RecipeRunner(load_recipe(str(recipe), ["stages=[sft]"]), log=logs.append).run()
    assert any("[launch] 2 processes: -m torch.distributed.run" in line for line in logs)
    metrics = json.loads((tmp_path / "double" / "sft" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 4  # the world size the trainer saw from inside
    assert metrics["log_history"][-1]["epoch"] == 1.0  # 4 steps x 2 rows x 2 processes = the 16 rows once
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), str(tmp_path / "double" / "sft" / "adapter"))
    from cai import store

    written = sorted(entry.name for entry in (tmp_path / "double" / "sft").iterdir())
    assert "launch.json" in written and all(store.is_cai_name(name) for name in written), written


@pytest.mark.slow
def test_two_processes_train_sft_rm_and_dpo_like_one(tiny_causal_lm_dir, tmp_path):
    """Per-device batch 2 on 2 processes against batch 4 in one: the same global batch, the same steps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single = prepared_run(tmp_path, "single", tiny_causal_lm_dir, "", batch=4)
    double = prepared_run(tmp_path, "double", tiny_causal_lm_dir, "distributed: {processes: 2}", batch=2)
    logs = []
    RecipeRunner(load_recipe(str(single)), log=logs.append).run()
    assert not any("[launch]" in line for line in logs)  # no distributed section: trained in the driver
    RecipeRunner(load_recipe(str(double)), log=logs.append).run()
    assert sum("[launch] 2 processes: -m torch.distributed.run" in line for line in logs) == 3
    for stage in ("sft", "rm", "dpo"):
        one = json.loads((tmp_path / "single" / stage / "metrics.json").read_text())
        two = json.loads((tmp_path / "double" / stage / "metrics.json").read_text())
        assert one["processes"] == 1 and two["processes"] == 2, stage  # as each trainer's accelerator saw it
        assert one["steps"] == two["steps"] == 4
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.25), stage
        assert json.loads((tmp_path / "double" / stage / "done.json").read_text())["summary"]["processes"] == 2
        assert (tmp_path / "double" / stage / "launch.json").exists()
    # One adapter per stage, written once, loading on the plain base.
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    PeftModel.from_pretrained(base, str(tmp_path / "double" / "dpo" / "adapter"))
    meta = json.loads((tmp_path / "double" / "dpo" / "adapter" / "cai-policy.json").read_text())
    assert meta["sft_adapter"] == str(tmp_path / "double" / "sft" / "adapter")
    # The DPO adapter stacks SFT and DPO like the single-process one does.
    assert sorted(p.name for p in (tmp_path / "double" / "dpo").iterdir() if p.is_dir()) == \
        sorted(p.name for p in (tmp_path / "single" / "dpo").iterdir() if p.is_dir())
    run_log = (tmp_path / "double" / "run.log").read_text()
    assert "sft: 4/4 steps (100%)" in run_log and run_log.count("dpo: started at 0/4 steps") == 1  # the main rank only


def test_a_failing_process_stops_the_run_with_one_line(tiny_causal_lm_dir, tmp_path):
    recipe = prepared_run(tmp_path, "bad", tiny_causal_lm_dir, "distributed: {processes: 2}", batch=2)
    (tmp_path / "bad" / "critique" / "sft.jsonl").write_text('{"id": "1", "messages": "not a list"}\n')
    with pytest.raises(CaiError, match="torchrun launch of cai.train.policy:train_sft exited with code") as error:
        RecipeRunner(load_recipe(str(recipe), ["stages=[sft]"]), log=lambda line: None).run()
    assert "launch.json" in str(error.value)
    assert not (tmp_path / "bad" / "sft" / "done.json").exists()


def test_settings_travel_to_the_processes_intact():
    settings = DPOSettings(beta=0.3, soft_labels="filter", train=TrainSettings(lora=LoraSettings(r=4, target_modules=("q_proj",)),
                                                                              trl={"max_grad_norm": 0.5}))
    prompts = [Prompt(id="a", messages=({"role": "user", "content": "hi"},))]
    args = {"settings": settings, "prompts": prompts, "out_dir": Path("/x"), "sft_adapter": None}
    back = decode(json.loads(json.dumps(encode(args))))
    assert back["settings"] == settings and back["prompts"] == prompts and back["out_dir"] == "/x" and back["sft_adapter"] is None


def test_launch_commands():
    spec = Path("/run/dpo/launch.json")
    torchrun = command(DistributedSettings(processes=2, main_process_port=29555), spec)
    assert torchrun[1:] == ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                            "--master_port", "29555", "-m", "cai.train.launch", str(spec)]
    accelerate = command(DistributedSettings(processes=4, accelerate_config="recipes/accelerate-zero2.yaml", main_process_port=29555), spec)
    assert accelerate[1:] == ["-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate-zero2.yaml",
                              "--num_processes", "4", "--num_machines", "1", "--main_process_port", "29555",
                              "-m", "cai.train.launch", str(spec)]


@pytest.mark.parametrize("section, field, message", [
    ("distributed: {processes: 2, machines: 2}", "machines", "this machine only"),
    ("distributed: {processes: 0}", "processes", ">= 1"),
    ("distributed: {processes: 2, launcher: torchrun, accelerate_config: recipes/accelerate-zero2.yaml}", "launcher", "needs launcher accelerate"),
    ("distributed: {processes: 2, accelerate_config: nowhere.yaml}", "accelerate_config", "no accelerate config file"),
])
def test_bad_distributed_sections_stop_at_load(tiny_causal_lm_dir, tmp_path, section, field, message):
    recipe = prepared_run(tmp_path, "x", tiny_causal_lm_dir, section, batch=2)
    with pytest.raises((CaiError, ConfigError), match=message) as error:
        load_recipe(str(recipe))
    assert f"distributed.{field}" in str(error.value) and f"{recipe}:" in str(error.value)
