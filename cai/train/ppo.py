"""PPO for language models with LoRA: compact and readable, for one GPU (or a CPU).

    cai ppo --prompts prompts.jsonl --model smollm2-135m-instruct --reward runs/rm --out runs/ppo [--sft runs/sft]

Why cai owns this: TRL removed PPOTrainer in 1.13. This module follows the recipe of Ziegler et al.
(2019) and Ouyang et al. (2022) as TRL's last version did (the tensor math is in `cai.train.ppo_math`):

1. Rollout: sample responses from the policy at `temperature` (plain softmax sampling: no top-k,
   top-p or penalties from the model's generation config, so the sampler's distribution is the
   one the log-probs below describe). A response ends at its first end-of-sequence id (every id
   the generation config stops on, the tokenizer's EOS, and pad); the rest is masked.
2. Score: a reward function (usually `RewardScorer.score`) gives one scalar per response. Then, in
   order: `missing_eos_penalty` is subtracted from responses that never ended, `score_scaling`
   divides by the running std (or normalises with the running mean and std, kept in the
   checkpoint), and `score_clip` clips.
3. Per-token reward: -kl_coef * (log pi(a) - log pi_ref(a)) at every token, plus the score on the
   last token (whitened over the batch when `whiten_rewards`). The reference is the model PPO
   starts from: with an SFT adapter, a frozen second copy of that adapter ("reference") beside the
   trained one ("default"); without, the base (the adapter disabled). Only LoRA weights are
   duplicated, so a 4-bit base works the same way.
4. GAE advantages (gamma, lambda), whitened over the batch; returns = advantages + values.
5. Several epochs of minibatch updates: clipped policy loss, clipped value loss (value head on
   the policy's last hidden state), gradient accumulation.
6. Adaptive KL coefficient (proportional controller toward `target_kl`), or a fixed one.

Log-probs and entropy of the policy, the old policy and the reference are all taken at the
sampling temperature (logits / T, as TRL's PPO did), and every forward runs in eval mode, so
dropout (LoRA's included) never fires: before the first update the ratio is exactly 1.

Only the LoRA adapter and the value head train; the base can be loaded in 4 bits, which is what
lets policy, reference, value and reward fit a 7B model on one 24 GB GPU. Every `save_every` steps
a checkpoint (adapter, value head, optimizer, controllers, step) is written to
`checkpoints/checkpoint-<step>.tmp` and renamed into place; older ones are deleted only after
that, so a kill at any moment leaves a whole checkpoint, and a rerun resumes from the newest.
`adapter/` at the end is the trained policy alone, applying to the plain base.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from cai import cards, runtime, store
from cai.train import tracking
from cai.errors import CaiError
from cai.progress import StageProgress
from cai.lora import LoraSettings
from cai.train.ppo_math import (  # noqa: F401  (re-exported: the math used to live here)
    AdaptiveKL, RunningMoments, entropy, gae, masked_mean, per_token_rewards, policy_loss, response_mask,
    token_logprobs, value_loss, whiten,
)

RewardFn = Callable[[Sequence[Sequence[dict]], Sequence[str]], Sequence[float]]
POLICY, REFERENCE = "default", "reference"  # peft adapter names: the trained policy, the frozen SFT copy


@dataclass(frozen=True)
class PPOSettings:
    steps: int = 100
    batch_size: int = 8  # prompts per rollout
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature; log-probs, ratios and KL use the same
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
    # Reward shaping, all off by default as in TRL. missing_eos_penalty: subtracted from the score of
    # a response that hit max_new_tokens without ending (TRL's PPO/online DPO option; 1.0 is common).
    missing_eos_penalty: float | None = None
    # score_scaling: "scale" divides scores by their running std, "normalize" also subtracts the
    # running mean (TRL's use_score_scaling / use_score_norm); the moments survive resume.
    score_scaling: Literal["none", "scale", "normalize"] = "none"
    score_clip: float | None = None  # clip (shaped) scores to [-score_clip, score_clip]
    whiten_rewards: bool = False  # whiten per-token rewards over the batch (mean kept; TRL's whiten_rewards)
    lora: LoraSettings = field(default_factory=LoraSettings)
    save_every: int = 20
    seed: int = 0
    threads: int = 0
    # Experiment trackers, by the names transformers/accelerate use (tensorboard, trackio, wandb,
    # mlflow, ...); "none" follows the recipe's top-level `trl.report_to`. See cai/train/tracking.py.
    report_to: str | tuple[str, ...] = "none"

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise CaiError("must be > 0 (PPO samples; greedy decoding has no log-probs to ratio)", field="ppo.temperature")
        if self.score_clip is not None and self.score_clip <= 0:
            raise CaiError("must be > 0 when set", field="ppo.score_clip")
        if self.score_scaling not in ("none", "scale", "normalize"):
            raise CaiError("must be none, scale or normalize", field="ppo.score_scaling")
        tracking.tracker_names(self.report_to)


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


def _eos_ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


# -- the trainer -------------------------------------------------------------------------------------


class PPOTrainer:
    def __init__(self, model_name: str, reward_fn: RewardFn, prompts: Sequence[Sequence[dict]], out_dir: str | Path,
                 settings: PPOSettings = PPOSettings(), *, sft_adapter: str | None = None):
        from cai.train.policy import TrainSettings, load_policy

        self.settings = settings
        self.out_dir = Path(out_dir)
        self.reward_fn = reward_fn
        self.prompts = [list(p) for p in prompts]
        self.card_meta = {"stage": "ppo", "base_model": model_name, "sft_adapter": sft_adapter, "prompts": len(self.prompts)}
        self.device = runtime.apply(runtime.RuntimeSettings(threads=settings.threads), seed=settings.seed)
        lm, self.tokenizer, lora = load_policy(model_name, TrainSettings(lora=settings.lora), self.device,
                                               adapter=sft_adapter, trainable_adapter=sft_adapter is not None)
        if lora is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, lora)
        else:  # the SFT adapter trains on as "default"; a frozen copy of it is the reference
            lm.load_adapter(sft_adapter, adapter_name=REFERENCE, is_trainable=False)
            lm.set_adapter(POLICY)
        self.tokenizer.padding_side = "left"
        self.terminators = self._configure_generation(lm.get_base_model())
        self.model = PolicyWithValue(lm).to(self.device)
        self.model.eval()  # every forward, rollout and update alike: dropout never fires
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        self.kl = AdaptiveKL(settings.kl_coef, settings.target_kl, settings.kl_horizon)
        self.score_moments = RunningMoments()
        self.step = 0
        self.rng = random.Random(settings.seed)
        self.history: list[dict] = []
        self._resume()

    def _configure_generation(self, base) -> list[int]:
        """Replace the model's generation config (in memory only) with plain sampling at `temperature`
        that stops on every terminator: each EOS id of the generation config (an int or a list), the
        tokenizer's EOS and pad. Returns the terminators, which also end responses in the mask."""
        from transformers import GenerationConfig

        s, old, pad = self.settings, base.generation_config, self.tokenizer.pad_token_id
        terminators = list(dict.fromkeys(_eos_ids(old.eos_token_id) + _eos_ids(self.tokenizer.eos_token_id) + _eos_ids(pad)))
        base.generation_config = GenerationConfig(
            do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0, max_new_tokens=s.max_new_tokens,
            eos_token_id=terminators, pad_token_id=pad, bos_token_id=old.bos_token_id)
        return terminators

    # checkpoints ------------------------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path | None:
        root = self.out_dir / "checkpoints"
        whole = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "state.pt").is_file()]
        if whole:
            return max(whole, key=lambda p: int(p.name.split("-")[-1]))
        legacy = self.out_dir / "checkpoint"  # the single folder older cai versions wrote
        return legacy if (legacy / "state.pt").is_file() else None

    def _resume(self) -> None:
        latest = self._latest_checkpoint()
        if latest is None:
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(latest / "state.pt", weights_only=True)
        set_peft_model_state_dict(self.model.lm, load_file(str(latest / "adapter" / "adapter_model.safetensors")), adapter_name=POLICY)
        self.model.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.coef, self.step = state["kl_coef"], state["step"]
        if "score_moments" in state:
            self.score_moments.load_state_dict(state["score_moments"])
        self.rng.setstate(_tuple_state(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads((latest / "history.json").read_text())

    def _save_adapter(self, folder: Path) -> None:
        """The trained policy adapter alone (not the reference copy): it applies to the plain base."""
        self.model.lm.save_pretrained(folder, selected_adapters=[POLICY])
        self.tokenizer.save_pretrained(folder)

    def save(self) -> Path:
        """Write `checkpoints/checkpoint-<step>` crash-safely: into a .tmp folder, renamed into place
        (atomic), and only then delete the older checkpoints and any torn .tmp left by a kill."""
        root = self.out_dir / "checkpoints"
        final, tmp = root / f"checkpoint-{self.step}", root / f"checkpoint-{self.step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._save_adapter(tmp / "adapter")
        (tmp / "history.json").write_text(json.dumps(self.history))
        torch.save({"value_head": self.model.value_head.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "kl_coef": self.kl.coef, "score_moments": self.score_moments.state_dict(), "step": self.step,
                    "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        if final.exists():  # a same-step folder can only be a leftover of an earlier run over this folder
            shutil.rmtree(final)
        store.fsync_tree(tmp)  # the data, then the rename, survive a power cut, not only a kill
        tmp.rename(final)
        store.fsync_dir(root)
        for old in [p for p in root.iterdir() if p != final] + [self.out_dir / "checkpoint", self.out_dir / "checkpoint.tmp"]:
            if old.exists():
                shutil.rmtree(old)
        return final

    # one PPO step -------------------------------------------------------------------------------------
    @contextmanager
    def _reference(self):
        """Forwards inside run on the reference: the frozen SFT copy, else the base."""
        lm = self.model.lm
        if REFERENCE not in lm.peft_config:
            with lm.disable_adapter():
                yield
            return
        lm.set_adapter(REFERENCE, inference_mode=True)  # inference_mode: nothing becomes trainable
        try:
            yield
        finally:
            lm.set_adapter(POLICY)  # policy active and trainable again, the reference frozen

    @contextmanager
    def _checkpointing(self):
        """Gradient checkpointing (on for quantised bases on GPU) only runs in training mode: switch
        it on for the checkpointed layers alone, leaving their sublayers (dropout) in eval mode."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        for layer in layers:
            layer.training = True
        try:
            yield
        finally:
            for layer in layers:
                layer.training = False

    @torch.no_grad()
    def rollout(self, batch: list[list[dict]]):
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        out = self.model.lm.generate(**enc)  # settings from _configure_generation
        width = enc["input_ids"].shape[1]
        mask, ended = response_mask(out[:, width:], self.terminators)
        response = out[:, width:].masked_fill(mask == 0, self.tokenizer.pad_token_id)
        input_ids = torch.cat([enc["input_ids"], response], 1)
        attention_mask = torch.cat([enc["attention_mask"], mask.long()], 1)
        decoded = [self.tokenizer.decode(r[m > 0], skip_special_tokens=True) for r, m in zip(response, mask)]
        return input_ids, attention_mask, width, mask, ended, decoded

    def _forward(self, input_ids, attention_mask, width, with_values: bool = True):
        if with_values:
            logits, values = self.model(input_ids, attention_mask)
        else:
            logits, values = self.model.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, None
        # Position t predicts token t+1: response token i is predicted at width + i - 1.
        logits = logits[:, width - 1 : -1]
        values = values[:, width - 1 : -1] if values is not None else None
        return logits, values, token_logprobs(logits, input_ids[:, width:], self.settings.temperature)

    def shape_scores(self, raw: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Missing-EOS penalty, running scaling or normalisation, then clipping (see PPOSettings)."""
        s, scores = self.settings, raw.clone().float()
        if s.missing_eos_penalty is not None:
            scores[~ended] -= s.missing_eos_penalty
        if s.score_scaling != "none":
            self.score_moments.update(scores)
            std = self.score_moments.std + 1e-8
            scores = (scores - self.score_moments.mean) / std if s.score_scaling == "normalize" else scores / std
        if s.score_clip is not None:
            scores = scores.clamp(-s.score_clip, s.score_clip)
        return scores

    def train_step(self, batch: list[list[dict]]) -> dict:
        s = self.settings
        started = time.perf_counter()
        input_ids, attention_mask, width, mask, ended, responses = self.rollout(batch)
        raw = torch.tensor([float(x) for x in self.reward_fn(batch, responses)], device=self.device)
        scores = self.shape_scores(raw, ended)
        with torch.no_grad():
            _, old_values, old_logprobs = self._forward(input_ids, attention_mask, width)
            with self._reference():
                _, _, ref_logprobs = self._forward(input_ids, attention_mask, width, with_values=False)
        rewards, kl = per_token_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl.coef)
        if s.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards.cpu(), (old_values * mask).cpu(), mask.cpu(), s.gamma, s.lam)
        advantages = whiten(advantages, mask.cpu()).to(self.device)
        returns = returns.to(self.device)
        stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "entropy": []}
        order = list(range(len(batch)))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with self._checkpointing():
            for _ in range(s.ppo_epochs):
                self.rng.shuffle(order)
                minibatches = [order[i : i + s.mini_batch_size] for i in range(0, len(order), s.mini_batch_size)]
                for number, idx in enumerate(minibatches):
                    logits, values, logprobs = self._forward(input_ids[idx], attention_mask[idx], width)
                    pg, clipfrac = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], s.cliprange)
                    vf = value_loss(values, old_values[idx], returns[idx], mask[idx], s.cliprange_value)
                    ((pg + s.vf_coef * vf) / s.gradient_accumulation_steps).backward()
                    if (number + 1) % s.gradient_accumulation_steps == 0 or number + 1 == len(minibatches):
                        nn.utils.clip_grad_norm_(trainable, s.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    stats["policy_loss"].append(pg.item())
                    stats["value_loss"].append(vf.item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["entropy"].append(masked_mean(entropy(logits.detach(), s.temperature), mask[idx]).item())
        mean_kl = (kl.sum(1)).mean().item()
        row = {
            "step": self.step + 1,
            "reward": raw.mean().item(),  # the reward function's own scores
            "score": scores.mean().item(),  # after penalty, scaling and clipping: what PPO optimised
            "no_eos_fraction": (~ended).float().mean().item(),
            "kl": mean_kl,
            "kl_coef": self.kl.coef,
            "response_length": mask.sum(1).mean().item(),
            "seconds": round(time.perf_counter() - started, 2),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        if s.score_scaling != "none":
            row.update(score_running_mean=self.score_moments.mean, score_running_std=self.score_moments.std)
        if s.adaptive_kl:
            self.kl.update(mean_kl, len(batch))
        return row

    def train(self, log: Callable[[str], None] | None = print) -> list[dict]:
        """Run to `settings.steps`, passing each step's history row to `log` as one JSON line."""
        s = self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trackers = tracking.Trackers(s.report_to, self.out_dir, "ppo", config=asdict(s))
        try:
            with StageProgress("ppo", total=s.steps, completed=self.step, unit="steps") as bar:
                while self.step < s.steps:
                    batch = [self.prompts[self.rng.randrange(len(self.prompts))] for _ in range(s.batch_size)]
                    row = self.train_step(batch)
                    self.step += 1
                    self.history.append(row)
                    trackers.log(row, step=self.step)
                    if log:
                        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
                    if self.step % s.save_every == 0 or self.step == s.steps:
                        self.save()
                    bar.advance(1, note=f"reward {row['reward']:.3g}, kl {row['kl']:.3g}")
        finally:
            trackers.close()
        self._save_adapter(self.out_dir / "adapter")
        torch.save(self.model.value_head.state_dict(), self.out_dir / "value_head.pt")
        store.write_json_atomic(self.out_dir / "metrics.json", {"history": self.history, "settings": asdict(s)})
        cards.write_model_card(self.out_dir / "adapter", {**self.card_meta, "settings": asdict(s)}, {"history": self.history})
        return self.history


def _tuple_state(state):
    """random.Random state survives torch.save as nested lists; setstate needs tuples."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
