"""LoRA / QLoRA building blocks shared by every trainer: quantised loading and adapter configs.

QLoRA here means: base weights loaded 4-bit nf4 with double quantisation (bitsandbytes), compute
in the runtime dtype, only LoRA adapters (and, for reward models, the `score` head) trainable.
bitsandbytes also runs 4-bit and 8-bit on CPU, so these paths are tested without a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


def stack_adapters(first: str | Path, second: str | Path, out: str | Path) -> None:
    """Write one LoRA adapter whose effect on the base equals `first` and then `second` applied.

    Why: DPO, GRPO and RLOO train a fresh adapter on a base with the SFT adapter merged in, so
    that their reference (the adapter disabled) is the SFT model. That fresh adapter alone means
    nothing on the plain base, yet every consumer (vLLM `LoRARequest`, the hf engine, evaluation,
    best-of-n) applies adapters to the plain base without merging. LoRA deltas add, and the sum of
    two low-rank products is one product of rank r1 + r2:
        s1 B1 A1 + s2 B2 A2 = [B1 B2] [s1 A1; s2 A2]   (new scale 1: alpha = r = r1 + r2)
    peft's `add_weighted_adapter(combination_type="cat")` computes the same but needs the base
    model in memory (a second copy of a 7B model at the end of training); this reads only the two
    adapter files.
    """
    from safetensors.torch import load_file, save_file

    first, second, out = Path(first), Path(second), Path(out)
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (first, second)]
    weights = [load_file(str(folder / "adapter_model.safetensors")) for folder in (first, second)]
    for folder, config, tensors in zip((first, second), configs, weights):
        if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
            raise CaiError("only plain LoRA adapters (no DoRA, rank or alpha patterns) can be stacked", source=str(folder))
        if any(".lora_A." not in key and ".lora_B." not in key for key in tensors):
            raise CaiError("adapter holds non-LoRA weights (modules_to_save); it cannot be stacked", source=str(folder))
    scales = [c["lora_alpha"] / (c["r"] ** 0.5 if c.get("use_rslora") else c["r"]) for c in configs]
    ranks = [c["r"] for c in configs]
    modules = sorted({key.split(".lora_")[0] for tensors in weights for key in tensors})
    stacked = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        present = [tensors for tensors in weights if a_key in tensors]
        in_features, out_features = present[0][a_key].shape[1], present[0][b_key].shape[0]
        # A module only one adapter targets: the other contributes zeros of its own rank.
        a_parts = [t[a_key].float() * scale if a_key in t else torch.zeros(rank, in_features)
                   for t, scale, rank in zip(weights, scales, ranks)]
        b_parts = [t[b_key].float() if b_key in t else torch.zeros(out_features, rank) for t, rank in zip(weights, ranks)]
        dtype = present[-1][a_key].dtype  # the trained adapter's dtype when it has the module
        stacked[a_key] = torch.cat(a_parts, dim=0).to(dtype).contiguous()
        stacked[b_key] = torch.cat(b_parts, dim=1).to(dtype).contiguous()
    targets = [c["target_modules"] for c in configs]
    if all(isinstance(t, list) for t in targets):
        target_modules = sorted(set(targets[0]) | set(targets[1]))
    elif targets[0] == targets[1]:
        target_modules = targets[0]
    else:
        raise CaiError(f"adapters target different module patterns ({targets[0]!r} vs {targets[1]!r})", source=str(second))
    config = {**configs[1], "r": sum(ranks), "lora_alpha": sum(ranks), "use_rslora": False,
              "target_modules": target_modules, "lora_dropout": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    save_file(stacked, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
