"""Policy training on one GPU (or a CPU): SFT on revisions and DPO, both LoRA or QLoRA.

    cai sft --data runs/critique/sft.jsonl --out runs/sft
    cai dpo --data runs/blend --sft runs/sft --out runs/dpo

Both wrap TRL's trainers; cai adds the model loading (4-bit/8-bit), CPU-aware defaults, data
conversion and resume-from-checkpoint.

SFT trains on the assistant answer only: the critique stage's `messages` rows are converted to
TRL's prompt/completion form, for which SFTTrainer masks the prompt tokens. (Its
`assistant_only_loss` needs `{% generation %}` markers that SmolLM2's chat template lacks.)

DPO's reference model is the policy with its adapter disabled, so no second copy of the weights
sits in memory. With a full-precision base the SFT adapter is merged in first, so the reference is
the SFT model, and the saved `adapter` stacks SFT and DPO adapters into one that applies to the
plain base (`cai.lora.stack_adapters`); with a quantised base (no merging into 4-bit weights) the
SFT adapter itself is trained further and the reference is the base.

Soft labels in DPO (`soft_labels`): `"soft"` (default) trains each pair against its own
chosen_prob p with `cai.train.dpo_soft.SoftDPOTrainer` (conservative DPO for the sigmoid loss, a soft
target for IPO, the expected hinge for hinge); `"filter"` keeps only pairs with chosen_prob >=
`min_chosen_prob` and trains them as hard labels (p = 1); `"ignore"` uses every pair as a hard
label. There is no label-smoothing mode: TRL's sigmoid loss never reads `label_smoothing`.
metrics.json records the mode, the loss form and the mean p the loss really used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai import cards, models, runtime, store, trl_args
from cai.train import tracking
from cai.errors import CaiError
from cai.lora import LoraSettings, keep_trainable_fp32, peft_config, prepare_quantized, quantization_config, stack_adapters


@dataclass(frozen=True)
class TrainSettings:
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    seed: int = 0
    save_steps: int = 50
    threads: int = 0
    trust_remote_code: bool = False
    # Any other field of the stage's TRL config class (warmup, scheduler, weight decay, optimiser,
    # report_to, ...), checked against that class when the recipe loads: see cai/trl_args.py.
    trl: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DPOSettings:
    train: TrainSettings = field(default_factory=TrainSettings)
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    soft_labels: Literal["soft", "filter", "ignore"] = "soft"
    min_chosen_prob: float = 0.6

    def __post_init__(self) -> None:
        if self.soft_labels == "label_smoothing":
            raise CaiError("'label_smoothing' is gone: TRL's sigmoid DPO loss ignores label_smoothing; use 'soft' "
                           "(each pair's chosen_prob in the loss), 'filter' or 'ignore'", field="dpo.soft_labels")
        if self.soft_labels not in ("soft", "filter", "ignore"):
            raise CaiError(f"unknown mode '{self.soft_labels}' (soft, filter or ignore)", field="dpo.soft_labels")
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):  # the losses cai.train.dpo_soft has soft forms of
            raise CaiError(f"unknown loss type '{self.loss_type}' (sigmoid, ipo or hinge)", field="dpo.loss_type")
        if not 0.5 <= self.min_chosen_prob <= 1:
            raise CaiError("must be in [0.5, 1]", field="dpo.min_chosen_prob")


def merged_adapter(settings: TrainSettings, adapter: str | None, trainable_adapter: bool = False) -> str | None:
    """The adapter `load_policy` merges into the base (full precision, not trained further), else None."""
    return adapter if adapter is not None and settings.lora.quantization == "none" and not trainable_adapter else None


def load_policy(model_name: str, settings: TrainSettings, device: str, adapter: str | None = None, trainable_adapter: bool = False):
    """Base causal LM (quantised if asked) plus, optionally, an existing adapter.

    Returns (model, tokenizer, peft_config_or_None): a config when a new adapter should be
    created by the trainer, None when `model` already carries a trainable adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cai.loading import load_tokenizer

    tokenizer = load_tokenizer(model_name, trust_remote_code=settings.trust_remote_code, padding_side="right")
    dtype = runtime.model_dtype(device)
    quant = quantization_config(settings.lora.quantization, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=settings.trust_remote_code, use_safetensors=True)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=runtime.quantized_device_map(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(models.resolve(model_name), **kwargs)
    except (OSError, ValueError) as exc:
        raise CaiError(f"cannot load policy '{model_name}': {str(exc).splitlines()[0]}") from None
    model = prepare_quantized(model, gradient_checkpointing=device == "cuda")
    if adapter is None:
        return model, tokenizer, peft_config(settings.lora, "CAUSAL_LM")
    if merged_adapter(settings, adapter, trainable_adapter):
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        return merged, tokenizer, peft_config(settings.lora, "CAUSAL_LM")
    return PeftModel.from_pretrained(model, adapter, is_trainable=True), tokenizer, None


def _train_and_save(trainer, tokenizer, out_dir: Path, meta: dict, device: str, stacked_on: str | None = None) -> dict:
    """Train (resuming from the last checkpoint) and save `out_dir/adapter`, the policy as one
    adapter on the plain base. When training ran on a base with `stacked_on` merged in, the
    trained adapter goes to `out_dir/stage_adapter` and `adapter` stacks the two."""
    keep_trainable_fp32(trainer.model)
    result = tracking.train(trainer, out_dir, meta["stage"], store.latest_checkpoint(out_dir / "checkpoints"))
    adapter_dir = out_dir / "adapter"
    trained = out_dir / "stage_adapter" if stacked_on else adapter_dir
    # Under a launcher every rank calls save_model (DeepSpeed ZeRO-3 gathers the weights across
    # them) and only the main one writes; the rest stop here (cai/train/distributed.py).
    trainer.save_model(str(trained))
    if not trainer.is_world_process_zero():
        return {}
    if stacked_on:
        stack_adapters(stacked_on, trained, adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    (adapter_dir / "cai-policy.json").write_text(json.dumps(meta, indent=2, default=str))
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "processes": trainer.accelerator.num_processes,  # as the trainer saw it: > 1 under a launcher
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
        "eval_history": [h for h in trainer.state.log_history if "eval_loss" in h],
        **{k: v for k, v in meta.items() if k != "settings"},
    }
    store.write_json_atomic(out_dir / "metrics.json", metrics)
    cards.write_model_card(adapter_dir, meta, metrics)  # after save_pretrained, whose own README.md it replaces
    return metrics


def sft_dataset(path: Path):
    """critique-stage `messages` rows -> conversational prompt/completion (loss on the answer)."""
    import datasets

    rows = []
    for number, row in enumerate(store.read_jsonl(path), 1):
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2 or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise CaiError("needs 'messages': a list of {role: system/user/assistant, content: text}", source=f"{path}:{number}")
        if messages[-1]["role"] != "assistant":
            raise CaiError("needs 'messages' ending with an assistant answer", source=f"{path}:{number}")
        rows.append({"prompt": messages[:-1], "completion": [messages[-1]]})
    if not rows:
        raise CaiError("has no rows", source=str(path))
    return datasets.Dataset.from_list(rows)


def train_sft(data: str | Path, model_name: str, out_dir: str | Path, settings: TrainSettings = TrainSettings()) -> dict:
    from trl import SFTTrainer

    out_dir = Path(out_dir)
    device = runtime.apply(runtime.RuntimeSettings(threads=settings.threads), seed=settings.seed)
    dataset = sft_dataset(Path(data))
    model, tokenizer, lora = load_policy(model_name, settings, device)
    config = trl_args.build("sft", dict(max_length=settings.max_length, completion_only_loss=True,
                                        **runtime.trainer_arguments(settings, out_dir, device)), settings.trl)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    meta = {"stage": "sft", "base_model": model_name, "data": str(data), "rows": len(dataset), "settings": asdict(settings)}
    return _train_and_save(trainer, tokenizer, out_dir, meta, device)


def dpo_dataset(path: Path, settings: DPOSettings):
    """Preference records -> TRL rows plus `chosen_prob`, the label the loss uses: the record's own
    in `soft` mode, 1 (hard) in `filter` and `ignore`. Returns (dataset, mean chosen_prob of the
    kept records as labelled)."""
    import datasets

    from cai.data.importers import load_preferences

    records, _ = load_preferences(str(path))
    if settings.soft_labels == "filter":
        records = [r for r in records if r["chosen_prob"] >= settings.min_chosen_prob]
    if not records:
        raise CaiError("no preference pairs left to train on", source=str(path))
    rows = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
         "chosen_prob": float(r["chosen_prob"]) if settings.soft_labels == "soft" else 1.0}
        for r in records
    ]
    mean_prob = sum(r["chosen_prob"] for r in records) / len(records)
    return datasets.Dataset.from_list(rows), mean_prob


