"""LoRA / QLoRA building blocks shared by every trainer: quantised loading and adapter configs.

QLoRA here means: base weights loaded 4-bit nf4 with double quantisation (bitsandbytes), compute
in the runtime dtype, only LoRA adapters (and, for reward models, the `score` head) trainable,
and those kept in fp32 whatever the base's dtype (`keep_trainable_fp32`).
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


def keep_trainable_fp32(model) -> None:
    """Keep every trainable parameter (LoRA A/B, the reward `score` head) in fp32; call it after
    the TRL trainer was built, before training.

    Why: the optimizer updates what it is given. With bf16 weights an AdamW step of ~lr (5e-6)
    on a weight of 0.1 is below bf16's resolution there (~4e-4) and rounds away: the adapter
    silently stops learning. peft creates LoRA weights in fp32 for a bf16/fp16 base (its
    `autocast_adapter_dtype`), but TRL (1.16) casts the trainable parameters of a quantised
    model to bf16 (QLoRA's recipe), and a `modules_to_save` copy such as `score` keeps the
    base's dtype. Upcasting them costs little memory: only adapters and the head are trainable.

    The forward pass still works on a low-precision base: peft's LoRA layers cast their input to
    the adapter's dtype and the result back (`_cast_input_dtype`); a `modules_to_save` copy does
    not, so it gets a pre-hook casting its floating inputs to its weight dtype (its output, the
    reward, then stays fp32). Under bf16 autocast (GPU) the matmuls still run in bf16.
    """
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    from peft.utils.other import ModulesToSaveWrapper

    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            for module in wrapper.modules_to_save.values():
                if not getattr(module, "_cai_casts_input", False):
                    module.register_forward_pre_hook(_cast_inputs_to_weight_dtype)
                    module._cai_casts_input = True


def _cast_inputs_to_weight_dtype(module, args):
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None:
        return None
    return tuple(a.to(weight.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


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
