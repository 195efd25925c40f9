"""Reward models: LoRA/QLoRA training on soft preference labels, evaluation, and scoring.

    cai train-rm --data runs/blend --model smollm2-135m-instruct --out runs/rm

Why a custom loss: TRL's RewardTrainer optimises -log sigmoid(r_c - r_r - margin), which can only
express "chosen is better". AI labels are probabilities (`chosen_prob`), so the loss here is the
Bradley-Terry cross-entropy against the soft target,

    loss = -[p * log sigmoid(r_c - r_r) + (1 - p) * log sigmoid(r_r - r_c)],

weighted per row by its source's loss weight. A hard label is the special case p = 1; p = 0.5
gives zero gradient at r_c = r_r (the labeller could not tell, so the model is not pushed). The
rest of TRL's RewardTrainer (tokenisation, collation, logging, checkpoints) is reused by
subclassing it.

The `score` head is listed in LoRA's `modules_to_save`: otherwise it stays at its random
initialisation in the saved adapter and a reloaded reward model scores noise (a common failure).

Long pairs are truncated, never dropped (TRL's RewardTrainer drops every pair longer than
`max_length`: 518 of 1,842 real HH pairs at 256 tokens). cai tokenises each side itself, with the
text the scorer uses, and keeps the *last* `max_length` tokens: the oldest prompt turns go first,
the response and its final token (where the reward is read) stay. `metrics.json` counts the
pairs truncated and the tokens cut. The scorer truncates the same side.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cai import cards, chat, models, runtime, store, trl_args
from cai.train import packing, tracking
from cai.errors import CaiError
from cai.lora import keep_trainable_fp32, peft_config, prepare_quantized, quantization_config
from cai.train.policy import TrainSettings


@dataclass(frozen=True)
class RewardSettings(TrainSettings):
    """The policy trainers' schedule and LoRA settings plus what only the reward model needs."""

    source_weights: dict[str, float] = field(default_factory=dict)  # loss weight per `source`; default 1
    hard_labels: bool = False  # treat every label as p = 1 (ablation)
    merge: bool = False  # also write a merged full model


def soft_bradley_terry_loss(
    rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, chosen_prob: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    delta = rewards_chosen - rewards_rejected
    per_row = -(chosen_prob * nn.functional.logsigmoid(delta) + (1 - chosen_prob) * nn.functional.logsigmoid(-delta))
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-8)


def _trainer_class():
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            output = super().torch_call(examples)
            output["chosen_prob"] = torch.tensor([float(e["chosen_prob"]) for e in examples])
            output["loss_weight"] = torch.tensor([float(e["loss_weight"]) for e in examples])
            return output

    class SoftLabelRewardTrainer(RewardTrainer):
        """TRL's RewardTrainer with the soft-label, source-weighted loss (see module docstring)."""

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "chosen_prob", "loss_weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chosen_prob = inputs.pop("chosen_prob")
            weights = inputs.pop("loss_weight")
            # The rewards from packed rows on a CPU (cai.train.packing), as the padded forward gives them.
            logits = packing.sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
            rewards_chosen, rewards_rejected = torch.chunk(logits.squeeze(-1), chunks=2)
            loss = soft_bradley_terry_loss(rewards_chosen, rewards_rejected, chosen_prob.to(rewards_chosen.dtype), weights.to(rewards_chosen.dtype))
            mode = "train" if self.model.training else "eval"
            with torch.no_grad():
                self._metrics[mode]["accuracy"].append((rewards_chosen > rewards_rejected).float().mean().item())
                self._metrics[mode]["margin"].append((rewards_chosen - rewards_rejected).mean().item())
                self._metrics[mode]["mean_reward"].append(logits.mean().item())
            return (loss, {"logits": logits}) if return_outputs else loss

    return SoftLabelRewardTrainer, SoftLabelCollator


def load_preference_file(path: Path) -> list[dict]:
    from cai.data.importers import load_preferences

    return load_preferences(str(path))[0]


def reward_text(tokenizer, conversation: Sequence[dict], response: str) -> str:
    """The text a reward model reads for one answer: the same in training and in scoring."""
    messages = list(conversation) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return chat.render_plain(messages)[: -len("\n\nAssistant:")]


