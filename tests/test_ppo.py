import pytest
import torch

from cai.lora import LoraSettings
from cai.ppo import AdaptiveKL, PPOSettings, PPOTrainer, gae, per_token_rewards, policy_loss, value_loss, whiten


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
