"""PPO for language models with LoRA: compact and readable, for one GPU (or a CPU).

    cai ppo --prompts prompts.jsonl --model smollm2-135m-instruct --reward runs/rm --out runs/ppo

Why cai owns this: TRL removed PPOTrainer in 1.13. This module follows the recipe of Ziegler et al.
(2019) and Ouyang et al. (2022) as TRL's last version did, in one file:

1. Rollout: sample responses from the policy (the LoRA model itself, adapters active).
2. Score: a reward function (usually `RewardScorer.score`) gives one scalar per response.
3. Per-token reward: -kl_coef * (log pi(a) - log pi_ref(a)) at every token, plus the score on the
   last token. The reference is the same model with its adapter disabled: no second copy.
4. GAE advantages (gamma, lambda), whitened over the batch; returns = advantages + values.
5. Several epochs of minibatch updates: clipped policy loss, clipped value loss (value head on
   the policy's last hidden state), gradient accumulation.
6. Adaptive KL coefficient (proportional controller toward `target_kl`), or a fixed one.

Only the LoRA adapter and the value head train; the base can be loaded in 4 bits, which is what
lets policy, reference, value and reward fit a 7B model on one 24 GB GPU. Checkpoints (adapter,
value head, optimizer, controller, step) are written every `save_every` steps and a rerun resumes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from cai import runtime, store
from cai.lora import LoraSettings

RewardFn = Callable[[Sequence[Sequence[dict]], Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class PPOSettings:
    steps: int = 100
    batch_size: int = 8  # prompts per rollout
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05
    adaptive_kl: bool = True
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    save_every: int = 20
    seed: int = 0
    threads: int = 0


# -- the math (tested against hand-computed values) ------------------------------------------------


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


class AdaptiveKL:
    """Ziegler et al.'s proportional controller: nudge kl_coef so the observed KL tracks the target."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, batch_size: int) -> None:
        error = max(-0.2, min(0.2, observed_kl / self.target - 1))
        self.coef *= 1 + error * batch_size / self.horizon


# -- the model ---------------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """A LoRA causal LM plus a scalar value head on its last hidden state."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size if hasattr(lm.config, "get_text_config") else lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)
        return out.logits, self.value_head(hidden).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# -- the trainer -------------------------------------------------------------------------------------


