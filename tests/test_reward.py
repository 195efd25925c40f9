import json
import math

import pytest
import torch

from cai.lora import LoraSettings
from cai.train.reward import RewardScorer, RewardSettings, evaluate_reward_model, soft_bradley_terry_loss, train_reward_model


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


def test_trainable_weights_stay_fp32_on_a_bf16_base(tiny_classifier_dir, tmp_path, monkeypatch):
    """A bf16 base (what a GPU loads): LoRA and the score head train in fp32, so one AdamW step
    at lr 5e-6 moves the head by ~lr. In bf16 (spacing ~2e-3 at 0.5) that step rounds away."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from cai import runtime

    monkeypatch.setattr(runtime, "model_dtype", lambda device: torch.bfloat16)
    train = write_pairs(tmp_path / "train.jsonl", n=4)
    metrics = train_reward_model(train, str(tiny_classifier_dir), tmp_path / "rm", small(max_steps=1, learning_rate=5e-6))
    assert metrics["steps"] == 1 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    saved = load_file(str(tmp_path / "rm" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    head = next(t for k, t in saved.items() if "score" in k)
    start = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1, dtype=torch.bfloat16).score.weight.float()
    moved = (head - start).abs()
    assert (moved > 0).float().mean() > 0.9  # every weight with a gradient moved ...
    assert moved.max() < 2e-5  # ... by about one learning rate (Adam's first step)


LONG = "Question {i}? " + "The assistant answers questions helpfully. " * 10  # ~130 tokens with an answer


def write_long_and_short(path, n=8):
    """Half the pairs have a prompt far longer than max_length 64; the answers are all short."""
    rows = [json.loads(line) for line in write_pairs(path, n=n).read_text().splitlines()]
    for i, row in enumerate(rows[: n // 2]):
        row["prompt"] = [{"role": "user", "content": LONG.format(i=i)}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_long_pairs_are_truncated_from_the_prompt_side_not_dropped(tiny_classifier_dir, tmp_path):
    from transformers import AutoTokenizer

    from cai.train.reward import _dataset, reward_text

    rows = write_long_and_short(tmp_path / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    settings = small(max_length=64, max_steps=-1, epochs=1.0, batch_size=4)
    dataset, counts = _dataset(rows, settings, tokenizer)
    assert len(dataset) == 8
    full = [tokenizer(reward_text(tokenizer, r["prompt"], r["chosen"][0]["content"]), add_special_tokens=False)["input_ids"] for r in rows]
    answer = tokenizer(rows[0]["chosen"][0]["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for ids, kept in zip(full, dataset["chosen_ids"]):
        assert kept == ids[-64:]  # the oldest prompt tokens go; the answer and its last token stay
    assert all(len(ids) > 64 for ids in full[:4]) and all(len(ids) <= 64 for ids in full[4:])
    assert dataset["chosen_ids"][0][-len(answer):] == answer and dataset["chosen_ids"][0][0] != full[0][0]
    cut = sum(len(ids) - 64 for r in rows[:4] for ids in (
        tokenizer(reward_text(tokenizer, r["prompt"], a[0]["content"]), add_special_tokens=False)["input_ids"] for a in (r["chosen"], r["rejected"])))
    assert counts == {"truncated_pairs": 4, "truncated_tokens": cut}
    # Every pair is trained on: 8 pairs at batch 4 take 2 steps (TRL's filter kept 4: 1 step).
    metrics = train_reward_model(tmp_path / "train.jsonl", str(tiny_classifier_dir), tmp_path / "rm", settings)
    assert metrics["steps"] == 2 and metrics["truncated_pairs"] == 4 and metrics["truncated_tokens"] == cut


def test_scorer_truncates_the_prompt_side(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    scorer = RewardScorer(model, tokenizer, max_length=64)
    conversation = [{"role": "user", "content": LONG.format(i=1)}]
    messages = conversation + [{"role": "assistant", "content": "yes please"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert len(ids) > 64
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[-64:]])).logits.item()
    assert scorer.score([conversation], ["yes please"])[0] == pytest.approx(expected, abs=1e-5)


class FixedScorer:
    """Rewards by answer text: sets P(chosen wins) exactly for the calibration tests."""

    def __init__(self, rewards):
        self.rewards = rewards

    def score(self, conversations, responses):
        return [self.rewards[r] for r in responses]


def pairs_at(confidence, right, wrong, start=0):
    """`right` pairs the model gets right and `wrong` it gets wrong, all at `confidence`."""
    margin = math.log(confidence / (1 - confidence))
    records, rewards = [], {}
    for i in range(start, start + right + wrong):
        good, bad = f"good {i}", f"bad {i}"
        rewards[good], rewards[bad] = (margin, 0.0) if i - start < right else (0.0, margin)
        records.append({"id": f"r{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}], "chosen_prob": 1.0, "source": "human", "provenance": {}})
    return records, rewards


def test_ece_compares_confidence_with_agreement():
    calibrated_a, rewards_a = pairs_at(0.75, right=6, wrong=2)  # 75% sure, right 75% of the time
    calibrated_b, rewards_b = pairs_at(0.55, right=11, wrong=9, start=100)
    calibrated = evaluate_reward_model(FixedScorer({**rewards_a, **rewards_b}), calibrated_a + calibrated_b)
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-4) and calibrated["accuracy"] == round(17 / 28, 4)
    over, rewards_over = pairs_at(0.95, right=6, wrong=4, start=200)  # 95% sure, right 60% of the time
    assert evaluate_reward_model(FixedScorer(rewards_over), over)["ece"] == pytest.approx(0.35, abs=1e-4)
    mixed = evaluate_reward_model(FixedScorer({**rewards_a, **rewards_b, **rewards_over}), calibrated_a + calibrated_b + over)
    assert mixed["ece"] == pytest.approx(10 / 38 * 0.35, abs=1e-4)  # weighted by bin size
