import json
import shutil
from pathlib import Path

import pytest
import torch

import cai.train.ppo
from cai.lora import LoraSettings
from cai.train.ppo import PPOSettings, PPOTrainer
from cai.train.ppo_math import (
    AdaptiveKL, RunningMoments, gae, masked_mean, per_token_rewards, policy_loss, response_mask, value_loss, whiten,
)


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 2.0 - 1.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])


def test_gae_ignores_padding():
    rewards = torch.tensor([[1.0, 5.0, 9.0]])
    values = torch.tensor([[0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.0, 0.0]] and returns.tolist() == [[1.0, 0.0, 0.0]]


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    assert out[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    assert out[0, 3] == 0


def test_clipped_losses_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.2]]))  # ratios 1.6 and 0.4
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac = policy_loss(new, old, advantages, mask, cliprange=0.2)
    # token 1: max(-1*1.6, -1*1.2) = -1.2 (clipped); token 2: max(1*0.4, 1*0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == 1.0
    vf = value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.5)
    # unclipped error 0, clipped value 0.5 -> error 2.25; the max is taken
    assert vf.item() == pytest.approx(0.5 * 2.25)


def test_kl_penalty_and_score_placement():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = per_token_rewards(torch.tensor([3.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([-0.05, 3.0, 0.0])


def test_adaptive_kl_moves_toward_target():
    controller = AdaptiveKL(0.1, target=6.0, horizon=100)
    controller.update(12.0, batch_size=10)
    assert controller.coef == pytest.approx(0.1 * 1.02)
    controller.update(0.0, batch_size=10)
    assert controller.coef < 0.1 * 1.02


def test_ppo_raises_a_known_reward_with_bounded_kl(tiny_causal_lm_dir, tmp_path):
    """Reward = share of response characters that are 'e': PPO should make the policy say more 'e'."""

    def reward(prompts, responses):
        return [sum(c == "e" for c in r) / max(1, len(r)) * 10 for r in responses]

    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    settings = PPOSettings(steps=30, batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-3, max_new_tokens=8,
                           kl_coef=0.02, adaptive_kl=False, lora=LoraSettings(r=8, alpha=16, dropout=0.0), save_every=15)
    history = PPOTrainer(str(tiny_causal_lm_dir), reward, prompts, tmp_path, settings).train(log=None)
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert all(h["kl"] < 20 for h in history)  # nats summed over the response
    assert {"reward", "kl", "entropy", "clipfrac", "value_loss", "response_length"} <= set(history[0])
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_ppo_resumes_from_checkpoint(tiny_causal_lm_dir, tmp_path):
    def reward(prompts, responses):
        return [float(len(r) % 3) for r in responses]

    prompts = [[{"role": "user", "content": "hi"}]]
    settings = PPOSettings(steps=2, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, save_every=1,
                           lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    PPOTrainer(str(tiny_causal_lm_dir), reward, prompts, tmp_path, settings).train(log=None)
    longer = PPOSettings(**{**settings.__dict__, "steps": 3})
    resumed = PPOTrainer(str(tiny_causal_lm_dir), reward, prompts, tmp_path, longer)
    assert resumed.step == 2 and len(resumed.history) == 2
    assert len(resumed.train(log=None)) == 3


# -- fixtures and helpers for the trainer tests --------------------------------------------------------

PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]


def _constant_reward(prompts, responses):
    return [1.0] * len(responses)


def _settings(**overrides) -> PPOSettings:
    base = dict(steps=1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=6, save_every=1,
                lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return PPOSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def sft_adapter_dir(tiny_causal_lm_dir, tmp_path_factory) -> Path:
    """An SFT adapter with random (non-zero) A and B, so the SFT model differs clearly from the base,
    and LoRA dropout 0.3 (a fresh adapter's B is zero, which would hide dropout at the first step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False,
                                   task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("sft-adapter")
    lm.save_pretrained(out)
    return out


def _capture_policy_loss(monkeypatch) -> list:
    calls = []
    real = cai.train.ppo.policy_loss

    def spy(new, old, advantages, mask, cliprange):
        calls.append({"new": new.detach().clone(), "old": old.clone(), "mask": mask.clone()})
        return real(new, old, advantages, mask, cliprange)

    monkeypatch.setattr(cai.train.ppo, "policy_loss", spy)
    return calls


def _adapter_weights(lm, name: str) -> dict:
    return {k: v.detach().clone() for k, v in lm.named_parameters() if f".{name}." in k}


# -- 1. the reference is the frozen SFT policy ------------------------------------------------------------


def test_reference_is_the_frozen_sft_policy(tiny_causal_lm_dir, sft_adapter_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trainer = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path,
                         _settings(steps=2, learning_rate=1e-2), sft_adapter=str(sft_adapter_dir))
    lm = trainer.model.lm
    reference_before = _adapter_weights(lm, "reference")
    history = trainer.train(log=None)
    # Before the first update the policy IS the SFT model: the KL to the reference is nil. (The
    # old reference, the base with the adapter disabled, gave a KL of several nats here.)
    assert abs(history[0]["kl"]) < 1e-6, history[0]["kl"]
    assert history[1]["kl"] != 0.0  # the policy moved away from it after an update
    # The reference copy stayed frozen; the policy copy trained.
    reference_after = _adapter_weights(lm, "reference")
    assert all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before)
    assert not any(p.requires_grad for k, p in lm.named_parameters() if ".reference." in k)
    sft = load_file(str(sft_adapter_dir / "adapter_model.safetensors"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == sft.keys() and any(not torch.equal(saved[k], sft[k]) for k in sft)
    assert not (tmp_path / "adapter" / "reference").exists()
    # The saved adapter alone on the plain base is the trained policy.
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, lm(input_ids=ids).logits, atol=1e-5)


def test_reference_is_the_sft_policy_on_a_4bit_base_too(tiny_tokenizer_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)  # 4-bit blocks are 64 wide: a hidden size of 32 cannot be quantised
    base = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=64, intermediate_size=128))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "sft")
    settings = _settings(learning_rate=1e-2, lora=LoraSettings(r=4, alpha=8, quantization="4bit"))
    trainer = PPOTrainer(str(tmp_path / "base"), _constant_reward, PROMPTS, tmp_path / "ppo", settings, sft_adapter=str(tmp_path / "sft"))
    assert trainer.model.lm.get_base_model().is_loaded_in_4bit
    reference_before = _adapter_weights(trainer.model.lm, "reference")
    policy_before = _adapter_weights(trainer.model.lm, "default")
    history = trainer.train(log=None)
    assert abs(history[0]["kl"]) < 1e-6, history[0]["kl"]
    reference_after, policy_after = _adapter_weights(trainer.model.lm, "reference"), _adapter_weights(trainer.model.lm, "default")
    assert all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before)
    assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_before)


def test_without_sft_the_reference_is_the_base(tiny_causal_lm_dir, tmp_path):
    trainer = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path, _settings(learning_rate=1e-2, steps=2))
    trainer.train(log=None)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        with trainer._reference():
            reference = trainer.model.lm(input_ids=ids).logits
        with trainer.model.lm.disable_adapter():
            base = trainer.model.lm(input_ids=ids).logits
        policy = trainer.model.lm(input_ids=ids).logits
    assert torch.equal(reference, base) and not torch.allclose(policy, base)
    assert all(p.requires_grad for k, p in trainer.model.lm.named_parameters() if "lora_" in k)


# -- 2. log-probs at the sampling temperature -------------------------------------------------------------


def test_logprobs_are_those_of_the_sampling_distribution(tiny_causal_lm_dir, tmp_path):
    trainer = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path, _settings(temperature=0.5))
    texts = [trainer.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    enc = trainer.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = trainer.model.lm.generate(**enc, output_scores=True, return_dict_in_generate=True)
    width = enc["input_ids"].shape[1]
    response = out.sequences[:, width:]
    mask, _ = response_mask(response, trainer.terminators)
    # generate's scores are the logits after its processors: log_softmax of them is what was sampled from.
    sampled = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    input_ids = torch.cat([enc["input_ids"], response.masked_fill(mask == 0, trainer.tokenizer.pad_token_id)], 1)
    attention_mask = torch.cat([enc["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        _, _, logprobs = trainer._forward(input_ids, attention_mask, width)
    assert torch.allclose(logprobs * mask, sampled * mask, atol=1e-4), (logprobs - sampled).abs().max()


def test_temperature_must_be_positive():
    from cai.errors import CaiError

    with pytest.raises(CaiError, match="ppo.temperature"):
        PPOSettings(temperature=0.0)


# -- 3. no dropout: the ratio is exactly one before the first update ---------------------------------------


def test_ratio_is_exactly_one_before_the_first_update(tiny_causal_lm_dir, sft_adapter_dir, tmp_path, monkeypatch):
    calls = _capture_policy_loss(monkeypatch)
    PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path, _settings(), sft_adapter=str(sft_adapter_dir)).train(log=None)
    first = calls[0]
    ratio = torch.exp(first["new"] - first["old"])[first["mask"] > 0]
    assert torch.equal(ratio, torch.ones_like(ratio)), ratio


def test_gradient_checkpointing_still_runs_in_eval_mode(tiny_causal_lm_dir, sft_adapter_dir, tmp_path, monkeypatch):
    """Quantised bases on a GPU train with gradient checkpointing, which transformers runs only for
    layers in training mode: the update forwards must still go through it (dropout stays off)."""
    calls = _capture_policy_loss(monkeypatch)
    trainer = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path, _settings(learning_rate=1e-2),
                         sft_adapter=str(sft_adapter_dir))
    base = trainer.model.lm.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = []
    for layer in base.model.layers:
        real = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _real=real, **k: checkpointed.append(1) or _real(*a, **k)
    before = _adapter_weights(trainer.model.lm, "default")
    trainer.train(log=None)
    assert len(checkpointed) == 2 * len(base.model.layers)  # two minibatch forwards, every layer
    ratio = torch.exp(calls[0]["new"] - calls[0]["old"])[calls[0]["mask"] > 0]
    assert torch.equal(ratio, torch.ones_like(ratio))
    after = _adapter_weights(trainer.model.lm, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in trainer.model.modules())


# -- 4. responses end at every end-of-sequence id -----------------------------------------------------------


def test_response_mask_stops_at_any_terminator():
    response = torch.tensor([[7, 8, 2, 9, 9], [7, 3, 8, 2, 9], [7, 8, 9, 9, 9]])
    mask, ended = response_mask(response, [2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


@pytest.fixture(scope="module")
def two_eos_lm_dir(tiny_causal_lm_dir, tmp_path_factory) -> Path:
    """The tiny model with a generation config that stops on two ids (<|im_end|> and <|endoftext|>)."""
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path_factory.mktemp("two-eos")
    shutil.copytree(tiny_causal_lm_dir, out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    GenerationConfig(eos_token_id=ids, pad_token_id=ids[0], do_sample=False).save_pretrained(out)
    return out


def test_rollout_ends_responses_at_every_eos_id_of_the_generation_config(two_eos_lm_dir, tmp_path, monkeypatch):
    trainer = PPOTrainer(str(two_eos_lm_dir), _constant_reward, PROMPTS, tmp_path, _settings())
    im_end, endoftext = trainer.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert set(trainer.terminators) == {im_end, endoftext}
    # generate itself stops on both: sampling from a model that always says <|endoftext|> stops after it.
    base = trainer.model.lm.get_base_model()
    assert set(base.generation_config.eos_token_id) == {im_end, endoftext}
    real_forward = base.forward

    def always_endoftext(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.logits[..., endoftext] = 1e4
        return out

    monkeypatch.setattr(base, "forward", always_endoftext)
    input_ids, attention_mask, width, mask, ended, decoded = trainer.rollout(PROMPTS[:2])
    assert input_ids.shape[1] == width + 1 and mask.tolist() == [[1.0], [1.0]] and ended.all()
    monkeypatch.undo()
    # The mask: a response ending in <|endoftext|> stops there, the rest is padding.
    fake = lambda **enc: torch.cat([enc["input_ids"], torch.tensor([[11, endoftext, 12, 13], [11, 12, 13, 14]])], 1)
    monkeypatch.setattr(trainer.model.lm, "generate", fake)
    input_ids, attention_mask, width, mask, ended, decoded = trainer.rollout(PROMPTS[:2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]
    assert input_ids[0, width + 2 :].tolist() == [trainer.tokenizer.pad_token_id] * 2
    assert attention_mask[0, width:].tolist() == [1, 1, 0, 0]


# -- 5. crash-safe checkpoints --------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for a kill -9 at a chosen instruction: nothing after it runs."""


@pytest.mark.parametrize("kill_at", ["deleting the old checkpoint", "renaming the new one"])
def test_a_kill_while_swapping_checkpoints_resumes_from_the_last_saved_step(tiny_causal_lm_dir, tmp_path, monkeypatch, kill_at):
    settings = _settings(steps=2, batch_size=2, ppo_epochs=1, max_new_tokens=4)
    first = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path, settings)
    real_rmtree, real_rename = shutil.rmtree, Path.rename

    def rmtree_then_die(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if first.step == 2:
            raise Killed

    def die_before_rename(self, target):
        if first.step == 2:
            raise Killed
        return real_rename(self, target)

    if kill_at == "deleting the old checkpoint":
        monkeypatch.setattr(shutil, "rmtree", rmtree_then_die)
        expected = 2  # the new checkpoint was already in place
    else:
        monkeypatch.setattr(Path, "rename", die_before_rename)
        expected = 1  # the new one never landed: the previous one is still whole
    with pytest.raises(Killed):
        first.train(log=None)
    monkeypatch.undo()
    resumed = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path, PPOSettings(**{**settings.__dict__, "steps": 3}))
    assert resumed.step == expected and len(resumed.history) == expected
    assert [h["step"] for h in resumed.train(log=None)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3"]


# -- 6. reward shaping ---------------------------------------------------------------------------------------------


def test_running_moments_match_the_full_sample():
    moments = RunningMoments()
    first, second = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([-3.0, 4.0])
    moments.update(first)
    moments.update(second)
    everything = torch.cat([first, second]).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())  # unbiased, as TRL's


def test_score_shaping_penalty_normalisation_and_clip(tiny_causal_lm_dir, tmp_path):
    trainer = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path,
                         _settings(missing_eos_penalty=2.0, score_scaling="normalize", score_clip=1.0))
    raw, ended = torch.tensor([3.0, 3.0, 0.0, 6.0]), torch.tensor([True, False, True, True])
    penalised = torch.tensor([3.0, 1.0, 0.0, 6.0])
    expected = ((penalised - penalised.mean()) / penalised.std()).clamp(-1, 1)
    assert trainer.shape_scores(raw, ended).tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    plain = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path / "plain", _settings())
    assert plain.shape_scores(raw, ended).tolist() == raw.tolist()  # all off by default


def test_shaping_is_logged_and_its_running_moments_resume(tiny_causal_lm_dir, tmp_path, monkeypatch):
    def length_reward(prompts, responses):
        return [float(len(r)) for r in responses]

    rewards_seen = []
    real_gae = cai.train.ppo.gae

    def spy_gae(rewards, values, mask, *args):
        rewards_seen.append((rewards, mask))
        return real_gae(rewards, values, mask, *args)

    monkeypatch.setattr(cai.train.ppo, "gae", spy_gae)
    settings = _settings(steps=2, missing_eos_penalty=5.0, score_scaling="scale", whiten_rewards=True, max_new_tokens=3)
    lines = []
    trainer = PPOTrainer(str(tiny_causal_lm_dir), length_reward, PROMPTS, tmp_path, settings)
    history = trainer.train(log=lines.append)
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    row = history[-1]
    assert {"no_eos_fraction", "score", "score_running_mean", "score_running_std"} <= set(row)
    assert row["no_eos_fraction"] > 0 and row["score"] != pytest.approx(row["reward"])
    # whiten_rewards: per-token rewards reach GAE with unit variance over the response tokens.
    rewards, mask = rewards_seen[0]
    mean = masked_mean(rewards, mask)
    assert masked_mean((rewards - mean) ** 2, mask).item() == pytest.approx(1.0, abs=1e-4)
    resumed = PPOTrainer(str(tiny_causal_lm_dir), length_reward, PROMPTS, tmp_path, settings)
    assert resumed.score_moments.state_dict() == trainer.score_moments.state_dict()
    assert resumed.score_moments.count == 2 * settings.batch_size


def test_a_checkpoint_is_fsynced_before_and_after_its_rename(tiny_causal_lm_dir, tmp_path, request):
    """A checkpoint survives a power cut, not only a kill: its files, its folder, and the
    `checkpoints` folder holding the rename are all fsynced."""
    trainer = PPOTrainer(str(tiny_causal_lm_dir), _constant_reward, PROMPTS, tmp_path,
                         _settings(steps=1, batch_size=2, ppo_epochs=1, max_new_tokens=4))
    seen = request.getfixturevalue("fsyncs")  # recording starts after the trainer is built
    folder = trainer.save()
    assert ((folder / "state.pt").stat().st_ino, False) in seen
    assert ((folder / "adapter" / "adapter_model.safetensors").stat().st_ino, False) in seen
    assert (folder.stat().st_ino, True) in seen and (folder.parent.stat().st_ino, True) in seen
