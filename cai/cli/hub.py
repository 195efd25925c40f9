"""`cai push`: upload a dataset or adapter folder, with its card, to the Hugging Face Hub (cai/hub.py)."""

from __future__ import annotations

from typing import Optional

import typer

from cai.cli.common import app


@app.command()
def push(
    folder: str = typer.Argument(..., help="A dataset folder (critique, label or blend output) or an adapter folder "
                                           "(or the stage folder holding adapter/)."),
    repo_id: str = typer.Argument(..., help="Hub repository, namespace/name; created when missing. An adapter folder "
                                            "goes to a model repository, anything else to a dataset repository."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to, created from main when missing (default: main)."),
    token_env: Optional[str] = typer.Option(None, help="Environment variable holding the hub token "
                                                       "(default: huggingface_hub's login, HF_TOKEN or `hf auth login`)."),
    license: Optional[str] = typer.Option(None, help="Set the card's licence before pushing, e.g. mit, apache-2.0, cc-by-4.0 "
                                                     "(default: the card's own, 'other' as cai writes it)."),
) -> None:
    """Push a folder's card and data (never work logs or checkpoints) to the Hugging Face Hub."""
    from cai.hub import push_folder, token_from_env, upload_plan

    upload_plan(folder)  # a folder with no card or no data is refused before the token is read
    result = push_folder(folder, repo_id, private=private, revision=revision, token=token_from_env(token_env), license=license)
    print(f"pushed {result['folder']} -> {result['url']} ({result['repo_type']}: {', '.join(result['files'])})")