def _dataset(records: Sequence[dict], settings: RewardSettings, tokenizer):
    """Tokenised rows (TRL's `chosen_ids`/`rejected_ids`, so TRL neither retokenises nor drops
    long pairs) and the truncation counts: each side keeps its last `max_length` tokens."""
    import datasets

    rows, truncated_pairs, tokens_cut = [], 0, 0
    for r in records:
        sides, cut = [], 0
        for answer in (r["chosen"], r["rejected"]):
            ids = tokenizer(reward_text(tokenizer, r["prompt"], answer[0]["content"]), add_special_tokens=False)["input_ids"]
            cut += max(0, len(ids) - settings.max_length)
            sides.append(ids[-settings.max_length :])
        truncated_pairs += cut > 0
        tokens_cut += cut
        rows.append({
            "chosen_ids": sides[0],
            "rejected_ids": sides[1],
            "chosen_prob": 1.0 if settings.hard_labels else float(r["chosen_prob"]),
            "loss_weight": float(settings.source_weights.get(r["source"], 1.0)),
        })
    return datasets.Dataset.from_list(rows), {"truncated_pairs": truncated_pairs, "truncated_tokens": tokens_cut}


def load_reward_backbone(model_name: str, settings: RewardSettings, device: str):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from cai.loading import load_tokenizer

    tokenizer = load_tokenizer(model_name, trust_remote_code=settings.trust_remote_code, padding_side="right")
    dtype = runtime.model_dtype(device)
    quant = quantization_config(settings.lora.quantization, dtype)
    kwargs = dict(num_labels=1, dtype=dtype, trust_remote_code=settings.trust_remote_code, use_safetensors=True)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=runtime.quantized_device_map(device))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(models.resolve(model_name), **kwargs)
    except (OSError, ValueError) as exc:
        raise CaiError(f"cannot load reward backbone '{model_name}': {str(exc).splitlines()[0]}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_quantized(model, gradient_checkpointing=device == "cuda")
    model = get_peft_model(model, peft_config(settings.lora, "SEQ_CLS", modules_to_save=["score"]))
    return model, tokenizer


def train_reward_model(
    train_file: str | Path,
    model_name: str,
    out_dir: str | Path,
    settings: RewardSettings = RewardSettings(),
    *,
    eval_file: str | Path | None = None,
) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = runtime.apply(runtime.RuntimeSettings(threads=settings.threads), seed=settings.seed)
    train_records = load_preference_file(Path(train_file))
    eval_records = load_preference_file(Path(eval_file)) if eval_file and Path(eval_file).exists() and Path(eval_file).stat().st_size else []
    model, tokenizer = load_reward_backbone(model_name, settings, device)
    Trainer, Collator = _trainer_class()
    config = trl_args.build("rm", dict(
        per_device_eval_batch_size=settings.batch_size,
        max_length=settings.max_length,
        remove_unused_columns=True,
        **runtime.trainer_arguments(settings, out_dir, device),
    ), settings.trl)
    train_dataset, truncation = _dataset(train_records, settings, tokenizer)
    # Eval loss, accuracy and margin on the blend's held-out split during training, when asked
    # (trl: {eval_strategy: steps, eval_steps: N}); the final `eval` metrics below come either way.
    eval_dataset = trl_args.eval_split(config, "rm", _dataset(eval_records, settings, tokenizer)[0] if eval_records else None)
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=Collator(pad_token_id=tokenizer.pad_token_id),
    )
    keep_trainable_fp32(trainer.model)
    result = tracking.train(trainer, out_dir, "rm", store.latest_checkpoint(out_dir / "checkpoints"))
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # every rank (ZeRO-3 gathers); only the main one writes
    if not trainer.is_world_process_zero():
        return {}
    tokenizer.save_pretrained(adapter_dir)
    (adapter_dir / "cai-reward.json").write_text(json.dumps({"base_model": model_name, "settings": asdict(settings)}, indent=2, default=str))
    if settings.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "merged")
    metrics = {
        "train_rows": len(train_records),
        **truncation,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "processes": trainer.accelerator.num_processes,
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
        "eval_history": [h for h in trainer.state.log_history if "eval_loss" in h],
    }
    if eval_records:
        scorer = RewardScorer(model, tokenizer)
        metrics["eval"] = evaluate_reward_model(scorer, eval_records)
    store.write_json_atomic(out_dir / "metrics.json", metrics)
    cards.write_model_card(adapter_dir, {"stage": "rm", "base_model": model_name, "data": str(train_file), "settings": asdict(settings)}, metrics)
    return metrics


