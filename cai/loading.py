"""Loading models and tokenizers with cai's safety defaults.

Every load goes through here so the defaults hold everywhere: safetensors only (pickle
checkpoints can run code when loaded), `trust_remote_code` off unless the caller opts in, a pad
token always set, and a missing model reported as one line that names it.
"""

from __future__ import annotations

from typing import Any

from cai import models
from cai.errors import CaiError


def load_tokenizer(name: str, *, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    path = models.resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CaiError(f"cannot load tokenizer for model '{name}': {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name: str, *, dtype: Any = None, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, name, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


def load_sequence_classifier(name: str, *, dtype: Any = None, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoModelForSequenceClassification

    kwargs.setdefault("num_labels", 1)
    return _load(
        AutoModelForSequenceClassification, name, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )


def _load(auto_class, name: str, *, dtype, trust_remote_code: bool, **kwargs):
    path = models.resolve(name)
    try:
        return auto_class.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise CaiError(f"cannot load model '{name}': {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