def train_dpo(
    data: str | Path, model_name: str, out_dir: str | Path, settings: DPOSettings = DPOSettings(), *, sft_adapter: str | None = None
) -> dict:
    from cai.train.dpo_soft import SOFT_LOSSES, SoftDPOTrainer

    out_dir = Path(out_dir)
    train = settings.train
    device = runtime.apply(runtime.RuntimeSettings(threads=train.threads), seed=train.seed)
    path = Path(data)
    dataset, data_mean_prob = dpo_dataset(path / "train.jsonl" if path.is_dir() else path, settings)
    model, tokenizer, lora = load_policy(model_name, train, device, adapter=sft_adapter)
    config = trl_args.build("dpo", dict(
        beta=settings.beta,
        loss_type=[settings.loss_type],
        max_length=train.max_length,
        **runtime.trainer_arguments(train, out_dir, device),
    ), train.trl)
    # ref_model=None with an adapter: TRL computes reference log-probs with the adapter disabled.
    # Eval loss, reward accuracy and margins on the blend's held-out pairs during training, when
    # asked (trl: {eval_strategy: steps, eval_steps: N}).
    held_out = path / "eval.jsonl" if path.is_dir() else None
    eval_dataset = trl_args.eval_split(config, "dpo", dpo_dataset(held_out, settings)[0]
                                       if held_out and held_out.exists() and held_out.stat().st_size else None)
    trainer = SoftDPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, peft_config=lora)
    applied = list(trainer.train_dataset["chosen_prob"])  # after TRL's own filtering of over-long prompts
    meta = {
        "stage": "dpo", "base_model": model_name, "data": str(path / "train.jsonl" if path.is_dir() else path),
        "sft_adapter": sft_adapter, "pairs": len(applied),
        "soft_labels": settings.soft_labels, "loss": SOFT_LOSSES[settings.loss_type],
        "applied_mean_chosen_prob": sum(applied) / len(applied) if applied else None,
        "mean_chosen_prob": data_mean_prob, "settings": asdict(settings),
    }
    return _train_and_save(trainer, tokenizer, out_dir, meta, device, stacked_on=merged_adapter(train, sft_adapter))
