"""KTO on AI labels and online DPO with cai's judge (cai/train/), on the tiny random models."""

import json
from pathlib import Path

import pytest
import torch

from cai.errors import CaiError
from cai.labeling import LabelSettings
from cai.lora import LoraSettings
from cai.train.policy import TrainSettings
from cai.prompt_sets import Prompt
from cai.train.kto import KTOSettings, kto_dataset, train_kto
from cai.train.online_dpo import ConstitutionJudge, OnlineDPOSettings, RewardJudge, train_online_dpo
from test_policy import completion_logprob

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"How do I bake bread {i}?"},)) for i in range(4)]


def small(**overrides):
    base = dict(lora=LoraSettings(r=8, alpha=16, dropout=0.0), learning_rate=1e-2, batch_size=4, max_steps=12,
                save_steps=1000, max_length=128)
    base.update(overrides)
    return TrainSettings(**base)


def write_pairs(path, probs):
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "yes please"}], "rejected": [{"role": "assistant", "content": "no way"}],
             "chosen_prob": prob, "source": "ai", "provenance": {"stage": "label"}} for i, prob in enumerate(probs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path




# -- KTO ----------------------------------------------------------------------------------------------
def test_kto_dataset_unpairs_and_handles_low_confidence(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [0.9, 0.8, 0.55, 0.52])
    dropped, stats = kto_dataset(path, KTOSettings())
    assert stats["dropped_low_confidence"] == 2 and stats["desirable"] == stats["undesirable"] == 2
    assert sorted((r["completion"][0]["content"], r["label"]) for r in dropped) == [
        ("no way", False), ("no way", False), ("yes please", True), ("yes please", True)]
    kept, stats = kto_dataset(path, KTOSettings(low_confidence="keep"))
    assert len(kept) == 8 and stats["dropped_low_confidence"] == 0 and stats["low_confidence_pairs"] == 2
    with pytest.raises(CaiError, match="desirable and undesirable"):
        kto_dataset(write_pairs(tmp_path / "low.jsonl", [0.55, 0.51]), KTOSettings())


def test_kto_drops_contradictions_and_balances_the_weights(tmp_path):
    from cai.train.kto import balanced_weight

    rows = [{"id": str(i), "prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": b}], "chosen_prob": 0.9, "source": "ai", "provenance": {"stage": "label"}}
            for i, (a, b) in enumerate([("a", "b"), ("b", "c"), ("a", "d"), ("e", "e")])]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, stats = kto_dataset(path, KTOSettings())
    # "b" lost to "a" and beat "c": contradictory, left out; "a" wins twice (kept once); e == e says nothing.
    assert stats["contradictory_answers"] == 1 and stats["identical_pairs"] == 1
    assert (stats["desirable"], stats["undesirable"]) == (1, 2)
    assert balanced_weight(stats, 1.0) == 2.0  # λ_D n_D = λ_U n_U
    with pytest.raises(CaiError, match="batch_size >= 2"):
        KTOSettings(train=small(batch_size=1))


def test_kto_trains_toward_desirable_and_saves_a_loadable_adapter(tiny_causal_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = train_kto(write_pairs(tmp_path / "p.jsonl", [0.9] * 8), str(tiny_causal_lm_dir), tmp_path / "kto",
                        KTOSettings(train=small(max_steps=8)))
    losses = [h["loss"] for h in metrics["log_history"]]
    assert metrics["steps"] == 8 and losses[-1] < losses[0]
    assert metrics["desirable"] == metrics["undesirable"] == 8 and metrics["desirable_weight"] == 1.0
    stored = json.loads((tmp_path / "kto" / "metrics.json").read_text())
    assert stored["stage"] == "kto" and stored["log_history"]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), str(tmp_path / "kto" / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)

    def margin():
        return completion_logprob(tuned, tokenizer, "Question 1?", "yes please") - completion_logprob(tuned, tokenizer, "Question 1?", "no way")

    after = margin()
    with tuned.disable_adapter():
        before = margin()
    assert after > before + 1


