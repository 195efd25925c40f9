"""What every `cai` subcommand module shares: the Typer apps, the console and small helpers."""

from __future__ import annotations

import typer
from rich.console import Console

from cai.errors import CaiError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constitutional AI and RLAIF toolkit.")
models_app = typer.Typer(no_args_is_help=True, help="Builtin and cached models.")
app.add_typer(models_app, name="models")
constitution_app = typer.Typer(no_args_is_help=True, help="Validate, show and import constitutions.")
app.add_typer(constitution_app, name="constitution")
label_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                        help="AI preference labels (run with options), or `cai label eval` against human labels.")
app.add_typer(label_app, name="label")
console = Console()


def _engine_for(model: str, engine: str, threads: int):
    from cai.engines import EngineSettings, get_engine

    return get_engine(model, EngineSettings(kind=engine, threads=threads))  # type: ignore[arg-type]


def _settings(cls, sets: list[str], what: str):
    """A library settings dataclass from `--set key.sub=value` pairs (the recipe's own classes)."""
    from cai import config

    data = config.apply_overrides({}, sets)
    try:
        return config.from_dict(cls, data)
    except config.ConfigError as exc:
        raise CaiError(exc.message, field=".".join(map(str, [what, *exc.path]))) from None


SET_HELP = "Settings as key=value (the recipe section's keys), e.g. --set learning_rate=1e-4 --set lora.r=8"


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
