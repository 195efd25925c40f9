"""Watching a training stage: a progress bar and the user's experiment tracker.

    # recipe: every TRL-trained stage, and PPO, logs to TensorBoard under its own folder
    trl: {report_to: tensorboard}
    # then, offline:  tensorboard --logdir runs/quickstart

Trackers are the ones transformers and TRL support (`report_to`: tensorboard, trackio, wandb,
mlflow, ...), chosen through the `trl:` pass-through (cai/trl_args.py); cai only points the
file-based ones at `<stage folder>/tracking/<stage>` instead of transformers' default under the
checkpoints, so one `tensorboard --logdir <output_dir>` shows every stage as its own run. wandb,
mlflow and the rest keep their own settings (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...).

PPO is cai's own loop, not a transformers Trainer, so it logs through accelerate's tracker
classes (`accelerate.tracking`): the same trackers under the same names, without an Accelerator
(which would set up distributed state PPO does not use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cai.errors import CaiError
from cai.progress import StageProgress


def tracking_dir(out_dir: Path | str) -> Path:
    return Path(out_dir) / "tracking"


def _training_progress_class():
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        """Optimiser steps of a transformers/TRL trainer as a `StageProgress` bar (main process only).

        Replaces transformers' own tqdm bar (cai passes `disable_tqdm=True`), which redraws on one
        line and so reads as a single line of noise in a log file."""

        def __init__(self, stage: str):
            self.stage = stage
            self.bar: StageProgress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            # On resume, the state (global_step) is loaded before this call: the bar starts there.
            if state.is_world_process_zero and self.bar is None:
                self.bar = StageProgress(self.stage, total=state.max_steps, completed=state.global_step, unit="steps").__enter__()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.note = f"loss {logs['loss']:.4g}"

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.advance(state.global_step - self.bar.completed)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self, error: BaseException | None = None) -> None:
            if self.bar is not None:
                self.bar.__exit__(type(error) if error else None, error, None)
                self.bar = None

    return TrainingProgress


def route_trackers(trainer, out_dir: Path | str, stage: str) -> None:
    """Point the file-based trackers transformers attached (for `report_to`) at the stage folder."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
            callback.logging_dir = str(tracking_dir(out_dir) / stage)


def train(trainer, out_dir: Path | str, stage: str, resume: str | None):
    """`trainer.train(resume)` with a progress bar and the trackers routed; returns its result.

    The bar is closed however training ends, so an exception leaves a usable terminal and a last
    line in the log saying where it stopped. Every TRL trainer of cai trains through here, so this is
    also where cai's CPU paths go in: TRL's LM head (`cai.train.cpu_head`), LoRA dropout
    (`cai.train.cpu_dropout`) and packed rows instead of padded ones (`cai.train.packing`)."""
    from cai.train import cpu_dropout, cpu_head, packing

    cpu_head.install()
    cpu_dropout.replace_lora_dropout(trainer.model)
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            packing.install(model)
    progress = _training_progress_class()(stage)
    trainer.add_callback(progress)
    route_trackers(trainer, out_dir, stage)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except BaseException as exc:
        progress.close(exc)
        raise
    progress.close()
    return result


# -- PPO (cai's own loop) -------------------------------------------------------------------------------


def tracker_names(report_to: str | Sequence[str]) -> list[str]:
    """`report_to` as a list of tracker names accelerate knows; "none" gives [], unknown ones stop."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n != "none"]
    if names == ["all"]:
        raise CaiError("'all' is not supported for PPO: name the trackers", field="ppo.report_to")
    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise CaiError(f"unknown tracker(s) {', '.join(unknown)} (choose from {', '.join(sorted(LOGGER_TYPE_TO_CLASS))} "
                       "or none)", field="ppo.report_to")
    return names


class Trackers:
    """accelerate's tracker classes for a loop that is not a transformers Trainer (PPO)."""

    def __init__(self, report_to: str | Sequence[str], out_dir: Path | str, stage: str, config: dict | None = None):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for name in tracker_names(report_to):
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(stage, str(tracking_dir(out_dir))) if cls.requires_logging_directory else cls(stage)
            tracker.start()
            if config:
                tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested settings as flat scalar hyperparameters (TensorBoard's hparams take scalars only)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