# -- online DPO ---------------------------------------------------------------------------------------
class FixedJudge:
    """Always p for the first answer; records what it was asked."""

    name = "fixed"

    def __init__(self, p):
        self.p = p
        self.calls = []

    def __call__(self, prompts, first, second):
        self.calls.append((list(prompts), list(first), list(second)))
        return [self.p] * len(prompts)


def online_settings(**overrides):
    base = dict(train=small(max_steps=2, batch_size=2, learning_rate=1e-3), max_completion_length=6)
    base.update(overrides)
    return OnlineDPOSettings(**base)


@pytest.fixture(scope="module")
def feedback_engine(tiny_causal_lm_dir):
    from cai.engines.hf import HFEngine

    return HFEngine(str(tiny_causal_lm_dir))


@pytest.fixture(scope="module")
def constitution():
    from cai.constitution import load_constitution

    return load_constitution(str(ROOT / "constitutions" / "harmless.yaml"))


def test_constitution_judge_is_cais_swap_debiased_labeller(feedback_engine, constitution, tmp_path):
    from cai.labeling import LabelRun, Pair
    from cai.prompts import PromptSet

    judge = ConstitutionJudge(feedback_engine, constitution, LabelSettings(principles_per_pair=2))
    prompt = [{"role": "user", "content": "How do I bake bread?"}]
    a, b = "Mix flour, water, salt and yeast.", "I cannot help with that request."
    (p,) = judge([prompt], [a], [b])
    record = judge.last[0]
    assert len(record["principle_ids"]) == 2 and set(record["order_probs"]) == {"ab", "ba"}  # both orders read
    # The label is LabelRun's own for that pair: the same principles, reads and average.
    offline = LabelRun(feedback_engine, constitution, [Pair(record["id"], tuple(prompt), a, b)], PromptSet(), tmp_path,
                       LabelSettings(principles_per_pair=2), show_progress=False)
    offline.run()
    assert offline.records()[0]["label"]["p_a"] == pytest.approx(p, abs=1e-6)
    (swapped,) = judge([prompt], [b], [a])
    assert swapped == pytest.approx(1 - p, abs=1e-5)  # swap-debiased: the answer's slot does not matter


def test_online_dpo_samples_judges_and_trains(tiny_causal_lm_dir, feedback_engine, constitution, tmp_path, monkeypatch):
    judge = ConstitutionJudge(feedback_engine, constitution)
    asked = []
    score = feedback_engine.score_choices

    def recording(prompts, choices, adapter=None):
        asked.append(len(prompts))
        return score(prompts, choices, adapter)

    monkeypatch.setattr(feedback_engine, "score_choices", recording)
    metrics = train_online_dpo(PROMPTS, str(tiny_causal_lm_dir), judge, tmp_path / "odpo", online_settings())
    assert metrics["steps"] == 2 and metrics["judge"] == "labeller"
    assert asked == [4, 4]  # each step: 2 prompts x 2 orders, read by the feedback model
    judged = [json.loads(line) for line in (tmp_path / "odpo" / "work" / "judged.jsonl").read_text().splitlines()]
    assert [r["step"] for r in judged] == [1, 1, 2, 2]
    assert {r["prompt"][0]["content"] for r in judged} <= {p.messages[0]["content"] for p in PROMPTS}
    assert all(0 <= r["p_first"] <= 1 for r in judged) and any(r["first"] != r["second"] for r in judged)
    history = metrics["log_history"]
    assert len(history) == 2 and all("judge/p_first" in h and "rewards/margins" in h for h in history)
    assert history[0]["judge/p_first"] == pytest.approx(sum(r["p_first"] for r in judged[:2]) / 2, abs=1e-6)
    assert (tmp_path / "odpo" / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "odpo" / "metrics.json").read_text())["stage"] == "online_dpo"


