"""LoRA / QLoRA building blocks shared by every trainer: quantised loading and adapter configs.

QLoRA here means: base weights loaded 4-bit nf4 with double quantisation (bitsandbytes), compute
in the runtime dtype, only LoRA adapters (and, for reward models, the `score` head) trainable.
bitsandbytes also runs 4-bit and 8-bit on CPU, so these paths are tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cai.errors import CaiError

Quantization = Literal["none", "4bit", "8bit"]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    quantization: Quantization = "none"

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "4bit", "8bit"):
            raise CaiError("must be none, 4bit or 8bit", field="lora.quantization")
        if self.r < 1:
            raise CaiError("must be >= 1", field="lora.r")


def quantization_config(quantization: Quantization, compute_dtype: torch.dtype):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def peft_config(settings: LoraSettings, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def prepare_quantized(model, gradient_checkpointing: bool):
    """peft's k-bit preparation (fp32 norms, input grads) for quantised bases only."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def match_trainable_dtype(model, dtype: torch.dtype) -> None:
    """Cast trainable parameters to the compute dtype after a TRL trainer was built.

    TRL (1.16) casts every trainable parameter of a quantised model to bf16, following the QLoRA
    paper. With fp32 compute (the CPU path) the `score` head and LoRA layers then receive fp32
    activations against bf16 weights and the first forward pass fails; keeping them in the
    compute dtype fixes that and costs little memory (adapters are small).
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
