"""`cai train-rm`, `sft`, `dpo`, `kto`, `online-dpo`, `ppo`, `grpo`, `rloo`, `best-of-n`, `run` and `eval`."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cai.cli.common import SET_HELP, _adapter_dir, _engine_for, _settings, app
from cai.errors import CaiError


@app.command("train-rm")
def train_rm(
    data: str = typer.Option(..., help="A blend directory (train.jsonl, eval.jsonl) or one preference file."),
    model: str = typer.Option("smollm2-135m-instruct", help="Backbone: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output directory (adapter/, metrics.json, checkpoints/)."),
    quantization: str = typer.Option("none", help="none, 4bit (QLoRA nf4, double quant) or 8bit."),
    lora_r: int = typer.Option(16, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha (the update is scaled by alpha / r)."),
    learning_rate: float = typer.Option(1e-4, help="Peak learning rate."),
    epochs: float = typer.Option(1.0, help="Passes over the training data (when --max-steps is -1)."),
    max_steps: int = typer.Option(-1, help="Stop after this many optimiser steps (-1: train for --epochs)."),
    batch_size: int = typer.Option(4, help="Rows per device per step."),
    gradient_accumulation_steps: int = typer.Option(1, help="Steps whose gradients are summed before each update."),
    max_length: int = typer.Option(1024, help="Longest tokenised row; longer rows are truncated."),
    source_weight: list[str] = typer.Option([], help="Loss weight per source, e.g. --source-weight ai=0.5"),
    hard_labels: bool = typer.Option(False, help="Ignore chosen_prob (p = 1 for every pair)."),
    merge: bool = typer.Option(False, help="Also save a merged full model."),
    threads: int = typer.Option(0, help="CPU threads (0: every core)."),
    seed: int = typer.Option(0, help="Random seed; every request's seed derives from it, so a rerun reproduces the rows."),
) -> None:
    """Train a LoRA/QLoRA reward model on soft preference labels; evaluate on the held-out split."""
    import json
    from pathlib import Path

    from cai.lora import LoraSettings
    from cai.train.reward import RewardSettings, train_reward_model

    weights = {}
    for item in source_weight:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise CaiError(f"'{item}' must look like SOURCE=WEIGHT", field="--source-weight") from None
    path = Path(data)
    train_file = path / "train.jsonl" if path.is_dir() else path
    eval_file = path / "eval.jsonl" if path.is_dir() else None
    if not train_file.exists():
        raise CaiError("no train.jsonl (run `cai blend` first, or pass a preference file)", source=str(path))
    settings = RewardSettings(
        lora=LoraSettings(r=lora_r, alpha=lora_alpha, quantization=quantization),  # type: ignore[arg-type]
        learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length, source_weights=weights,
        hard_labels=hard_labels, merge=merge, threads=threads, seed=seed,
    )
    metrics = train_reward_model(train_file, model, out, settings, eval_file=eval_file)
    metrics.pop("log_history")
    print(json.dumps(metrics, indent=2))


@app.command()
def sft(
    data: str = typer.Option(..., help="sft.jsonl from `cai critique` (TRL messages rows)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output folder."),
    set: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Supervised fine-tuning on revisions (loss on the answer only), LoRA or QLoRA."""
    from cai.train.policy import TrainSettings, train_sft

    metrics = train_sft(data, model, out, _settings(TrainSettings, set, "sft"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))


