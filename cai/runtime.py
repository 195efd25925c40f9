"""The one place that decides device, precision, gradient checkpointing and threads.

Why it exists: TRL configs default to bf16 and gradient checkpointing. On a GPU that is right;
on a CPU it made an SFT step 15x slower (23.6 s vs 1.4 s per step on SmolLM2, LoRA r=8).
Thread count matters on a shared machine, so it is a setting rather than torch's guess.
Every trainer and engine asks this module instead of deciding for itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass
from typing import Literal

import torch

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class RuntimeSettings:
    """`device: auto` picks CUDA when present. `threads: 0` means all cores."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0 means all cores)")


def resolve_device(requested: str = "auto") -> Device:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from cai.errors import CaiError

        raise CaiError("device 'cuda' was requested but no CUDA GPU is visible", field="runtime.device")
    return requested  # type: ignore[return-value]


def resolve_threads(threads: int = 0) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


def apply(settings: RuntimeSettings, seed: int | None = None) -> Device:
    """Set torch's thread count and return the device to use.

    Trainers pass their `seed`: LoRA weights are initialised when the model is wrapped, before
    the Trainer seeds anything, so without it two runs with one seed started from different
    adapters (and a resumed run could not match an uninterrupted one)."""
    device = resolve_device(settings.device)
    if device == "cpu":
        torch.set_num_threads(resolve_threads(settings.threads))
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    return device


def training_overrides(device: Device) -> dict:
    """Keyword arguments for any `transformers.TrainingArguments` subclass (all TRL configs)."""
    if device == "cpu":
        return {
            "bf16": False,
            "fp16": False,
            "gradient_checkpointing": False,
            "use_cpu": True,
            "dataloader_pin_memory": False,
        }
    bf16 = torch.cuda.is_bf16_supported()
    return {
        "bf16": bf16,
        "fp16": not bf16,
        # On a GPU memory, not time, is the constraint for a 7B policy on 24 GB.
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }


def trainer_arguments(settings, out_dir, device: Device) -> dict:
    """Arguments every cai trainer passes to its TRL config: the schedule from `settings` (any of
    the train settings dataclasses), checkpoints under `out_dir/checkpoints` kept to the last two
    (enough to resume after a kill mid-save), logging every step, and the device overrides."""
    return dict(
        output_dir=str(Path(out_dir) / "checkpoints"),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        seed=settings.seed,
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        **training_overrides(device),
    )


def quantized_device_map(device: Device) -> dict | str:
    """Where a 4-bit/8-bit model is placed: this process's own GPU (LOCAL_RANK under torchrun or
    accelerate, 0 alone), or the CPU. bitsandbytes weights cannot be moved after loading."""
    if device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return "cpu"


def model_dtype(device: Device) -> torch.dtype:
    """fp32 on CPU: bf16 ran 5x slower there and drifted from greedy fp32 output."""
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