class PPOTrainer:
    def __init__(self, model_name: str, reward_fn: RewardFn, prompts: Sequence[Sequence[dict]], out_dir: str | Path,
                 settings: PPOSettings = PPOSettings(), *, sft_adapter: str | None = None):
        from cai.policy import TrainSettings, load_policy

        self.settings = settings
        self.out_dir = Path(out_dir)
        self.reward_fn = reward_fn
        self.prompts = [list(p) for p in prompts]
        self.device = runtime.apply(runtime.RuntimeSettings(threads=settings.threads), seed=settings.seed)
        lm, self.tokenizer, lora = load_policy(model_name, TrainSettings(lora=settings.lora), self.device,
                                               adapter=sft_adapter, trainable_adapter=sft_adapter is not None)
        if lora is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, lora)
        self.tokenizer.padding_side = "left"
        self.model = PolicyWithValue(lm).to(self.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        self.kl = AdaptiveKL(settings.kl_coef, settings.target_kl, settings.kl_horizon)
        self.step = 0
        self.rng = random.Random(settings.seed)
        self.history: list[dict] = []
        self._resume()

    # checkpoints ------------------------------------------------------------------------------------
    def _resume(self) -> None:
        latest = self.out_dir / "checkpoint"
        if not (latest / "state.pt").exists():
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(latest / "state.pt", weights_only=True)
        set_peft_model_state_dict(self.model.lm, load_file(str(latest / "adapter" / "adapter_model.safetensors")))
        self.model.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.coef, self.step = state["kl_coef"], state["step"]
        self.rng.setstate(_tuple_state(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads((latest / "history.json").read_text())

    def save(self, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        self.model.lm.save_pretrained(tmp / "adapter")
        self.tokenizer.save_pretrained(tmp / "adapter")
        torch.save({"value_head": self.model.value_head.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "kl_coef": self.kl.coef, "step": self.step, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state()},
                   tmp / "state.pt")
        (tmp / "history.json").write_text(json.dumps(self.history))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)

    # one PPO step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: list[list[dict]]):
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        self.model.eval()
        out = self.model.lm.generate(**enc, do_sample=True, temperature=self.settings.temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=self.settings.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        width = enc["input_ids"].shape[1]
        response = out[:, width:]
        eos = self.tokenizer.eos_token_id
        is_eos = response == eos
        # Keep tokens up to and including the first EOS; everything after is padding.
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        response_mask = (~after_eos).float()
        response = response.masked_fill(after_eos, self.tokenizer.pad_token_id)
        input_ids = torch.cat([enc["input_ids"], response], 1)
        attention_mask = torch.cat([enc["attention_mask"], response_mask.long()], 1)
        decoded = [self.tokenizer.decode(r[m > 0], skip_special_tokens=True) for r, m in zip(response, response_mask)]
        return input_ids, attention_mask, width, response_mask, decoded

    def _forward(self, input_ids, attention_mask, width):
        logits, values = self.model(input_ids, attention_mask)
        # Position t predicts token t+1: response token i is predicted at width + i - 1.
        logits = logits[:, width - 1 : -1]
        values = values[:, width - 1 : -1]
        return logits, values, token_logprobs(logits, input_ids[:, width:])

    def train_step(self, batch: list[list[dict]]) -> dict:
        s = self.settings
        started = time.perf_counter()
        input_ids, attention_mask, width, mask, responses = self.rollout(batch)
        scores = torch.tensor([float(x) for x in self.reward_fn(batch, responses)], device=self.device)
        with torch.no_grad():
            _, old_values, old_logprobs = self._forward(input_ids, attention_mask, width)
            with self.model.lm.disable_adapter():
                _, _, ref_logprobs = self._forward(input_ids, attention_mask, width)
        rewards, kl = per_token_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl.coef)
        advantages, returns = gae(rewards.cpu(), (old_values * mask).cpu(), mask.cpu(), s.gamma, s.lam)
        advantages = whiten(advantages, mask.cpu()).to(self.device)
        returns = returns.to(self.device)
        self.model.train()
        stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "entropy": []}
        order = list(range(len(batch)))
        for _ in range(s.ppo_epochs):
            self.rng.shuffle(order)
            minibatches = [order[i : i + s.mini_batch_size] for i in range(0, len(order), s.mini_batch_size)]
            for number, idx in enumerate(minibatches):
                logits, values, logprobs = self._forward(input_ids[idx], attention_mask[idx], width)
                pg, clipfrac = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], s.cliprange)
                vf = value_loss(values, old_values[idx], returns[idx], mask[idx], s.cliprange_value)
                ((pg + s.vf_coef * vf) / s.gradient_accumulation_steps).backward()
                if (number + 1) % s.gradient_accumulation_steps == 0 or number + 1 == len(minibatches):
                    nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], s.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                stats["policy_loss"].append(pg.item())
                stats["value_loss"].append(vf.item())
                stats["clipfrac"].append(clipfrac.item())
                stats["entropy"].append(masked_mean(entropy(logits.detach()), mask[idx]).item())
        mean_kl = (kl.sum(1)).mean().item()
        row = {
            "step": self.step + 1,
            "reward": scores.mean().item(),
            "kl": mean_kl,
            "kl_coef": self.kl.coef,
            "response_length": mask.sum(1).mean().item(),
            "seconds": round(time.perf_counter() - started, 2),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        if s.adaptive_kl:
            self.kl.update(mean_kl, len(batch))
        return row

    def train(self, log: Callable[[dict], None] | None = print) -> list[dict]:
        s = self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while self.step < s.steps:
            batch = [self.prompts[self.rng.randrange(len(self.prompts))] for _ in range(s.batch_size)]
            row = self.train_step(batch)
            self.step += 1
            self.history.append(row)
            if log:
                log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
            if self.step % s.save_every == 0 or self.step == s.steps:
                self.save(self.out_dir / "checkpoint")
        self.model.lm.save_pretrained(self.out_dir / "adapter")
        self.tokenizer.save_pretrained(self.out_dir / "adapter")
        torch.save(self.model.value_head.state_dict(), self.out_dir / "value_head.pt")
        store.write_json_atomic(self.out_dir / "metrics.json", {"history": self.history, "settings": asdict(s)})
        return self.history


def _tuple_state(state):
    """random.Random state survives torch.save as nested lists; setstate needs tuples."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
