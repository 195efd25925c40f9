import pytest

from cai.engines.hf import HFEngine
from cai.engines.base import SamplingSettings
from cai.lora import LoraSettings
from cai.online import OnlineSettings, best_of_n, reward_function, train_online
from cai.policy import TrainSettings
from cai.prompt_sets import Prompt
from cai.reward import RewardScorer

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