def one_step_gradient(model_dir, tmp_path, p, **overrides):
    """The LoRA gradient of one online-DPO loss step on the same samples (fixed seed), judge p."""
    from cai.train import online_dpo_trainer

    captured = {}
    real = online_dpo_trainer.OnlineDPOTrainer.compute_loss

    def spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        torch.manual_seed(123)
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        model.zero_grad()
        loss.backward(retain_graph=True)
        captured["grad"] = torch.cat([q.grad.flatten().clone() for n, q in model.named_parameters() if "lora_" in n])
        captured["loss"] = loss.item()
        model.zero_grad()
        return loss * 0  # no update: every call sees the same policy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online_dpo_trainer.OnlineDPOTrainer, "compute_loss", spy)
        judge = FixedJudge(p)
        train_online_dpo(PROMPTS[:2], str(model_dir), judge, tmp_path / f"p{p}-{len(overrides)}", online_settings(
            train=small(max_steps=1, batch_size=2, learning_rate=1e-3), **overrides))
    return captured["grad"], judge


def test_the_judges_probability_drives_the_update(tiny_causal_lm_dir, tmp_path):
    """At the first step the policy is the reference (LoRA B = 0), so the sigmoid soft loss's
    gradient is (0.5 - p) x d(margin): zero for p = 0.5, and p = 0 is exactly p = 1 reversed."""
    up, judge = one_step_gradient(tiny_causal_lm_dir, tmp_path, 1.0)
    assert len(judge.calls) == 1 and judge.calls[0][1] != judge.calls[0][2]  # two different samples were judged
    down, _ = one_step_gradient(tiny_causal_lm_dir, tmp_path, 0.0)
    half, _ = one_step_gradient(tiny_causal_lm_dir, tmp_path, 0.5)
    soft, _ = one_step_gradient(tiny_causal_lm_dir, tmp_path, 0.8)
    assert up.abs().max() > 1e-4
    assert torch.allclose(down, -up, atol=1e-6)
    assert torch.count_nonzero(half) == 0
    assert torch.allclose(soft, 0.6 * up, atol=1e-6)  # (0.5 - 0.8) / (0.5 - 1)
    hard, _ = one_step_gradient(tiny_causal_lm_dir, tmp_path, 0.8, labels="hard")
    assert torch.allclose(hard, up, atol=1e-6)  # hard labels use the pick only


def test_reward_model_judge_is_bradley_terry(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai.train.reward import RewardScorer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    scorer = RewardScorer(model, tokenizer)
    prompt = [{"role": "user", "content": "hi"}]
    ra, rb = scorer.score([prompt, prompt], ["hello", "bye"])
    (p,) = RewardJudge(scorer)([prompt], ["hello"], ["bye"])
    assert p == pytest.approx(1 / (1 + torch.exp(torch.tensor(rb - ra)).item()))


def test_settings_refuse_what_cannot_work():
    with pytest.raises(CaiError, match="sampled, not greedy"):
        OnlineDPOSettings(temperature=0)
    with pytest.raises(CaiError, match="below train.max_length"):
        OnlineDPOSettings(max_completion_length=128, train=small(max_length=128))
    with pytest.raises(CaiError, match="unknown judge"):
        OnlineDPOSettings(judge="oracle")


# -- recipe stages and commands -----------------------------------------------------------------------
TINY_RECIPE = """\
name: tiny-online
model: {model}
output_dir: {out}
constitution: constitutions/harmless.yaml
stages: [blend, kto, online_dpo]
engine: {{kind: hf, batch_size: 8}}
blend:
  sources: [{{path: cai/data/human/hh_pairs.jsonl, weight: 0.1}}]
  eval_fraction: 0.2
kto:
  settings: {{train: {{max_steps: 2, batch_size: 2, max_length: 128, lora: {{r: 4, alpha: 8}}}}}}
online_dpo:
  prompts: [{{path: cai/data/prompts/red_team.jsonl, limit: 4}}]
  settings:
    max_completion_length: 6
    labeller: {{principles_per_pair: 1}}
    train: {{max_steps: 2, batch_size: 2, max_length: 128, lora: {{r: 4, alpha: 8}}, trl: {{lr_scheduler_type: constant}}}}
"""


def test_recipe_runs_kto_and_online_dpo_stages(tiny_causal_lm_dir, tmp_path, monkeypatch):
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    monkeypatch.chdir(ROOT)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(model=tiny_causal_lm_dir, out=tmp_path / "run"))
    recipe = load_recipe(path)
    assert recipe.online_dpo.settings.train.trl == {"lr_scheduler_type": "constant"}
    assert recipe.online_dpo.settings.train.learning_rate == 5e-5  # the stage's own default, kept
    assert list(RecipeRunner(recipe, log=lambda line: None).run()) == ["blend", "kto", "online_dpo"]
    out = tmp_path / "run"
    for stage in ("kto", "online_dpo"):
        assert (out / stage / "adapter" / "adapter_config.json").exists()
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["log_history"] and metrics["stage"] == stage
        done = json.loads((out / stage / "done.json").read_text())
        assert done["summary"]["steps"] == 2 and "log_history" not in done["summary"]
    assert json.loads((out / "online_dpo" / "metrics.json").read_text())["judge"] == "labeller"
    judged = (out / "online_dpo" / "work" / "judged.jsonl").read_text().splitlines()
    assert len(judged) == 4 and json.loads(judged[0])["judge"] == "labeller"
    logs = []
    assert RecipeRunner(load_recipe(path), log=logs.append).run() == {}  # unchanged: skipped
    changed = load_recipe(path, ["online_dpo.settings.beta=0.2"])
    assert list(RecipeRunner(changed, log=logs.append).run()) == ["online_dpo"]


