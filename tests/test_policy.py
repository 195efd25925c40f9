import json

import pytest
import torch

from cai.lora import LoraSettings
from cai.train.policy import DPOSettings, TrainSettings, train_dpo, train_sft


def small(**overrides):
    base = dict(lora=LoraSettings(r=8, alpha=16, dropout=0.0), learning_rate=1e-2, batch_size=4, max_steps=12,
                save_steps=1000, max_length=128)
    base.update(overrides)
    return TrainSettings(**base)


def write_sft(path, n=8):
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": "hello friend"}],
             "provenance": {"stage": "critique"}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_pairs(path, n=8, prob=1.0):
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "yes please"}], "rejected": [{"role": "assistant", "content": "no way"}],
             "chosen_prob": prob, "source": "ai", "provenance": {"stage": "label"}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def completion_logprob(model, tokenizer, prompt, completion):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    prefix = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    full = tokenizer(text + completion, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
    targets = full[0, 1:]
    start = prefix.shape[1] - 1
    return logprobs[start:].gather(-1, targets[start:, None]).sum().item()


def load_with_adapter(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir)), AutoTokenizer.from_pretrained(base_dir)


def test_sft_learns_the_answer_and_masks_the_prompt(tiny_causal_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "sft", small())
    losses = [h["loss"] for h in metrics["log_history"]]
    assert losses[-1] < losses[0] * 0.5
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    tuned, _ = load_with_adapter(tiny_causal_lm_dir, tmp_path / "sft" / "adapter")
    before = completion_logprob(base, tokenizer, "Say hello 3", "hello friend")
    after = completion_logprob(tuned, tokenizer, "Say hello 3", "hello friend")
    assert after > before + 5


def test_dpo_moves_toward_chosen(tiny_causal_lm_dir, tmp_path):
    metrics = train_dpo(write_pairs(tmp_path / "p.jsonl"), str(tiny_causal_lm_dir), tmp_path / "dpo", DPOSettings(train=small()))
    tuned, tokenizer = load_with_adapter(tiny_causal_lm_dir, tmp_path / "dpo" / "adapter")
    margin_after = completion_logprob(tuned, tokenizer, "Question 1?", "yes please") - completion_logprob(tuned, tokenizer, "Question 1?", "no way")
    with tuned.disable_adapter():
        margin_before = completion_logprob(tuned, tokenizer, "Question 1?", "yes please") - completion_logprob(tuned, tokenizer, "Question 1?", "no way")
    assert margin_after > margin_before + 1
    assert metrics["soft_labels"] == "soft" and metrics["applied_mean_chosen_prob"] == 1.0
    assert metrics["log_history"][-1]["loss"] < metrics["log_history"][0]["loss"]


def soft_trainer(model_dir, tmp_path, loss_type="sigmoid", prob=0.7):
    """A SoftDPOTrainer on four pairs labelled `prob`, and one batch from its own dataloader."""
    from trl import DPOConfig

    from cai import runtime
    from cai.train.dpo_soft import SoftDPOTrainer
    from cai.train.policy import dpo_dataset, load_policy

    settings = small(batch_size=4)
    dataset, _ = dpo_dataset(write_pairs(tmp_path / "p.jsonl", n=4, prob=prob), DPOSettings(train=settings))
    model, tokenizer, lora = load_policy(str(model_dir), settings, "cpu")
    config = DPOConfig(beta=0.1, loss_type=[loss_type], max_length=128, **runtime.trainer_arguments(settings, tmp_path / "out", "cpu"))
    trainer = SoftDPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    return trainer, next(iter(trainer.get_train_dataloader()))


def loss_and_grad(trainer, batch, p):
    trainer.model.zero_grad()
    batch = {**batch, "chosen_prob": torch.full_like(batch["chosen_prob"], p)}
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([q.grad.flatten() for n, q in trainer.model.named_parameters() if "lora_" in n])
    return loss.item(), grads


