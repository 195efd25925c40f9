"""Any TRL config field from a recipe: the `trl:` pass-through of every TRL-trained stage.

    sft:
      settings:
        learning_rate: 2.0e-4
        trl: {lr_scheduler_type: cosine, warmup_steps: 10, weight_decay: 0.01, report_to: tensorboard}
    trl: {max_grad_norm: 0.5}        # top level: every training stage of the run whose config has the key

    cai run recipe.yaml --set dpo.settings.train.trl.lr_scheduler_type=constant --set trl.logging_steps=5

cai's own settings cover what every stage needs (learning rate, steps, batch, checkpoints); the
rest of TRL's config classes (SFTConfig, RewardConfig, DPOConfig, KTOConfig, GRPOConfig, RLOOConfig:
the versions installed; for online DPO, cai's own loop, transformers' TrainingArguments) is reachable here. Why checked against the class, at recipe load: a
misspelt key handed to TRL would stop the run with a TypeError after the earlier stages ran,
and a key that cai also sets would silently fight the recipe's own field. So a key must be a
field of the stage's config class, must not be one that cai derives from its own settings
(those are refused, naming the cai field to use), and must give the class a value it accepts
(the class is built once with it, which runs TRL's own checks). Keys that cai only defaults
(report_to, logging_steps, save_total_limit, bf16, gradient_checkpointing, ...) may be overridden.
PPO is cai's own trainer (TRL 1.16 has none), so it has no `trl:` section.
"""

from __future__ import annotations

import dataclasses
import importlib
import tempfile
from typing import Any, Mapping

from cai.errors import CaiError

# Each TRL-trained stage: its config class and where its TrainSettings sit in the recipe.
STAGES = {
    "sft": ("SFTConfig", ("settings",)),
    "rm": ("RewardConfig", ("settings",)),
    "dpo": ("DPOConfig", ("settings", "train")),
    "kto": ("KTOConfig", ("settings", "train")),
    # cai's own loop on transformers' Trainer (TRL's OnlineDPOTrainer takes no pairwise judge or soft label)
    "online_dpo": ("cai.train.online_dpo_trainer:OnlineDPOArguments", ("settings", "train")),
    "grpo": ("GRPOConfig", ("settings", "train")),
    "rloo": ("RLOOConfig", ("settings", "train")),
}
# Config fields cai sets from its own settings: (cai field under the stage's settings, or None
# where cai alone decides).
OWN_COMMON = {
    "output_dir": None,  # checkpoints live in the stage's folder, where resume finds them
    "learning_rate": "learning_rate",
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "seed": "seed",
    "save_steps": "save_steps",
}
OWN_BY_STAGE = {  # paths under the stage's section
    "sft": {"max_length": "settings.max_length", "completion_only_loss": None},
    "rm": {"max_length": "settings.max_length", "remove_unused_columns": None},
    "dpo": {"max_length": "settings.train.max_length", "beta": "settings.beta", "loss_type": "settings.loss_type"},
    "kto": {"max_length": "settings.train.max_length", "beta": "settings.beta", "loss_type": "settings.loss_type",
            "desirable_weight": "settings.desirable_weight", "undesirable_weight": "settings.undesirable_weight"},
    "online_dpo": {"remove_unused_columns": None},
    **{stage: {"num_generations": "settings.num_generations", "max_completion_length": "settings.max_completion_length",
               "temperature": "settings.temperature", "beta": "settings.beta", "use_vllm": "settings.rollouts"}
       for stage in ("grpo", "rloo")},
}


def config_class(stage: str):
    """The stage's config class: a TRL one by name, or "module:Class" for one of cai's own."""
    module, _, name = STAGES[stage][0].rpartition(":")
    return getattr(importlib.import_module(module or "trl"), name)


def field_names(stage: str) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class(stage)) if f.init}


def cai_keys(stage: str) -> dict[str, str | None]:
    """The config fields cai sets itself for `stage`: each with the recipe key that sets it, or None."""
    train = ".".join((stage,) + STAGES[stage][1])
    return {**{k: v and f"{train}.{v}" for k, v in OWN_COMMON.items()},
            **{k: v and f"{stage}.{v}" for k, v in OWN_BY_STAGE[stage].items()}}


def problems(stage: str, trl: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every key of `trl` that `stage`'s TRL config cannot take from a recipe."""
    if not trl:
        return []
    found = []
    names = field_names(stage)
    own = cai_keys(stage)
    for key in trl:
        if key in own:
            where = f"set {own[key]} instead" if own[key] else "cai sets it itself"
            found.append((key, f"'{key}' is cai's own setting for {stage} ({where})"))
        elif key not in names:
            close = sorted(n for n in names if key.lower() in n or n in key.lower())[:3]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            found.append((key, f"unknown {config_class(stage).__name__} field '{key}' (trl {_trl_version()}){hint}"))
    if not found:
        try:
            _probe(stage, trl)
        except (TypeError, ValueError) as exc:
            key = next((k for k in trl if k in str(exc) or str(trl[k]) in str(exc)), next(iter(trl)))
            found.append((key, f"{config_class(stage).__name__} refuses it: {str(exc).splitlines()[0][:200]}"))
    return found


def _probe(stage: str, trl: Mapping[str, Any]) -> None:
    """Build the config once with the keys, so TRL's own checks (enum values, ranges) run now."""
    with tempfile.TemporaryDirectory(prefix="cai-trl-probe-") as folder:
        import torch

        config_class(stage)(**{"output_dir": folder, "report_to": "none", "use_cpu": not torch.cuda.is_available(), **trl})


def _trl_version() -> str:
    return importlib.import_module("trl").__version__


def build(stage: str, cai_args: dict, trl: Mapping[str, Any]):
    """`stage`'s TRL config from cai's arguments with the recipe's `trl:` keys on top."""
    for key, message in problems(stage, trl):
        raise CaiError(message, field=f"trl.{key}")
    return config_class(stage)(**{**cai_args, **trl})


def spread(top: Mapping[str, Any], stage: str, own: Mapping[str, Any]) -> dict:
    """The `trl:` keys one stage trains with: the recipe's top-level keys its class has, under the
    stage's own (which win)."""
    if not top:
        return dict(own)
    names, skip = field_names(stage), cai_keys(stage)
    return {**{k: v for k, v in top.items() if k in names and k not in skip}, **own}


def wants_eval(config) -> bool:
    """True when the built TRL config asks for evaluation during training (`trl.eval_strategy`)."""
    strategy = getattr(config, "eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)) != "no"


def eval_split(config, stage: str, rows):
    """The held-out rows to evaluate on when the config asks for evaluation, else None; asking
    without held-out data stops with the setting to change."""
    if not wants_eval(config):
        return None
    if rows is None or len(rows) == 0:
        raise CaiError("asks for evaluation during training but there is no held-out split: set blend.eval_fraction "
                       "above 0 (or drop eval_strategy)", field=f"{stage}.trl.eval_strategy")
    return rows
