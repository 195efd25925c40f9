import json

import pytest
import torch

from cai.lora import LoraSettings
from cai.reward import RewardScorer, RewardSettings, evaluate_reward_model, soft_bradley_terry_loss, train_reward_model


def write_pairs(path, n=24, prob=1.0, source="human"):
    """A separable toy set: chosen answers say "yes please", rejected ones "no way"."""
    rows = []
    for i in range(n):
        rows.append({
            "id": f"r{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": "yes please " * (1 + i % 3)}],
            "rejected": [{"role": "assistant", "content": "no way " * (1 + i % 2)}],
            "chosen_prob": prob, "source": source, "provenance": {"stage": "import"},
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_soft_loss_special_cases():
    r_c = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    r_r = torch.zeros(3)
    half = torch.full((3,), 0.5)
    loss = soft_bradley_terry_loss(r_c, r_r, torch.ones(3))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(r_c).mean().item())
    # p = 0.5 at equal rewards: no push toward either answer.
    tie = torch.zeros(2, requires_grad=True)
    soft_bradley_terry_loss(tie, torch.zeros(2), torch.full((2,), 0.5)).backward()
    assert torch.allclose(tie.grad, torch.zeros(2))
    # The optimum of the soft loss is r_c - r_r = logit(p).
    delta = torch.tensor([0.0], requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=1.0)
    for _ in range(300):
        optimizer.zero_grad()
        soft_bradley_terry_loss(delta, torch.zeros(1), torch.tensor([0.8])).backward()
        optimizer.step()
    assert delta.item() == pytest.approx(torch.logit(torch.tensor(0.8)).item(), abs=1e-3)
    weighted = soft_bradley_terry_loss(r_c, r_r, half, torch.tensor([1.0, 0.0, 0.0]))
    assert weighted.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item())


def small(**overrides):
    base = dict(lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=5e-3, batch_size=4, max_steps=30,
                save_steps=1000, max_length=128)
    base.update(overrides)
    return RewardSettings(**base)


def test_training_learns_separable_preferences_and_reloads_identically(tiny_classifier_dir, tmp_path):
    train = write_pairs(tmp_path / "train.jsonl")
    evaluation = write_pairs(tmp_path / "eval.jsonl", n=8)
    metrics = train_reward_model(train, str(tiny_classifier_dir), tmp_path / "rm", small(), eval_file=evaluation)
    losses = [h["loss"] for h in metrics["log_history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.7
    assert metrics["eval"]["accuracy"] == 1.0 and metrics["eval"]["accuracy_human"] == 1.0
    assert metrics["eval"]["accuracy_ai"] is None and 0 <= metrics["eval"]["ece"] <= 1
    saved = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert saved["eval"] == metrics["eval"]
    # The score head travels with the adapter: a reloaded model gives the same scores.
    from transformers import AutoModelForSequenceClassification

    assert "score" in json.loads((tmp_path / "rm" / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    reloaded = RewardScorer.load(tmp_path / "rm")
    again = RewardScorer.load(tmp_path / "rm")
    conversations = [[{"role": "user", "content": "Question 3?"}]] * 2
    first = reloaded.score(conversations, ["yes please yes please ", "no way "])
    assert first == pytest.approx(again.score(conversations, ["yes please yes please ", "no way "]), abs=1e-6)
    assert first[0] > first[1]
    # Identical to the in-memory model's evaluation, number for number.
    assert evaluate_reward_model(reloaded, [json.loads(l) for l in evaluation.read_text().splitlines()]) == metrics["eval"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1)
    assert not torch.allclose(base.score.weight, reloaded.model.base_model.model.score.modules_to_save["default"].weight)


def test_merged_model_scores_like_the_adapter(tiny_classifier_dir, tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", n=8)
    train_reward_model(train, str(tiny_classifier_dir), tmp_path / "rm", small(max_steps=3, merge=True))
    adapter, merged = RewardScorer.load(tmp_path / "rm"), RewardScorer.load(tmp_path / "rm" / "merged")
    conversations = [[{"role": "user", "content": "Q?"}]] * 3
    answers = ["yes please", "no way", "maybe"]
    assert adapter.score(conversations, answers) == pytest.approx(merged.score(conversations, answers), abs=1e-4)


def test_half_labels_teach_nothing(tiny_classifier_dir, tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", prob=0.5)
    train_reward_model(train, str(tiny_classifier_dir), tmp_path / "rm", small(max_steps=15))
    scorer = RewardScorer.load(tmp_path / "rm")
    conversations = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    margins = [a - b for a, b in zip(scorer.score(conversations, ["yes please "] * 6), scorer.score(conversations, ["no way "] * 6))]
    train_reward_model(write_pairs(tmp_path / "hard.jsonl"), str(tiny_classifier_dir), tmp_path / "rm-hard", small(max_steps=15))
    hard_scorer = RewardScorer.load(tmp_path / "rm-hard")
    hard_margins = [a - b for a, b in zip(hard_scorer.score(conversations, ["yes please "] * 6), hard_scorer.score(conversations, ["no way "] * 6))]
    assert sum(hard_margins) / 6 > 1.0
    assert abs(sum(margins) / 6) < 0.25 * sum(hard_margins) / 6


def test_source_weight_zero_ignores_a_source(tiny_classifier_dir, tmp_path):
    flipped = []
    for line in write_pairs(tmp_path / "x.jsonl").read_text().splitlines():
        row = json.loads(line)
        row["chosen"], row["rejected"], row["source"], row["id"] = row["rejected"], row["chosen"], "noisy", row["id"] + "f"
        flipped.append(row)
    good = [json.loads(l) for l in write_pairs(tmp_path / "g.jsonl").read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in good + flipped))
    train_reward_model(mixed, str(tiny_classifier_dir), tmp_path / "rm", small(max_steps=30, source_weights={"noisy": 0.0}))
    scorer = RewardScorer.load(tmp_path / "rm")
    scores = scorer.score([[{"role": "user", "content": "Question 1?"}]] * 2, ["yes please yes please ", "no way no way "])
    assert scores[0] > scores[1]


def test_qlora_4bit_step_on_cpu(tiny_classifier_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    train = write_pairs(tmp_path / "train.jsonl", n=8)
    settings = small(max_steps=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0, quantization="4bit"))
    metrics = train_reward_model(train, str(tiny_classifier_dir), tmp_path / "rm", settings)
    assert metrics["steps"] == 2 and metrics["train_loss"] > 0


def test_scorer_handles_a_different_tokenizer(tiny_classifier_dir, tmp_path, smollm2_dir):
    """Policy text from SmolLM2's world is scored by a reward model with its own tokenizer."""
    from transformers import AutoTokenizer

    train_reward_model(write_pairs(tmp_path / "t.jsonl", n=8), str(tiny_classifier_dir), tmp_path / "rm", small(max_steps=2))
    scorer = RewardScorer.load(tmp_path / "rm")
    policy_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert policy_tokenizer.vocab_size != scorer.tokenizer.vocab_size
    response = policy_tokenizer.decode(policy_tokenizer("A reply with émojis ✓ and numbers 12345")["input_ids"])
    scores = scorer.score([[{"role": "user", "content": "Hi"}]], [response])
    assert len(scores) == 1 and torch.isfinite(torch.tensor(scores)).all()