def move_off_reference(model):
    """LoRA starts with B = 0 (policy == reference, margin 0); give B fixed values so margins differ."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_soft_label_moves_loss_and_gradient_and_p1_is_trls_loss(tiny_causal_lm_dir, tmp_path, loss_type):
    from trl import DPOTrainer

    trainer, batch = soft_trainer(tiny_causal_lm_dir, tmp_path, loss_type)
    assert batch["chosen_prob"].tolist() == pytest.approx([0.7] * 4)  # the column survived TRL's processing
    move_off_reference(trainer.model)
    hard, hard_grad = loss_and_grad(trainer, batch, 1.0)
    soft, soft_grad = loss_and_grad(trainer, batch, 0.7)
    trl_loss = DPOTrainer._compute_loss(trainer, trainer.model, {k: v for k, v in batch.items() if k != "chosen_prob"}, False)
    assert hard == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-7)
    assert abs(soft - hard) > 1e-3
    assert not torch.allclose(soft_grad, hard_grad)


def test_half_label_gives_no_gradient_while_policy_is_the_reference(tiny_causal_lm_dir, tmp_path):
    trainer, batch = soft_trainer(tiny_causal_lm_dir, tmp_path)  # fresh adapter: margin exactly 0
    _, half = loss_and_grad(trainer, batch, 0.5)
    _, hard = loss_and_grad(trainer, batch, 1.0)
    assert torch.count_nonzero(half) == 0
    assert hard.abs().max() > 1e-4


def test_soft_labels_train_end_to_end_and_record_what_was_applied(tiny_causal_lm_dir, tmp_path):
    metrics = train_dpo(write_pairs(tmp_path / "p.jsonl", prob=0.8), str(tiny_causal_lm_dir), tmp_path / "dpo",
                        DPOSettings(train=small(max_steps=2)))
    assert metrics["soft_labels"] == "soft" and metrics["loss"].startswith("conservative sigmoid")
    assert metrics["applied_mean_chosen_prob"] == pytest.approx(0.8) and metrics["steps"] == 2
    assert all(h["chosen_prob"] == pytest.approx(0.8) for h in metrics["log_history"])  # what the loss saw
    stored = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert stored["soft_labels"] == "soft" and stored["applied_mean_chosen_prob"] == pytest.approx(0.8)

    hard = train_dpo(write_pairs(tmp_path / "p.jsonl", prob=0.8), str(tiny_causal_lm_dir), tmp_path / "hard",
                     DPOSettings(train=small(max_steps=1), soft_labels="ignore"))
    assert hard["applied_mean_chosen_prob"] == 1.0 and hard["mean_chosen_prob"] == pytest.approx(0.8)
    assert hard["log_history"][0]["chosen_prob"] == 1.0


def test_label_smoothing_mode_is_refused():
    from cai.errors import CaiError

    with pytest.raises(CaiError, match="TRL's sigmoid DPO loss ignores label_smoothing"):
        DPOSettings(soft_labels="label_smoothing")


def test_reference_by_disabled_adapter_is_exactly_the_base(tiny_causal_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    train_dpo(write_pairs(tmp_path / "p.jsonl"), str(tiny_causal_lm_dir), tmp_path / "dpo", DPOSettings(train=small(max_steps=2)))
    tuned, _ = load_with_adapter(tiny_causal_lm_dir, tmp_path / "dpo" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad(), tuned.disable_adapter():
        reference = tuned(ids).logits
    assert torch.equal(reference, base(ids).logits)
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, reference)


def test_dpo_on_top_of_sft_adapter_and_qlora(tiny_causal_lm_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "sft", small(max_steps=2))
    metrics = train_dpo(write_pairs(tmp_path / "p.jsonl"), str(tiny_causal_lm_dir), tmp_path / "dpo",
                        DPOSettings(train=small(max_steps=2)), sft_adapter=str(tmp_path / "sft" / "adapter"))
    assert metrics["steps"] == 2
    quantized = small(max_steps=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0, quantization="4bit"))
    assert train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "qsft", quantized)["steps"] == 2


def test_dpo_after_sft_saves_one_adapter_for_the_plain_base(tiny_causal_lm_dir, tmp_path):
    """DPO trains on base+SFT merged; the saved adapter must reproduce that policy on the plain base
    (what engines and evaluation load), not just the DPO delta."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "sft", small(max_steps=3))
    train_dpo(write_pairs(tmp_path / "p.jsonl"), str(tiny_causal_lm_dir), tmp_path / "dpo",
              DPOSettings(train=small(max_steps=3, lora=LoraSettings(r=4, alpha=16, dropout=0.0))),
              sft_adapter=str(tmp_path / "sft" / "adapter"))
    sft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), str(tmp_path / "sft" / "adapter")).merge_and_unload()
    trained = PeftModel.from_pretrained(sft_merged, str(tmp_path / "dpo" / "stage_adapter"))
    stacked, _ = load_with_adapter(tiny_causal_lm_dir, tmp_path / "dpo" / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected, got = trained(ids).logits, stacked(ids).logits
        delta_only, _ = load_with_adapter(tiny_causal_lm_dir, tmp_path / "dpo" / "stage_adapter")
        wrong = delta_only(ids).logits
    assert json.loads((tmp_path / "dpo" / "adapter" / "adapter_config.json").read_text())["r"] == 8 + 4
    # Merged-then-adapter and stacked adapters add the same terms in another order: float32 rounding
    # only (1.5e-5 measured), against 1.29 for the wrong model below.
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(wrong, expected, atol=1e-3)  # the DPO delta alone is a different model