class RewardScorer:
    """Batched reward scores for (conversation, response) pairs.

    Inputs are text, not token ids: a policy and a reward model with different tokenizers work
    together because each side tokenises with its own tokenizer and chat template.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 2048):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer.truncation_side = "left"  # like training: cut the oldest prompt tokens, keep the answer
        self.scored_tokens = 0  # real (unpadded) tokens read so far: the eval's work accounting (cai.eval_work)
        self.model.eval()

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 0, batch_size: int = 16) -> "RewardScorer":
        """A trained reward model folder: `adapter/` (LoRA + score head) or a merged model."""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from cai.loading import load_sequence_classifier, load_tokenizer

        device = runtime.apply(runtime.RuntimeSettings(threads=threads))
        path = Path(path)
        adapter = path / "adapter" if (path / "adapter").is_dir() else path
        meta = adapter / "cai-reward.json"
        if (adapter / "adapter_config.json").exists():
            base = json.loads(meta.read_text())["base_model"] if meta.exists() else json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
            tokenizer = load_tokenizer(str(adapter), padding_side="right")
            backbone = AutoModelForSequenceClassification.from_pretrained(
                models.resolve(base), num_labels=1, dtype=runtime.model_dtype(device), use_safetensors=True
            )
            backbone.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(backbone, str(adapter)).to(device)
        else:
            tokenizer = load_tokenizer(str(path), padding_side="right")
            model = load_sequence_classifier(str(path), dtype=runtime.model_dtype(device)).to(device)
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, batch_size=batch_size)

    def _text(self, conversation: Sequence[dict], response: str) -> str:
        return reward_text(self.tokenizer, conversation, response)

    @torch.no_grad()
    def score(self, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        texts = [self._text(c, r) for c, r in zip(conversations, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            encoded = self.tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False).to(device)
            logits = self.model(**encoded).logits.squeeze(-1).float().tolist()
            self.scored_tokens += int(encoded["attention_mask"].sum())
            for index, value in zip(batch, logits if isinstance(logits, list) else [logits]):
                scores[index] = float(value)
        return scores


def evaluate_reward_model(scorer: RewardScorer, records: Sequence[dict], bins: int = 10) -> dict:
    """Pairwise accuracy (all, human rows, AI rows), calibration and reward statistics."""
    from cai.blend import is_ai

    prompts = [r["prompt"] for r in records]
    chosen = scorer.score(prompts, [r["chosen"][0]["content"] for r in records])
    rejected = scorer.score(prompts, [r["rejected"][0]["content"] for r in records])
    rows = [{"ai": is_ai(record), "correct": c > rj, "p_model": 1 / (1 + math.exp(-(c - rj)))}
            for record, c, rj in zip(records, chosen, rejected)]

    def accuracy(subset):
        return round(sum(r["correct"] for r in subset) / len(subset), 4) if subset else None

    total = len(rows)
    return {
        "pairs": total,
        "accuracy": accuracy(rows),
        "accuracy_human": accuracy([r for r in rows if not r["ai"]]),
        "accuracy_ai": accuracy([r for r in rows if r["ai"]]),
        "ece": round(expected_calibration_error([r["p_model"] for r in rows], [r["correct"] for r in rows], bins), 4),
        **_reward_statistics(chosen, rejected),
    }


def expected_calibration_error(p_chosen: Sequence[float], agrees: Sequence[bool], bins: int = 10) -> float:
    """ECE as usually defined (Guo et al. 2017) for a pairwise preference model.

    The model's confidence in its own pick is max(P, 1 - P), P = sigmoid(r_chosen - r_rejected);
    `agrees` says whether its pick (chosen when r_chosen > r_rejected) is the labelled winner.
    Confidences fall in `bins` equal-width bins of [0, 1]; ECE is the bin-size-weighted mean of
    |mean confidence - fraction agreeing|. 0 means "right 80% of the time when 80% sure".
    (Comparing P with the label itself, as cai once did, reports 1 - mean P on hard labels.)
    """
    if not p_chosen:
        return 0.0
    confidences = [max(p, 1 - p) for p in p_chosen]
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        in_bin = [i for i, c in enumerate(confidences) if low <= c < high or (b == bins - 1 and c == 1.0)]
        if in_bin:
            confidence = sum(confidences[i] for i in in_bin) / len(in_bin)
            observed = sum(bool(agrees[i]) for i in in_bin) / len(in_bin)
            ece += len(in_bin) / len(confidences) * abs(confidence - observed)
    return ece


def _reward_statistics(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    every = list(chosen) + list(rejected)
    mean = sum(every) / len(every)
    std = math.sqrt(sum((x - mean) ** 2 for x in every) / len(every))
    return {
        "reward_mean": round(mean, 4),
        "reward_std": round(std, 4),
        "reward_chosen_mean": round(sum(chosen) / len(chosen), 4),
        "reward_rejected_mean": round(sum(rejected) / len(rejected), 4),
    }