@app.command()
def dpo(
    data: str = typer.Option(..., help="A blend directory or a preference file."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output folder."),
    sft_adapter: Optional[str] = typer.Option(None, "--sft", help="SFT adapter folder to start from."),
    set: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """DPO with LoRA/QLoRA; the reference is the policy with its adapter disabled."""
    from cai.train.policy import DPOSettings, train_dpo

    metrics = train_dpo(data, model, out, _settings(DPOSettings, set, "dpo"), sft_adapter=_adapter_dir(sft_adapter, "--sft"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))


@app.command()
def kto(
    data: str = typer.Option(..., help="A blend directory (its train.jsonl) or a preference file: each pair gives a "
                                       "desirable (chosen) and an undesirable (rejected) answer."),
    model: str = typer.Option("smollm2-135m-instruct", help="Policy base model: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output directory (adapter/, metrics.json, checkpoints/)."),
    sft_adapter: Optional[str] = typer.Option(None, "--sft", help="SFT adapter folder to start from (also the reference)."),
    set: list[str] = typer.Option([], "--set", help=SET_HELP + " (KTO: beta, min_chosen_prob, low_confidence=drop|keep, "
                                  "desirable_weight, train.max_steps, ...)"),
) -> None:
    """KTO on AI labels, LoRA/QLoRA; pairs below min_chosen_prob are dropped (or kept: --set low_confidence=keep)."""
    from cai.train.kto import KTOSettings, train_kto

    metrics = train_kto(data, model, out, _settings(KTOSettings, set, "kto"), sft_adapter=_adapter_dir(sft_adapter, "--sft"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))


@app.command("online-dpo")
def online_dpo(
    prompts: str = typer.Option(..., help="Prompts the policy answers (JSONL/CSV file or dataset), two answers each per step."),
    model: str = typer.Option("smollm2-135m-instruct", help="Policy base model: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output directory (adapter/, metrics.json, work/judged.jsonl, checkpoints/)."),
    sft_adapter: Optional[str] = typer.Option(None, "--sft", help="SFT adapter folder to start from (also the reference)."),
    constitution: str = typer.Option("constitutions/harmless.yaml", help="Constitution whose preference principles the "
                                     "labeller judges by."),
    judge_model: Optional[str] = typer.Option(None, help="Feedback model the labeller reads (default: --model, the base)."),
    reward: Optional[str] = typer.Option(None, help="Reward model folder from `cai train-rm`: it judges instead of the "
                                         "labeller (p = sigmoid of the reward difference)."),
    engine: str = typer.Option("auto", help="Engine for the feedback model: auto, vllm or hf."),
    threads: int = typer.Option(0, help="CPU threads for training and the feedback engine (0: all cores)."),
    set: list[str] = typer.Option([], "--set", help=SET_HELP + " (online DPO: beta, labels=soft|hard, "
                                  "labeller.principles_per_pair, max_completion_length, train.max_steps, ...)"),
) -> None:
    """Online DPO: the policy samples two answers per prompt, cai's constitution labeller (or --reward) judges, a soft-label DPO step follows."""
    import dataclasses

    from cai.prompt_sets import load_prompts
    from cai.train.online_dpo import ConstitutionJudge, OnlineDPOSettings, RewardJudge, train_online_dpo

    settings = _settings(OnlineDPOSettings, set, "online_dpo")
    settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, threads=threads or settings.train.threads),
                                   judge="reward_model" if reward else settings.judge)
    if settings.judge == "reward_model" and not reward:
        raise CaiError("judge reward_model needs --reward (a folder from `cai train-rm`)", field="--reward")
    loaded = load_prompts(prompts)
    start = _adapter_dir(sft_adapter, "--sft")
    if reward:
        from cai.train.reward import RewardScorer

        judge = RewardJudge(RewardScorer.load(reward, threads=threads))
    else:
        from cai.constitution import load_constitution
        from cai.recipe import resolve_path

        loaded_constitution = load_constitution(resolve_path(constitution))  # inputs first, then the engine
        judge = ConstitutionJudge(_engine_for(judge_model or model, engine, threads), loaded_constitution, settings.labeller)
    metrics = train_online_dpo(loaded, model, judge, out, settings, sft_adapter=start)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))


