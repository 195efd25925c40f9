"""Packed rows (cai/train/packing.py): the same log-probs, loss and gradients as the padded batch,
fewer rows through the model, and cai's trainers really pack."""

import pytest
import torch

from cai.train import packing
from cai.train.packing import Packing, plan_bins

trl_utils = pytest.importorskip("trl.trainer.utils")


def test_plan_bins_first_fit_decreasing():
    assert plan_bins([120, 50, 60, 128, 70], 128) == [[3], [0], [4, 1], [2]]  # 60 no longer fits beside 70; 50 does
    assert plan_bins([10, 10, 10], 30) == [[0, 1, 2]]
    assert plan_bins([5], 5) == [[0]]


def test_plan_skips_left_padding_and_batches_that_do_not_shrink():
    assert Packing.plan(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padded
    assert Packing.plan(torch.tensor([[1, 1, 0], [1, 1, 1]])) is None  # 2 + 3 > 3: two rows either way
    plan = Packing.plan(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert plan.bins == [[1], [0, 2]]
    ids = torch.tensor([[5, 6, 0, 0], [1, 2, 3, 4], [7, 0, 0, 0]])
    assert plan.pack(ids, 0).tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert plan.position_ids("cpu").tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert plan.labels(ids).tolist() == [[-100, 2, 3, 4], [-100, 6, -100, -100]]


def _model(tiny_causal_lm_dir, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32, attn_implementation="sdpa")
    trl_utils.add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             init_lora_weights=False))
    return model


