"""DPO with a soft label per pair: TRL's DPOTrainer, with a loss that reads each row's `chosen_prob`.

    trainer = SoftDPOTrainer(model=..., args=DPOConfig(loss_type=["sigmoid"]), train_dataset=rows_with_chosen_prob, ...)

Why cai owns this: TRL 1.16's DPO losses take no per-row label. Its sigmoid loss never reads
`label_smoothing`, and where a loss does read it (robust, exo_pair, aot) it is one number for the
whole run. An AI label says "answer 1 is better with probability p" per pair, so the label has to
travel with the row: the `chosen_prob` column is kept through TRL's tokenising (it maps, so extra
columns survive), past `remove_unused_columns` (added to the signature columns) and into the batch
(the collator is wrapped to stack it), and `_compute_loss` is replaced, since TRL computes its loss
inline there. Everything else (tokenising, truncation, the reference with the adapter disabled,
precomputed reference log-probs, checkpoints) is TRL's.

The soft forms, with Δ the policy-minus-reference log-ratio margin of chosen over rejected; each is
the expectation of TRL's hard loss over the label (chosen wins with probability p), or for IPO the
paper's own soft target, and each equals TRL's loss at p = 1:
- sigmoid (conservative DPO): -(p·logσ(βΔ) + (1-p)·logσ(-βΔ)). Its gradient in βΔ is σ(βΔ) - p, so
  training stops where the policy's implied preference σ(βΔ) equals the label instead of pushing
  the margin up forever; a p = 0.5 pair pulls the margin back to 0 (no gradient where it is 0,
  as at the start of training, when the policy is the reference).
- ipo: (Δ̄ - (2p-1)/(2β))², Δ̄ length-normalised as in TRL; IPO's target τ⁻¹(p - ½) (Azar et al.,
  2023, eq. 17 with a known preference probability), so a 0.7 label asks for 40% of the margin a
  hard label asks for and a 0.5 label for none.
- hinge: p·relu(1 - βΔ) + (1-p)·relu(1 + βΔ).

Only what cai configures is supported (one loss of the three, reverse-KL, no length-desensitised
`ld_alpha`, no WPO weighting); anything else is refused at construction rather than ignored. The
logged metrics are TRL's reward/log-prob ones plus `chosen_prob` (the batch's mean p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from trl import DPOTrainer

from cai.errors import CaiError

SOFT_LOSSES = {
    "sigmoid": "conservative sigmoid: -(p*logsigmoid(beta*margin) + (1-p)*logsigmoid(-beta*margin))",
    "ipo": "ipo with target (2p-1)/(2*beta)",
    "hinge": "expected hinge: p*relu(1-beta*margin) + (1-p)*relu(1+beta*margin)",
}
PROB_COLUMN = "chosen_prob"


def soft_loss(loss_type: str, beta: float, margin: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-pair loss for label probability `p`. `margin` is Δ (for ipo: the length-normalised Δ̄)."""
    if loss_type == "sigmoid":
        return -(p * F.logsigmoid(beta * margin) + (1 - p) * F.logsigmoid(-beta * margin))
    if loss_type == "ipo":
        return (margin - (2 * p - 1) / (2 * beta)) ** 2
    if loss_type == "hinge":
        return p * torch.relu(1 - beta * margin) + (1 - p) * torch.relu(1 + beta * margin)
    raise CaiError(f"soft labels support loss types {', '.join(SOFT_LOSSES)}, not '{loss_type}'", field="dpo.loss_type")


@dataclass
class SoftLabelCollator:
    """TRL's preference collator plus the rows' `chosen_prob` as a float tensor."""

    base: Callable[[list[dict]], dict]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch[PROB_COLUMN] = torch.tensor([float(e[PROB_COLUMN]) for e in examples], dtype=torch.float32)
        return batch


class SoftDPOTrainer(DPOTrainer):
    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is None:
            raise CaiError("SoftDPOTrainer needs a DPOConfig (args=...)")
        _check_supported(config)
        for name, dataset in (("train_dataset", kwargs.get("train_dataset")), ("eval_dataset", kwargs.get("eval_dataset"))):
            if dataset is not None and PROB_COLUMN not in dataset.column_names:
                raise CaiError(f"needs a '{PROB_COLUMN}' column for soft-label DPO", field=name)
        super().__init__(*args, **kwargs)
        self.data_collator = SoftLabelCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PROB_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PROB_COLUMN]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        p = inputs[PROB_COLUMN]
        inputs = {k: v for k, v in inputs.items() if k != PROB_COLUMN}
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        seq_len = completion_mask.size(1) - 1
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        # Positions outside the completion have label -100 and log-prob 0, as in TRL.
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # TRL's own reference pass: the adapter disabled (or the "ref" adapter), or the ref model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(model if self.ref_model is None else self.ref_model, inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        (loss_type,) = self.loss_types
        if loss_type == "ipo":  # TRL's IPO averages the log-ratios over each completion's tokens
            chosen_tokens, rejected_tokens = completion_mask.chunk(2, dim=0)
            margin = chosen_logratios / chosen_tokens.sum(dim=1).clamp(min=1.0) - rejected_logratios / rejected_tokens.sum(dim=1).clamp(min=1.0)
        else:
            margin = chosen_logratios - rejected_logratios
        loss = soft_loss(loss_type, self.beta, margin, p.to(margin.dtype)).mean() * self.loss_weights[0]
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._log_metrics(mode, p, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios, inputs)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, p, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios, inputs) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        metrics[PROB_COLUMN].append(gather(p).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


def _check_supported(config) -> None:
    loss_types = config.loss_type if isinstance(config.loss_type, list) else [config.loss_type]
    if len(loss_types) != 1 or loss_types[0] not in SOFT_LOSSES:
        raise CaiError(f"soft-label DPO takes one loss type of {', '.join(SOFT_LOSSES)}, got {loss_types}", field="dpo.loss_type")
    unsupported = {
        "f_divergence_type": config.f_divergence_type != "reverse_kl",
        "ld_alpha": config.ld_alpha is not None,
        "use_weighting": bool(config.use_weighting),
    }
    for name, set_ in unsupported.items():
        if set_:
            raise CaiError("is not supported by cai's soft-label DPO loss (leave TRL's default)", field=f"dpo.{name}")
