"""Share cai's outputs on the Hugging Face Hub: `cai push DIR REPO_ID` and a recipe's `push:` section.

    cai push runs/quickstart/blend user/quickstart-blend --private
    cai push runs/quickstart/dpo user/quickstart-dpo          # the stage folder or its adapter/

What goes up is the folder's card (cai/cards.py) and what it describes, nothing else: for a
dataset folder (critique, label, blend) the data files the card's `configs` list; for an adapter
folder (one with `adapter_config.json`, pushed as a model) its files (weights, config, tokenizer,
cai's settings file). Work logs, checkpoints, manifests and locks never leave the machine. A folder
with no card or nothing to upload is refused with one line before any network call.

Before uploading, an adapter's card gets the eval stage's figures when the run has them
(`cards.add_eval_results`), and `--license` (recipe: `push.license`) sets the card's licence; both
are written to the local card too, so the folder and the repository say the same.

The token is huggingface_hub's own login (`HF_TOKEN`, `hf auth login`) unless `token_env` names
the environment variable to read it from. A recipe's `push` runs after every stage has finished:
a failed upload loses nothing (rerun the recipe: finished stages are skipped, the push is retried).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cai import cards
from cai.errors import CaiError

DATASET_OUTPUTS = ("critique", "label", "blend")
ADAPTER_OUTPUTS = ("sft", "rm", "dpo", "kto", "online_dpo", "ppo", "grpo", "rloo")
OUTPUTS = DATASET_OUTPUTS + ADAPTER_OUTPUTS
TRAINED_ON = {"sft": "critique", "rm": "blend", "dpo": "blend"}  # adapter -> the dataset output it learnt from


@dataclass(frozen=True)
class PushSettings:
    """A recipe's `push:` section. Each output goes to `<repo_prefix>-<output>` (user/run-sft, ...)."""

    repo_prefix: str | None = None  # "namespace/name"; unset: nothing is pushed
    outputs: list[str] = field(default_factory=list)  # default: every dataset and adapter the recipe writes
    private: bool = True  # for repositories cai creates; an existing one keeps its visibility
    revision: str | None = None  # branch (created if missing); default main
    token_env: str | None = None  # environment variable with the token; default: huggingface_hub's login
    license: str | None = None  # the cards' licence (default: as written, "other")

    def __post_init__(self) -> None:
        if self.repo_prefix is not None and not cards._HUB_ID.match(self.repo_prefix):
            raise CaiError(f"must look like namespace/name, got '{self.repo_prefix}'", field="push.repo_prefix")
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown:
            raise CaiError(f"unknown output '{unknown[0]}' (choose from {', '.join(OUTPUTS)})", field="push.outputs")

    def problems(self, stages: list[str]) -> list[str]:
        """Outputs named that the recipe's stages do not write."""
        return [f"'{o}' is not a stage of this recipe" for o in self.outputs if o not in stages]


def upload_plan(path: str | Path) -> tuple[Path, str, list[str]]:
    """(folder, repo_type, files to upload) for a dataset or adapter folder; CaiError when there is no
    card or nothing to upload. A stage folder holding `adapter/` means that adapter."""
    folder = Path(path)
    if not folder.is_dir():
        raise CaiError("is not a folder", source=str(path))
    if not (folder / "adapter_config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if not (folder / cards.CARD).is_file():
        raise CaiError(f"has no card ({cards.CARD}): push a folder cai wrote (critique, label, blend or an adapter)",
                       source=str(folder))
    if (folder / "adapter_config.json").is_file():
        if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise CaiError("has no adapter weights (adapter_model.safetensors) to push", source=str(folder))
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return folder, "model", files
    cards.read_card(folder)  # bad YAML is its own error
    files = cards.data_files(folder)
    if not files:
        raise CaiError("has no data to push (its card lists no data file with rows)", source=str(folder))
    return folder, "dataset", [cards.CARD, *files]


def token_from_env(name: str | None) -> str | None:
    if name is None:
        return None
    token = os.environ.get(name)
    if not token:
        raise CaiError(f"environment variable '{name}' is not set", field="token_env")
    return token


def push_folder(path: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                token: str | None = None, license: str | None = None, datasets: list[str] | None = None,
                api: Any = None) -> dict:
    """Create `repo_id` if needed and upload the folder's card and data in one commit."""
    folder, repo_type, files = upload_plan(path)
    if not cards._HUB_ID.match(repo_id):
        raise CaiError(f"must look like namespace/name, got '{repo_id}'", field="repo_id")
    if repo_type == "model":
        cards.add_eval_results(folder)
    if license or datasets:
        cards.update_front_matter(folder, license=license, datasets=datasets)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        import httpx

        network_errors: tuple = (OSError, ValueError, httpx.HTTPError)
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        network_errors = (OSError, ValueError)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
                          allow_patterns=files, commit_message=f"cai: {folder.parent.name if folder.name == 'adapter' else folder.name}")
    except network_errors as exc:
        raise CaiError(f"push to {repo_id} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                       source=str(folder)) from None
    url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    return {"folder": str(folder), "repo_id": repo_id, "repo_type": repo_type, "files": files, "url": url}


def push_run(runner, log: Callable[[str], None] = print, api: Any = None) -> list[dict]:
    """The recipe's `push:` section after a run: each listed output (default: all it writes) of the
    last iteration to `<repo_prefix>-<output>`; adapters' cards link the pushed datasets they learnt from."""
    settings: PushSettings = runner.recipe.push
    if not settings.repo_prefix:
        return []
    stages = runner.recipe.stages
    outputs = settings.outputs or [o for o in OUTPUTS if o in stages]
    token = token_from_env(settings.token_env)
    last = runner.recipe.iterations
    pushed: dict[str, str] = {}
    results = []
    for output in sorted(outputs, key=OUTPUTS.index):  # datasets first, so adapters can link them
        folder = runner.stage_dir(output, last)
        folder = folder / "adapter" if output in ADAPTER_OUTPUTS else folder
        if not (folder / cards.CARD).is_file():
            log(f"[push] {output}: {folder} has no card yet (stage not run): skipped")
            continue
        repo_id = f"{settings.repo_prefix}-{output}"
        linked = [pushed[TRAINED_ON[output]]] if TRAINED_ON.get(output) in pushed else None
        result = push_folder(folder, repo_id, private=settings.private, revision=settings.revision, token=token,
                             license=settings.license, datasets=linked, api=api)
        pushed[output] = repo_id
        results.append(result)
        log(f"[push] {output} -> {result['url']} ({len(result['files'])} files)")
    return results
