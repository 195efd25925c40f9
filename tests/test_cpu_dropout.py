"""cai's CPU LoRA dropout (cai/train/cpu_dropout.py): nn.Dropout in distribution, and in the trainers."""

import pytest
import torch
from torch import nn

from cai.train.cpu_dropout import GapDropout, dropped_positions, replace_lora_dropout


@pytest.mark.parametrize("draws", [None, 3], ids=["default-draws", "three-gaps-at-a-time"])
def test_dropped_positions_are_independent_bernoulli_trials(draws):
    torch.manual_seed(0)
    n, p, trials = 20_000, 0.05, 50
    hits = torch.zeros(n)
    pairs = 0
    for _ in range(trials):
        positions = dropped_positions(n, p, draws)
        assert torch.equal(positions, positions.unique()) and positions.min() >= 0 and positions.max() < n
        mask = torch.zeros(n, dtype=torch.bool)
        mask[positions] = True
        hits += mask
        pairs += int((mask[1:] & mask[:-1]).sum())
    total = trials * n
    sigma = (p * (1 - p) / total) ** 0.5
    assert abs(hits.sum() / total - p) < 4 * sigma  # the rate
    assert abs(pairs / (trials * (n - 1)) - p * p) < 4 * (p * p / (trials * (n - 1))) ** 0.5  # neighbours independent
    # Every position is reachable with the same chance: the first and last thousand as often as the middle.
    for block in (hits[:1000], hits[n // 2: n // 2 + 1000], hits[-1000:]):
        assert abs(block.sum() / (trials * 1000) - p) < 4 * (p * (1 - p) / (trials * 1000)) ** 0.5


def test_gap_dropout_scales_what_it_keeps_and_passes_the_gradient_through_the_mask():
    torch.manual_seed(0)
    x = torch.randn(4, 30, 16, requires_grad=True)
    layer = GapDropout(0.2)
    out = layer(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    assert 0.1 < 1 - kept.float().mean() < 0.3
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    assert layer.eval()(x) is x and GapDropout(0.0)(x) is x


def lora_model(tiny_causal_lm_dir, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def test_lora_dropout_is_replaced_on_cpu_and_keeps_eval_outputs(tiny_causal_lm_dir):
    model = lora_model(tiny_causal_lm_dir, 0.3)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        before = model.eval()(ids).logits
    layers = sum(1 for m in model.modules() if type(m) is nn.Dropout and m.p == 0.3)
    assert layers > 0 and replace_lora_dropout(model) == layers
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, before)  # identity in eval mode
        model.train()
        torch.manual_seed(1)
        first = model(ids).logits
        torch.manual_seed(2)
        assert not torch.allclose(model(ids).logits, first)  # and dropping in training
    assert replace_lora_dropout(lora_model(tiny_causal_lm_dir, 0.0)) == 0  # nothing to replace at p = 0


def test_sft_trains_with_the_gap_dropout(tiny_causal_lm_dir, tmp_path, monkeypatch):
    from cai.lora import LoraSettings
    from cai.train.policy import train_sft
    from tests.test_policy import small, write_sft

    calls = []
    real = GapDropout.forward
    monkeypatch.setattr(GapDropout, "forward", lambda self, x: calls.append(self.p) or real(self, x))
    train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "sft",
              small(max_steps=2, lora=LoraSettings(r=4, alpha=8, dropout=0.1)))
    assert calls and set(calls) == {0.1}


def test_gap_dropout_equals_the_masked_product_bit_for_bit():
    """`_ScaleAndDrop` is `x * mask` for the full mask, forward and backward, without building it."""
    from cai.train.cpu_dropout import _ScaleAndDrop

    torch.manual_seed(0)
    x = torch.randn(3, 50, 24, requires_grad=True)
    positions = dropped_positions(x.numel(), 0.1)
    mask = torch.full_like(x, 1 / 0.9)
    mask.view(-1)[positions] = 0
    upstream = torch.randn_like(x)
    want = x * mask
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    got = _ScaleAndDrop.apply(x, positions, 1 / 0.9)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