def _batch():
    torch.manual_seed(1)
    lengths = [9, 23, 5, 14, 23, 7]
    ids = torch.randint(5, 60, (len(lengths), max(lengths) + 2))  # +2: padded past the longest row
    mask = (torch.arange(ids.size(1)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a "prompt" of 3 tokens per row
    return ids, mask, labels


def _backbone_calls(model) -> list:
    """The input_ids shape of every call that reaches the transformer layers."""
    calls = []
    model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    return calls


def _run(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    weights = torch.linspace(0.5, 1.5, out.log_probs.size(1))  # a loss that reads every position
    (out.log_probs * weights).sum().mul(0.1).add(out.loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_packed_forward_equals_padded(tiny_causal_lm_dir):
    ids, mask, labels = _batch()
    model = _model(tiny_causal_lm_dir)
    want, want_grads = _run(model, ids, mask, labels)
    assert packing.install(model) and not packing.install(model)  # idempotent
    assert packing.honours_packing(model.get_base_model())  # the one-off probe, before counting calls
    calls = _backbone_calls(model)
    got, got_grads = _run(model, ids, mask, labels)
    assert calls == [torch.Size([4, 23])]  # 6 padded rows of 25 -> 4 packed rows of 23
    assert got.log_probs.shape == want.log_probs.shape
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.label_mask, want.label_mask)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_first_token_of_a_packed_sequence_is_not_scored(tiny_causal_lm_dir):
    """Without the -100 at each sequence start, the previous sequence's last token would predict it."""
    ids, mask, labels = _batch()
    labels = ids.masked_fill(mask == 0, -100)  # every token labelled, first ones included
    model = _model(tiny_causal_lm_dir)
    want, _ = _run(model, ids, mask, labels)
    packing.install(model)
    got, _ = _run(model, ids, mask, labels)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    assert int(got.label_mask.sum()) == int(want.label_mask.sum())


def test_other_calls_are_left_alone(tiny_causal_lm_dir):
    ids, mask, labels = _batch()
    model = _model(tiny_causal_lm_dir)
    packing.install(model)
    seen = _backbone_calls(model)
    model(input_ids=ids, attention_mask=mask)  # plain logits: no fused head
    assert seen == [ids.shape]


def test_dpo_trainer_packs_and_learns_the_same(tiny_causal_lm_dir, tmp_path, monkeypatch):
    """cai's DPO trainer goes through the packing (policy and reference passes), and with dropout
    off its losses equal the padded run's."""
    import json

    from cai.lora import LoraSettings
    from cai.train.policy import DPOSettings, TrainSettings, train_dpo

    rows = [{"id": str(i), "prompt": [{"role": "user", "content": "Tell me something " + "very " * (i % 4 * 6)}],
             "chosen": [{"role": "assistant", "content": "sure " * (1 + i % 3)}],
             "rejected": [{"role": "assistant", "content": "no " * (2 + i % 5)}],
             "chosen_prob": 0.8, "source": "ai", "provenance": {"stage": "label"}} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = DPOSettings(train=TrainSettings(lora=LoraSettings(r=8, alpha=16, dropout=0.0), learning_rate=1e-2,
                                               batch_size=4, max_steps=2, save_steps=1000, max_length=128))
    before = dict(packing.STATS)
    packed = train_dpo(data, str(tiny_causal_lm_dir), tmp_path / "packed", settings)
    assert packing.STATS["packed_calls"] - before["packed_calls"] >= 2  # a step's policy and reference passes
    assert packing.STATS["rows_out"] - before["rows_out"] < packing.STATS["rows_in"] - before["rows_in"]
    monkeypatch.setattr(packing, "install", lambda model: False)
    padded = train_dpo(data, str(tiny_causal_lm_dir), tmp_path / "padded", settings)
    assert [h["loss"] for h in packed["log_history"]] == pytest.approx([h["loss"] for h in padded["log_history"]], abs=1e-5)


def test_sequence_scores_equal_the_padded_classifier(tiny_classifier_dir):
    """The reward model's rewards and gradients from packed rows equal the padded forward's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False, task_type="SEQ_CLS", modules_to_save=["score"]))
    ids, mask, _ = _batch()
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)  # as the reward collator pads
    ids[1, 22] = model.config.pad_token_id  # a row ending in the pad id: transformers reads the token before
    rows = torch.linspace(-1, 1, ids.size(0))

    def run(scores):
        model.zero_grad()
        out = scores()
        (out.squeeze(-1) * rows).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert packing.honours_packing(model.get_base_model())
    calls = _backbone_calls(model)
    before = packing.STATS["packed_calls"]
    got, got_grads = run(lambda: packing.sequence_scores(model, ids, mask))
    assert packing.STATS["packed_calls"] == before + 1 and calls == [torch.Size([4, 23])]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and any("score" in n for n in want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _opt_config(**extra):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     word_embed_proj_dim=32, pad_token_id=0, attn_implementation="sdpa", **extra)


def _opt():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_opt_config(), attn_implementation="sdpa")


def test_an_architecture_that_ignores_packed_positions_is_not_packed():
    """OPT builds its positions from the attention mask: packed rows would attend across
    sequences. The probe finds it, and the fused-head calls stay padded and exact."""
    ids, mask, labels = _batch()
    model = _opt()
    assert not packing.honours_packing(model)
    model.train()
    trl_utils.add_fused_lm_head(model)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        packing.install(model)
        seen = []
        model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    assert seen == [ids.shape]
    torch.testing.assert_close(got.log_probs, want.log_probs)


def test_the_probe_leaves_each_module_in_its_mode(tiny_causal_lm_dir):
    model = _model(tiny_causal_lm_dir, dropout=0.1)
    model.train()
    model.get_base_model().lm_head.eval()  # a module deliberately in eval mode stays so
    inner = model.get_base_model()
    assert packing.honours_packing(inner)
    assert inner.training and not inner.lm_head.training
    assert all(m.training for n, m in inner.named_modules() if "lora_dropout" in n)


def test_reward_scores_of_such_an_architecture_stay_padded():
    from transformers import OPTForSequenceClassification

    ids, mask, _ = _batch()
    torch.manual_seed(0)
    model = OPTForSequenceClassification(_opt_config(num_labels=1))
    assert model.config._attn_implementation == "sdpa"  # a packing candidate but for the probe
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = packing.sequence_scores(model, ids, mask)
    torch.testing.assert_close(got, want)
