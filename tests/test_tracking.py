"""Watching training (issue 21 points 2 and 3): the experiment tracker each stage logs to, evaluation
on the held-out split during training, and progress lines in a terminal-less log and in run.log."""

import json
import re

import pytest

from cai import progress
from cai.errors import CaiError
from cai.lora import LoraSettings
from cai.train.policy import DPOSettings, TrainSettings, train_dpo, train_sft
from cai.train.ppo import PPOSettings, PPOTrainer
from cai.train.reward import RewardSettings, train_reward_model


def small(**overrides):
    base = dict(lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2, batch_size=4, max_steps=4,
                save_steps=1000, max_length=96)
    base.update(overrides)
    return TrainSettings(**base)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n, offset=0):
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "yes please"}], "rejected": [{"role": "assistant", "content": "no way"}],
             "chosen_prob": 0.9, "source": "ai", "provenance": {"stage": "label"}} for i in range(offset, offset + n)]


def blend_dir(tmp_path, held_out=4):
    folder = tmp_path / "blend"
    folder.mkdir()
    write_rows(folder / "train.jsonl", pairs(8))
    write_rows(folder / "eval.jsonl", pairs(held_out, offset=100))
    return folder


def scalars(folder):
    """{tag: [values]} of every TensorBoard event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return found


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("CAI_PROGRESS_SECONDS", "0")


def test_sft_logs_to_tensorboard_in_its_stage_folder_with_progress_lines(tiny_causal_lm_dir, tmp_path, capfd, every_update):
    sft = write_rows(tmp_path / "sft.jsonl", [
        {"id": str(i), "messages": [{"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": "hello friend"}]}
        for i in range(8)])
    progress.set_log_file(tmp_path / "run.log")
    try:
        metrics = train_sft(sft, str(tiny_causal_lm_dir), tmp_path / "sft", small(trl={"report_to": "tensorboard"}))
    finally:
        progress.set_log_file(None)
    logged = scalars(tmp_path / "sft" / "tracking" / "sft")
    assert logged["train/loss"] == pytest.approx([h["loss"] for h in metrics["log_history"]], rel=1e-5)
    assert not list((tmp_path / "sft" / "checkpoints").rglob("events.out.tfevents.*"))  # not transformers' default place
    err = capfd.readouterr().err
    for step in range(1, 5):
        assert f"sft: {step}/4 steps ({step * 25}%)" in err
    assert re.search(r"sft: 1/4 steps \(25%\), [\d.]+ s/step, elapsed \d:\d\d:\d\d, eta \d:\d\d:\d\d", err)
    assert re.search(r"sft: 4/4 steps \(100%\), .*, eta -, loss [\d.]+", err)
    assert "sft: 4/4 steps in" in err
    log = (tmp_path / "run.log").read_text()
    assert "sft: started at 0/4 steps" in log and "sft: 4/4 steps (100%)" in log


def test_no_tracker_unless_asked(tiny_causal_lm_dir, tmp_path):
    sft = write_rows(tmp_path / "sft.jsonl", [
        {"id": "1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4)
    train_sft(sft, str(tiny_causal_lm_dir), tmp_path / "sft", small(max_steps=1))
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_dpo_evaluates_on_the_held_out_split_during_training(tiny_causal_lm_dir, tmp_path):
    settings = DPOSettings(train=small(trl={"eval_strategy": "steps", "eval_steps": 2, "report_to": "tensorboard"}))
    metrics = train_dpo(blend_dir(tmp_path), str(tiny_causal_lm_dir), tmp_path / "dpo", settings)
    evals = metrics["eval_history"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all({"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(e) for e in evals)
    assert evals[0]["eval_chosen_prob"] == pytest.approx(0.9)  # the held-out pairs' own labels
    assert "eval/loss" in scalars(tmp_path / "dpo" / "tracking")


def test_reward_model_evaluates_during_training_when_asked(tiny_classifier_dir, tmp_path):
    folder = blend_dir(tmp_path)
    settings = RewardSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2, batch_size=4, max_steps=4,
                              save_steps=1000, max_length=96, trl={"eval_strategy": "steps", "eval_steps": 2})
    metrics = train_reward_model(folder / "train.jsonl", str(tiny_classifier_dir), tmp_path / "rm", settings,
                                 eval_file=folder / "eval.jsonl")
    assert [e["step"] for e in metrics["eval_history"]] == [2, 4]
    assert all({"eval_loss", "eval_accuracy", "eval_margin"} <= set(e) for e in metrics["eval_history"])


def test_evaluation_asked_without_a_held_out_split_stops_before_training(tiny_causal_lm_dir, tmp_path):
    folder = blend_dir(tmp_path, held_out=0)
    with pytest.raises(CaiError, match="no held-out split.*eval_fraction") as error:
        train_dpo(folder, str(tiny_causal_lm_dir), tmp_path / "dpo", DPOSettings(train=small(trl={"eval_strategy": "steps"})))
    assert error.value.field == "dpo.trl.eval_strategy"
    assert not (tmp_path / "dpo" / "adapter").exists()


def test_ppo_logs_through_the_tracker_and_shows_progress(tiny_causal_lm_dir, tmp_path, capfd, every_update):
    def reward(prompts, responses):
        return [float(len(r) % 3) for r in responses]

    settings = PPOSettings(steps=2, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                           lora=LoraSettings(r=4, alpha=8, dropout=0.0), save_every=10, report_to="tensorboard")
    history = PPOTrainer(str(tiny_causal_lm_dir), reward, [[{"role": "user", "content": "hi"}]], tmp_path / "ppo", settings).train(log=None)
    logged = scalars(tmp_path / "ppo" / "tracking")
    assert logged["reward"] == pytest.approx([h["reward"] for h in history])
    assert logged["kl"] == pytest.approx([h["kl"] for h in history])
    err = capfd.readouterr().err
    assert "ppo: 1/2 steps (50%)" in err and "ppo: 2/2 steps (100%)" in err and "kl " in err


def test_ppo_refuses_an_unknown_tracker():
    with pytest.raises(CaiError, match="unknown tracker") as error:
        PPOSettings(report_to="tensorbored")
    assert error.value.field == "ppo.report_to"


def test_plain_lines_are_throttled(monkeypatch, capfd, tmp_path):
    monkeypatch.setenv("CAI_PROGRESS_SECONDS", "3600")
    progress.set_log_file(tmp_path / "run.log")
    try:
        with progress.StageProgress("label", total=50) as bar:
            for _ in range(50):
                bar.advance(1, tokens=10)
    finally:
        progress.set_log_file(None)
    lines = capfd.readouterr().err.splitlines()
    # Only the completion line and the summary: no line per update inside the interval.
    assert lines[0].startswith("label: 50/50 rows (100%)") and "tok/s" in lines[0]
    assert lines[1].startswith("label: 50/50 rows in") and len(lines) == 2
    assert len((tmp_path / "run.log").read_text().splitlines()) == 3  # started, 100%, summary


def test_a_ppo_recipe_checks_the_run_tracker_at_load():
    from pathlib import Path

    from cai.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart-ppo.yaml"
    with pytest.raises(CaiError, match="trl.report_to.*PPO logs to the same trackers: unknown tracker"):
        load_recipe(str(recipe), ["trl.report_to=neptune"])  # TRL takes it, accelerate's trackers do not
    assert load_recipe(str(recipe), ["trl.report_to=tensorboard"]).trl == {"report_to": "tensorboard"}