@app.command()
def ppo(
    prompts: str = typer.Option(..., help="Prompt file or datasets id/path."),
    reward: str = typer.Option(..., help="Reward model folder from `cai train-rm`."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output folder."),
    sft_adapter: Optional[str] = typer.Option(None, "--sft", help="SFT adapter folder to start from."),
    set: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """PPO against a reward model (cai's own implementation; TRL removed PPOTrainer)."""
    from cai.train.ppo import PPOSettings, PPOTrainer
    from cai.prompt_sets import load_prompts
    from cai.train.reward import RewardScorer

    settings = _settings(PPOSettings, set, "ppo")
    loaded = [list(p.messages) for p in load_prompts(prompts)]
    scorer = RewardScorer.load(reward, threads=settings.threads)
    PPOTrainer(model, scorer.score, loaded, out, settings, sft_adapter=_adapter_dir(sft_adapter, "--sft")).train()


def _online_command(method: str):
    def command(
        prompts: str = typer.Option(..., help="Prompt file or datasets id/path."),
        reward: str = typer.Option(..., help="Reward model folder from `cai train-rm`."),
        model: str = typer.Option("smollm2-135m-instruct", help="Base model: builtin name, folder or hub id."),
        out: str = typer.Option(..., help="Output folder."),
        sft_adapter: Optional[str] = typer.Option(None, "--sft", help="SFT adapter folder to start from."),
        set: list[str] = typer.Option([], "--set", help=SET_HELP),
    ) -> None:
        from cai.train.online import OnlineSettings, train_online
        from cai.prompt_sets import load_prompts
        from cai.train.reward import RewardScorer

        settings = _settings(OnlineSettings, set, method)
        loaded = load_prompts(prompts)
        scorer = RewardScorer.load(reward, threads=settings.train.threads)
        metrics = train_online(loaded, model, scorer, out, settings, method=method, sft_adapter=_adapter_dir(sft_adapter, "--sft"))
        print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))

    command.__doc__ = f"{method.upper()} through TRL with the reward model as reward function."
    return command


app.command("grpo")(_online_command("grpo"))
app.command("rloo")(_online_command("rloo"))


@app.command("best-of-n")
def best_of_n_command(
    prompts: str = typer.Option(..., help="Prompt file or datasets id/path."),
    reward: str = typer.Option(..., help="Reward model folder from `cai train-rm`."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output folder."),
    n: int = typer.Option(4, "-n", help="Candidates sampled per prompt."),
    max_tokens: int = typer.Option(128, help="Most new tokens per answer."),
    engine: str = typer.Option("auto", help="auto, vllm, hf, openai or ray."),
    threads: int = typer.Option(0, help="CPU threads (0: every core)."),
) -> None:
    """Sample n answers per prompt and keep the one the reward model scores highest."""
    from cai.engines import SamplingSettings
    from cai.train.online import best_of_n
    from cai.prompt_sets import load_prompts
    from cai.train.reward import RewardScorer

    # Inputs first: a missing file must not cost an engine start-up (half a minute for vLLM).
    loaded, scorer = load_prompts(prompts), RewardScorer.load(reward, threads=threads)
    summary = best_of_n(_engine_for(model, engine, threads), scorer, loaded, out, n=n,
                        sampling=SamplingSettings(temperature=1.0, max_tokens=max_tokens))
    print(json.dumps(summary, indent=2))


@app.command()
def run(
    recipe: str = typer.Argument(..., help="Recipe YAML, e.g. recipes/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. critique.settings.rounds=1"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun from this stage on (a step such as iteration-2/dpo also works)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only this stage (in every iteration), or one step: iteration-2/dpo."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each step, whether it would run or be skipped, and why; change nothing."),
) -> None:
    """Run a recipe's stages in order; unchanged finished stages are skipped."""
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    loaded = load_recipe(recipe, overrides or [])
    if dry_run:
        for step in RecipeRunner(loaded).preview(from_stage=from_stage, only=only):
            print(f"{step['action']:<5} {step['step']:<22} {step['why']}  ({step['folder']})")
        return
    timings = RecipeRunner(loaded).run(from_stage=from_stage, only=only)
    print(json.dumps({"stage_seconds": timings, "output_dir": str(loaded.out)}, indent=2))


@app.command("eval")
def eval_command(
    recipe: str = typer.Argument(..., help="The recipe whose trained policy to evaluate."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. eval.max_tokens=256"),
) -> None:
    """Evaluate a recipe's trained policy against its SFT/base baseline and write the report."""
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    loaded = load_recipe(recipe, overrides or [])
    if "eval" not in loaded.stages:
        raise CaiError("the recipe has no 'eval' stage", source=recipe, field="stages")
    RecipeRunner(loaded).run(only="eval")
    print((loaded.out / "report.md").read_text())
