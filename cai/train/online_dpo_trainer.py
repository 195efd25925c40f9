"""The loop of `cai.train.online_dpo`: a transformers Trainer whose loss step samples, judges
and applies the soft-label DPO loss. Imported only when training (transformers' Trainer is slow
to import); see cai/train/online_dpo.py for what it does and why.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from cai import chat
from cai.train.dpo_soft import soft_loss


@dataclass
class OnlineDPOArguments(TrainingArguments):
    """transformers' TrainingArguments for cai's online DPO: what the stage's `trl:` section may set
    (scheduler, warmup, weight decay, optimiser, max_grad_norm, report_to, ...). Online DPO's own
    knobs (beta, loss, judge, sampling) are `OnlineDPOSettings` fields."""


@dataclass
class Sampled:
    """Two answers per prompt: rows 0..B-1 are the first answers, B..2B-1 the second."""

    prompt_ids: torch.Tensor  # (2B, P), left-padded, the prompts twice
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (2B, T)
    completion_mask: torch.Tensor  # 1 up to and including the first end-of-sequence token
    texts: list[str]


def hard_labels(p: torch.Tensor) -> torch.Tensor:
    """The judge's pick: 1 where the first answer is preferred, 0 where the second, 0.5 on a tie."""
    return torch.where(p > 0.5, 1.0, torch.where(p < 0.5, 0.0, 0.5)).to(p.dtype)


class OnlineDPOTrainer(Trainer):
    def __init__(self, *, model, args, train_dataset, processing_class, judge, settings, peft_config=None,
                 judged_log: Path | None = None):
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=lambda rows: {"prompt": [row["prompt"] for row in rows]})
        self.judge = judge
        self.settings = settings
        self.judged_log = judged_log
        self.model_accepts_loss_kwargs = False  # the loss is a mean per batch: Trainer divides it for accumulation
        self._metrics: dict[str, list[float]] = defaultdict(list)
        tokenizer = processing_class
        eos = tokenizer.eos_token_id
        extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = sorted({i for i in ([eos] + (extra if isinstance(extra, list) else [extra])) if i is not None})
        if not self.eos_ids:
            from cai.errors import CaiError

            raise CaiError("the policy's tokenizer has no end-of-sequence token to end sampled answers")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    # -- sampling -------------------------------------------------------------------------------------
    def _sample(self, model, prompts: list[list[dict]]) -> Sampled:
        tokenizer, settings = self.processing_class, self.settings
        room = max(settings.train.max_length - settings.max_completion_length, 1)
        encoded = [tokenizer(chat.render(tokenizer, p), add_special_tokens=False)["input_ids"][-room:] for p in prompts]
        width = max(len(ids) for ids in encoded)
        device = self.args.device
        prompt_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, num_return_sequences=2,
                                     temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                     max_new_tokens=settings.max_completion_length, pad_token_id=self.pad_id,
                                     eos_token_id=self.eos_ids)
        finally:
            model.train(training)
        generated = out[:, width:]  # prompt-major: p0 first, p0 second, p1 first, ...
        completion_ids = torch.cat([generated[0::2], generated[1::2]])
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_ids, device=device))
        # Tokens up to and including the first end-of-sequence one; what generate padded after it is not the answer's.
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        completion_mask = (~after_eos).long()
        texts = [tokenizer.decode(ids[mask.bool() & ~eos], skip_special_tokens=True).strip()
                 for ids, mask, eos in zip(completion_ids, completion_mask, is_eos)]
        return Sampled(torch.cat([prompt_ids, prompt_ids]), torch.cat([prompt_mask, prompt_mask]), completion_ids,
                       completion_mask, texts)

    def _logps(self, model, s: Sampled) -> torch.Tensor:
        """Summed log-probability of each answer (2B,) under `model` as it is now."""
        input_ids = torch.cat([s.prompt_ids, s.completion_ids], dim=1)
        attention = torch.cat([s.prompt_mask, s.completion_mask], dim=1)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
        width = s.prompt_ids.size(1)
        logits = logits[:, width - 1 : -1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, s.completion_ids.unsqueeze(-1)).squeeze(-1)
        return (token_logps * s.completion_mask).sum(dim=1)

    # -- the loss step --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompts = [[dict(m) for m in p] for p in inputs["prompt"]]
        n = len(prompts)
        unwrapped = self.accelerator.unwrap_model(model)
        began = time.perf_counter()
        sample = self._sample(unwrapped, prompts)
        sampled = time.perf_counter()
        judged = self.judge(prompts, sample.texts[:n], sample.texts[n:])
        p_first = torch.tensor(judged, dtype=torch.float32, device=self.args.device)
        p = hard_labels(p_first) if self.settings.labels == "hard" else p_first
        judge_seconds = time.perf_counter() - sampled

        logps = self._logps(model, sample)
        with torch.no_grad(), unwrapped.disable_adapter():  # the reference: the policy without its adapter
            ref_logps = self._logps(model, sample)
        logratios = logps - ref_logps
        if self.settings.loss_type == "ipo":  # length-normalised, as in TRL's and cai's offline IPO
            lengths = sample.completion_mask.sum(dim=1).clamp(min=1)
            margin = logratios[:n] / lengths[:n] - logratios[n:] / lengths[n:]
        else:
            margin = logratios[:n] - logratios[n:]
        loss = soft_loss(self.settings.loss_type, self.settings.beta, margin, p).mean()

        rewards = self.settings.beta * (logratios[:n] - logratios[n:]).detach()
        metrics = self._metrics
        metrics["judge/p_first"].append(p_first.mean().item())
        metrics["judge/confidence"].append(torch.maximum(p_first, 1 - p_first).mean().item())
        metrics["judge/label"].append(p.mean().item())
        metrics["rewards/margins"].append(rewards.mean().item())
        # The policy's implied preference agrees with the judge's pick (ties count half).
        metrics["rewards/accuracies"].append(torch.where(p_first == 0.5, 0.5, ((rewards > 0) == (p_first > 0.5)).float()).mean().item())
        metrics["kl"].append(logratios.detach().mean().item())
        metrics["completion_length"].append(sample.completion_mask.sum(dim=1).float().mean().item())
        metrics["seconds/sample"].append(sampled - began)
        metrics["seconds/judge"].append(judge_seconds)
        self._log_judged(prompts, sample.texts, judged)
        return (loss, None) if return_outputs else loss

    def _log_judged(self, prompts, texts: list[str], judged: list[float]) -> None:
        if self.judged_log is None or not self.is_world_process_zero():
            return
        n = len(prompts)
        self.judged_log.parent.mkdir(parents=True, exist_ok=True)
        with self.judged_log.open("a", encoding="utf-8") as handle:
            for i, prompt in enumerate(prompts):
                handle.write(json.dumps({"step": self.state.global_step + 1, "prompt": prompt, "first": texts[i],
                                         "second": texts[n + i], "p_first": judged[i], "judge": self.judge.name},
                                        ensure_ascii=False) + "\n")

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs = {**logs, **{key: sum(v) / len(v) for key, v in self._metrics.items() if v}}
            self._metrics.clear()
        super().log(logs, start_time)

    def floating_point_ops(self, inputs) -> int:
        return 0  # the batch holds prompts, not token ids; transformers' estimate would warn
