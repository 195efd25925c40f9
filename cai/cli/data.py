"""`cai critique`, `cai sample`, `cai label` and `cai blend`: the data-making stages."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from cai.cli.common import _adapter_dir, _engine_for, _read_rows, app, console, label_app
from cai.errors import CaiError


@app.command()
def critique(
    constitution: str = typer.Option(..., help="Constitution YAML."),
    prompts: str = typer.Option(..., help="Prompt file (JSONL/JSON/CSV/TXT) or a datasets id/path."),
    model: str = typer.Option("smollm2-135m-instruct", help="Builtin name, local folder or hub id."),
    out: str = typer.Option(..., help="Run directory (created; resumed when it holds the same run)."),
    rounds: int = typer.Option(2, help="Critique/revision rounds."),
    engine: str = typer.Option("auto", help="auto, vllm, hf, openai or ray (ray: a local 2-actor cluster; a recipe's engine.ray section sets more)."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest set of tokens holding this much probability (1: all)."),
    max_tokens: int = typer.Option(256, help="New tokens per answer, critique and revision."),
    seed: int = typer.Option(0, help="Random seed; every request's seed derives from it, so a rerun reproduces the rows."),
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


@app.command()
def sample(
    prompts: str = typer.Option(..., help="Prompt file or datasets id/path."),
    model: str = typer.Option("smollm2-135m-instruct", help="Policy: builtin name, folder or hub id."),
    out: str = typer.Option(..., help="Run directory."),
    k: int = typer.Option(2, "-k", help="Responses per prompt (>= 2)."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder applied to the policy (not merged)."),
    engine: str = typer.Option("auto", help="auto, vllm, hf, openai or ray."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest set of tokens holding this much probability (1: all)."),
    max_tokens: int = typer.Option(256, help="Most new tokens per answer."),
    seed: int = typer.Option(0, help="Random seed; every request's seed derives from it, so a rerun reproduces the rows."),
    columns: list[str] = typer.Option([], help="Column map, e.g. --columns prompt=question."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    threads: int = typer.Option(0, help="CPU threads (0: every core)."),
    overwrite: bool = typer.Option(False, help="Replace what cai wrote in --out before (never files it did not write)."),
) -> None:
    """Sample k responses per prompt from a policy (input for `cai label`)."""
    import json

    from cai.engines import SamplingSettings
    from cai.prompt_sets import load_prompts, parse_column_map
    from cai.sampling import SampleSettings, run_sampling

    settings = SampleSettings(k=k, seed=seed, sampling=SamplingSettings(temperature=temperature, top_p=top_p, max_tokens=max_tokens))
    loaded = load_prompts(prompts, columns=parse_column_map(columns), limit=limit)
    adapter = _adapter_dir(adapter, "--adapter")
    generator = _engine_for(model, engine, threads)
    if adapter:
        generator.add_adapter("policy", adapter)  # type: ignore[attr-defined]
    summary = run_sampling(generator, loaded, out, settings, adapter="policy" if adapter else None,
                           adapter_path=adapter, overwrite=overwrite)
    print(json.dumps(summary, indent=2))


def _label_settings(mode, principles, no_swap, seed, min_confidence, pairing, cot_max_tokens, keep_ties=False):
    from cai.labeling import LabelSettings

    return LabelSettings(mode=mode, principles_per_pair=principles, swap=not no_swap, seed=seed,
                         min_confidence=min_confidence, pairing=pairing, cot_max_tokens=cot_max_tokens, keep_ties=keep_ties)


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
    keep_ties: bool = typer.Option(False, help="Keep pairs labelled exactly 0.5 (no preference) instead of dropping them."),
    pairing: str = typer.Option("adjacent", help="adjacent or all pairs of the k responses."),
    cot_max_tokens: int = typer.Option(128, help="Most tokens of reasoning per comparison in cot mode."),
    engine: str = typer.Option("auto", help="auto, vllm, hf, openai or ray."),
    seed: int = typer.Option(0, help="Random seed; every request's seed derives from it, so a rerun reproduces the rows."),
    threads: int = typer.Option(0, help="CPU threads (0: every core)."),
    overwrite: bool = typer.Option(False, help="Replace what cai wrote in --out before (never files it did not write)."),
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
    settings = _label_settings(mode, principles, no_swap, seed, min_confidence, pairing, cot_max_tokens, keep_ties)
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


@label_app.command("eval")
def label_eval(
    human: str = typer.Option(..., help="Human comparisons in any importer format (HH-RLHF, TRL, UltraFeedback...)."),
    constitution: str = typer.Option(..., help="Constitution YAML with 'preferences'."),
    model: str = typer.Option("smollm2-135m-instruct", help="Feedback (labeller) model."),
    out: str = typer.Option(..., help="Run directory (metrics.json is written there)."),
    mode: str = typer.Option("logprob", help="logprob: read P(A)/P(B) in one step; cot: reason first, then read them."),
    principles: int = typer.Option(1, help="Principles sampled per pair (each pair is labelled under each, in both orders)."),
    cot_max_tokens: int = typer.Option(128, help="Most tokens of reasoning per comparison in cot mode."),
    engine: str = typer.Option("auto", help="auto, vllm, hf, openai or ray."),
    seed: int = typer.Option(0, help="Random seed; every request's seed derives from it, so a rerun reproduces the rows."),
    threads: int = typer.Option(0, help="CPU threads (0: every core)."),
    overwrite: bool = typer.Option(False, help="Replace what cai wrote in --out before (never files it did not write)."),
) -> None:
    """Agreement of the AI labeller with human choices, with and without swap-averaging."""
    import json
    from pathlib import Path

    from cai.cards import write_dataset_card
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
    write_dataset_card(out, "label", run.constitution)  # again, with the agreement figures
    print(json.dumps(metrics, indent=2))


@app.command("blend")
def blend_command(
    sources: list[str] = typer.Argument(..., help="SRC[:weight] ... (any importer format, or cai output)."),
    out: str = typer.Option(..., help="Output directory (train.jsonl, eval.jsonl, summary.json)."),
    by: str = typer.Option("weight", help="weight (fractions, may oversample) or counts (exact rows)."),
    eval_fraction: float = typer.Option(0.1, help="Held-out share of every source's prompts (all pairs of a held-out prompt)."),
    skip_malformed: bool = typer.Option(False, help="Skip rows an importer cannot read (listed in summary.json) instead of failing."),
    seed: int = typer.Option(0, help="Random seed; every request's seed derives from it, so a rerun reproduces the rows."),
) -> None:
    """Mix human comparisons and AI labels by weight; dedupe; human labels win conflicts."""
    from dataclasses import replace

    from cai.blend import blend, parse_source

    if by not in ("weight", "counts"):
        raise CaiError("must be weight or counts", field="--by")
    specs = [replace(parse_source(s), skip_malformed=skip_malformed) for s in sources]
    summary = blend(specs, out, by=by, eval_fraction=eval_fraction, seed=seed)  # type: ignore[arg-type]
    table = Table(title=f"blend -> {out}")
    for column in ("source", "read", "malformed", "duplicates", "conflicts lost", "kept", "eval", "train", "weight"):
        table.add_column(column)
    for row in summary["sources"]:
        table.add_row(row["source"], str(row["read"]), str(row["malformed_skipped"]), str(row["duplicates"]),
                      str(row["conflicts_lost"]), str(row["after_dedupe"]), str(row["eval"]), str(row["train"]), f"{row['weight']:g}")
    console.print(table)
    for row in summary["sources"]:
        if row["malformed_skipped"]:
            print(f"skipped {row['malformed_skipped']} malformed row(s) of {row['source']}:")
            for bad in row["malformed_rows"][:20]:
                print(f"  row {bad['row']}: {bad['reason']}")
            if row["malformed_skipped"] > 20:
                print(f"  ... and {row['malformed_skipped'] - 20} more (all listed in {out}/summary.json)")
    conflicts = summary["conflicts"]
    print(f"conflicts: {conflicts['human_vs_ai']} human-vs-AI (human kept), {conflicts['same_kind']} same-kind (more confident kept)")
    print(f"train {summary['train']} rows, eval {summary['eval']} rows")
