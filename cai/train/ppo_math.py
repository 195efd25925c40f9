"""The tensor math of cai's PPO (`cai.train.ppo`), kept apart so each piece is tested against hand-computed values.

Everything here is a pure function of tensors (plus two tiny stateful controllers): GAE, the
clipped losses, the per-token KL reward, log-probs at the sampling temperature, the response mask
that stops at any end-of-sequence id, and the running score moments behind score scaling.
"""

from __future__ import annotations

from typing import Iterable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(variance + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [batch, time]; masked positions contribute nothing."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]
        advantages[:, t] = running
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """KL penalty at every token and the score added at each response's last token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float):
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(new_values, old_values, returns, mask, cliprange_value: float):
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * masked_mean(torch.max((new_values - returns) ** 2, (clipped - returns) ** 2), mask)
    return loss


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): the distribution the rollout sampled from."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(response: torch.Tensor, terminators: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended) for generated tokens [batch, time].

    A response runs up to and including its first terminator (any end-of-sequence id, or pad);
    everything after is padding. `ended` is False for responses that hit the length limit first.
    """
    ids = torch.tensor(sorted(set(terminators)), device=response.device)
    is_end = torch.isin(response, ids)
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0
    return (~after_end).float(), is_end.any(1)


class AdaptiveKL:
    """Ziegler et al.'s proportional controller: nudge kl_coef so the observed KL tracks the target."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, batch_size: int) -> None:
        error = max(-0.2, min(0.2, observed_kl / self.target - 1))
        self.coef *= 1 + error * batch_size / self.horizon


class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update, as
    TRL's PPO kept them for `use_score_scaling`): lets a reward model of any scale be rescaled
    with statistics that do not jump from batch to batch. Saved in PPO checkpoints."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    @property
    def std(self) -> float:
        return (self.var * self.count / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n = xs.numel()
        batch_var, batch_mean = torch.var_mean(xs, unbiased=False)
        delta = batch_mean.item() - self.mean
        total = self.count + n
        self.var = (self.var * self.count + batch_var.item() * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
