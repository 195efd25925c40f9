"""cai's CPU LM head (cai/train/cpu_head.py) against TRL's: same numbers, fewer positions, and the
trainers really go through it."""

import pytest
import torch

from cai.train import cpu_head
from cai.train.cpu_head import CpuLogProbs

trl_kernels = pytest.importorskip("trl.kernels.chunked_logprob")
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture
def trl_head():
    """TRL's own head for the test, cai's put back (or left out) as it was."""
    was = bool(cpu_head._installed)
    cpu_head.uninstall()
    yield
    if was:
        cpu_head.install()
    else:
        cpu_head.uninstall()


def run_head(function, hidden, weight, bias, targets, temperature, logit_scale, outputs):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = None if bias is None else bias.clone().requires_grad_(True)
    out = function.apply(hidden, weight, bias, targets, temperature, 32, None, logit_scale, outputs)
    loss = (out[0] * torch.linspace(0.5, 1.5, len(targets))).sum()
    if out[1] is not None:
        loss = loss + 0.3 * out[1].sum()
    loss.backward()
    grads = [hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    return [None if x is None else x.detach() for x in out], grads


@pytest.mark.parametrize("keep", [True, False], ids=["kept-probs", "recomputed"])
@pytest.mark.parametrize("outputs", [ALL, ("log_probs",)], ids=["all-outputs", "log-probs-only"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_trls(monkeypatch, keep, outputs, with_bias):
    torch.manual_seed(0)
    hidden, weight = torch.randn(70, 16), torch.randn(100, 16)  # 100 > the 32-wide vocab tiles TRL is given
    bias = torch.randn(100) if with_bias else None
    targets = torch.randint(0, 100, (70,))
    monkeypatch.setattr(cpu_head, "TOKEN_CHUNK", 32)  # several token chunks, a ragged last one
    if not keep:
        monkeypatch.setattr(cpu_head, "KEEP_BYTES", 0)
    want, want_grads = run_head(trl_kernels.ChunkedLogProbFunction, hidden, weight, bias, targets, 0.7, 1.3, outputs)
    got, got_grads = run_head(CpuLogProbs, hidden, weight, bias, targets, 0.7, 1.3, outputs)
    for name, a, b in zip(ALL, want, got):
        assert (a is None) == (b is None), name
        if a is not None and a.dtype == torch.bool:
            assert torch.equal(a, b), name
        elif a is not None:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)  # float32 sums in another order
    for a, b in zip(want_grads, got_grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def fused_model(tiny_causal_lm_dir, outputs=("log_probs", "entropy", "is_top1")):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    add_fused_lm_head(model, outputs=outputs)
    return model


def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # the prompt
    return ids, mask, labels


def test_installed_head_scores_only_labelled_positions_with_trls_numbers(tiny_causal_lm_dir, trl_head, monkeypatch):
    ids, mask, labels = batch()
    model = fused_model(tiny_causal_lm_dir)
    results, seen = {}, []
    real = CpuLogProbs.forward
    monkeypatch.setattr(CpuLogProbs, "forward", staticmethod(lambda ctx, hidden, *a: seen.append(hidden.shape[0]) or real(ctx, hidden, *a)))
    for name in ("trl", "cai"):
        if name == "cai":
            assert cpu_head.install()
        seen.clear()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results[name] = (out.log_probs.detach(), out.entropy.detach(), out.is_top1, out.loss.item(),
                         model.model.layers[0].mlp.up_proj.weight.grad.clone(), list(seen))
    trl, cai = results["trl"], results["cai"]
    assert trl[5] == [] and cai[5] == [int((labels[:, 1:] != -100).sum())]  # 17 labelled of 33 shifted positions
    torch.testing.assert_close(cai[0], trl[0], atol=1e-5, rtol=1e-5)
    label_mask = labels[:, 1:] != -100  # TRL's entropy and top-1 flag are zeroed outside the labels either way
    torch.testing.assert_close(cai[1][label_mask], trl[1][label_mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(cai[2][label_mask], trl[2][label_mask])
    assert cai[3] == pytest.approx(trl[3], abs=1e-6)
    torch.testing.assert_close(cai[4], trl[4], atol=1e-6, rtol=1e-5)


def test_install_is_idempotent_and_uninstall_restores_trl(trl_head):
    from trl.trainer import utils

    original = utils._ChunkedLogProbFunction
    assert cpu_head.install() and cpu_head.install()
    assert utils._ChunkedLogProbFunction is not original
    cpu_head.uninstall()
    assert utils._ChunkedLogProbFunction is original


def test_soft_capped_heads_stay_on_trls_function(trl_head, monkeypatch):
    from trl.trainer import utils

    cpu_head.install()
    used = []
    monkeypatch.setattr(CpuLogProbs, "apply", lambda *a: used.append("cai"))
    hidden, weight, targets = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    out = utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32, 30.0, 1.0, ("log_probs",))
    assert used == [] and out[0].shape == (4,)


def test_sft_and_dpo_trainers_go_through_the_cpu_head(tiny_causal_lm_dir, tmp_path, monkeypatch, trl_head):
    """Starts with TRL's head in place: the trainers' own entry point installs cai's."""
    from tests.test_policy import small, write_pairs, write_sft
    from cai.train.policy import DPOSettings, train_dpo, train_sft

    rows = []
    real = CpuLogProbs.forward
    monkeypatch.setattr(CpuLogProbs, "forward", staticmethod(lambda ctx, hidden, *a: rows.append(hidden.shape[0]) or real(ctx, hidden, *a)))
    train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "sft", small(max_steps=2))
    sft_calls = len(rows)
    assert sft_calls == 2  # one forward per step
    train_dpo(write_pairs(tmp_path / "pairs.jsonl"), str(tiny_causal_lm_dir), tmp_path / "dpo",
              DPOSettings(train=small(max_steps=2)))
    assert len(rows) - sft_calls == 4  # policy and reference per step