def test_recipe_refuses_bad_settings_and_trl_keys(tmp_path):
    from cai.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nstages: [kto]\nkto:\n  settings:\n    train: {trl: {beta: 0.3}}\n")
    with pytest.raises(CaiError, match=r"'beta' is cai's own setting for kto \(set kto.settings.beta instead\)"):
        load_recipe(path)
    path.write_text("name: r\nstages: [online_dpo]\nonline_dpo:\n  settings:\n    train: {trl: {warmup_stepz: 3}}\n")
    with pytest.raises(CaiError, match="unknown OnlineDPOArguments field 'warmup_stepz'"):
        load_recipe(path)
    path.write_text("name: r\nstages: [online_dpo]\nonline_dpo:\n  settings:\n    labels: fuzzy\n")
    with pytest.raises(CaiError, match=r"r.yaml:5: field 'online_dpo.settings.labels'"):
        load_recipe(path)


@pytest.mark.parametrize("command", ["kto", "online-dpo"])
def test_commands_have_help_on_every_option(command, capsys):
    import typer.core
    import typer.main

    from cai.cli import app, main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out
    group = typer.main.get_command(app)
    options = [p for p in group.commands[command].params if isinstance(p, typer.core.TyperOption) and p.name != "help"]
    assert options and all(p.help for p in options), [p.name for p in options if not p.help]


def test_cli_kto_and_online_dpo_train(tiny_causal_lm_dir, tmp_path, capsys):
    from cai.cli import main as cli

    def main(args):
        with pytest.raises(SystemExit) as exit_info:
            cli(args)
        assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]

    train = ["--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.max_length=128",
             "--set", "train.lora.r=4", "--set", "train.lora.alpha=8"]
    data = write_pairs(tmp_path / "p.jsonl", [0.9, 0.8, 0.7, 0.95])
    main(["kto", "--data", str(data), "--model", str(tiny_causal_lm_dir), "--out", str(tmp_path / "kto"), *train])
    assert json.loads((tmp_path / "kto" / "metrics.json").read_text())["steps"] == 1
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    main(["online-dpo", "--prompts", str(prompts), "--model", str(tiny_causal_lm_dir), "--out", str(tmp_path / "odpo"),
          "--engine", "hf", "--constitution", "constitutions/harmless.yaml", *train, "--set", "max_completion_length=4"])
    metrics = json.loads((tmp_path / "odpo" / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["judge"] == "labeller"
    assert '"judge": "labeller"' in capsys.readouterr().out
