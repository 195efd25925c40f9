"""A LoRA adapter merged into a cached copy of its base model's weights, for serving at base speed.

    folder = merged_model("smollm2-135m-instruct", "runs/quickstart/sft/adapter")

Why: vLLM applies LoRA per request. On the 2-core CPU that path generated 64.6 tok/s against
193.8 for the base model, and the transformers engine about 118. An adapter that is only sampled
from (sampling from the SFT policy, the eval's greedy answers) need not stay separate:
W' = W + s B A is computed once by peft (`merge_and_unload`), saved as a model folder, and the
vLLM engine loads those weights in place of the base's (`VLLMEngine` with `merge_adapters`),
with no second engine start-up.

The folder is keyed by the content digests of the base folder and of the adapter, so a retrained
adapter gets a new folder and an unchanged one is reused by the next run. It is written into a
temporary sibling and renamed into place under a file lock (`models.materialize_atomically`), so
a killed merge leaves nothing a later run would trust. Only the most recent `KEEP` folders are
kept (each is a full copy of the weights).

Numerics: merging adds the low-rank delta in fp32 once instead of per forward pass; the outputs
differ from unmerged LoRA by rounding only (measured in `bench/adapters.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from cai import digests, models, store
from cai.errors import CaiError
from cai.paths import cache_dir

log = logging.getLogger(__name__)

KEEP = 6  # merged folders kept in the cache; older ones are removed when a new one is written


def merged_dir() -> Path:
    return cache_dir() / "merged"


def merged_model(base_model: str, adapter: str | Path, *, trust_remote_code: bool = False) -> Path:
    """The folder holding `base_model` with `adapter` merged in, built on first use."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise CaiError("not a LoRA adapter folder (no adapter_config.json)", source=str(adapter))
    base = models.resolve(base_model)
    base_digest = digests.path_digest(Path(base)) if Path(base).is_dir() else base
    key = store.stable_id("merged-v1", base_digest, digests.path_digest(adapter))
    target = merged_dir() / key
    if models.is_complete(target):
        os.utime(target)  # most recently used: kept by the pruning below
        return target
    started = time.perf_counter()
    models.materialize_atomically(
        target, lambda tmp: _merge(base, adapter, tmp, trust_remote_code),
        provenance={"base": base_model, "base_digest": base_digest, "adapter": str(adapter.resolve())},
    )
    log.info("merged %s into %s in %.1f s -> %s", adapter, base_model, time.perf_counter() - started, target)
    _prune(keep=KEEP, spare=target)
    return target


def _merge(base: str, adapter: Path, out: Path, trust_remote_code: bool) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as exc:  # peft raises several types for a mismatched adapter
        raise CaiError(f"cannot merge this LoRA adapter into {base}: {exc}", source=str(adapter)) from None
    model.save_pretrained(out, safe_serialization=True)


def _prune(keep: int, spare: Path) -> None:
    """Remove all but the `keep` most recently used merged folders (never `spare`, just written).
    A folder another process is about to load may go too: the engine then says the folder is gone
    and the next call merges again."""
    folders = [p for p in merged_dir().iterdir() if p.is_dir() and not p.name.startswith(".") and p != spare]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)
