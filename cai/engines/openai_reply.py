"""Reading the body of an OpenAI-compatible server's 200 reply, trusting none of it.

Used by `cai.engines.openai_engine` (the `openai` engine kind); not called on its own. A server
that is only half compatible, or a proxy in between, can send any JSON: choices that are not
objects, `"text": null`, usage counts as strings, logprobs that are NaN or 1e308. Each is a
`MalformedReply` naming the field and the value; the engine turns it into a one-line `CaiError`
with the status and the (credential-free) URL, so a bad server stops a run with a clear message
instead of a traceback or, worse, silently wrong labels.

Choice scores are summed in log space (logsumexp), so very small or very large log-probabilities
neither underflow to "no mass" nor overflow.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from cai.errors import CaiError

# A log-probability is <= 0; servers computing in float32 may round the top token a hair above.
_LOGPROB_ROUNDING = 1e-3


class MalformedReply(Exception):
    """The reply is JSON with 'choices', but not in the shape the API promises (one line)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise MalformedReply(f"{where} is {_show(value)}, not an object")
    return value


def _count(usage: dict, key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if not _is_int(value) or value < 0:
        raise MalformedReply(f"usage.{key} is {_show(value)}, not a token count")
    return value


def ordered_choices(data: dict) -> list[dict]:
    """The reply's choices, in their 'index' order when the server numbers them (as vLLM does,
    and not always in order); each must be an object."""
    choices = [_object(c, f"choices[{i}]") for i, c in enumerate(data["choices"])]
    indices = [c.get("index") for c in choices]
    if all(i is None for i in indices):
        return choices
    if not all(_is_int(i) for i in indices) or sorted(indices) != list(range(len(choices))):
        raise MalformedReply(f"choice indices {_show(indices)} are not 0..{len(choices) - 1}")
    return [choices[indices.index(i)] for i in range(len(choices))]


def generation_parts(data: dict, *, chat: bool, n: int) -> tuple[list[str], list[str | None], int, int]:
    """(texts, finish reasons as sent, prompt tokens, completion tokens of all texts) of a
    /completions (`chat=False`) or /chat/completions reply that should hold `n` completions."""
    choices = ordered_choices(data)
    if len(choices) != n:
        raise MalformedReply(f"it holds {len(choices)} choices for n={n} (does the server support n?)")
    texts, reasons = [], []
    for i, choice in enumerate(choices):
        if chat:
            message = _object(choice.get("message"), f"choices[{i}].message")
            text = message.get("content")
            if text is None:  # the API allows it (a refusal, a tool call): no text was produced
                text = ""
            where = f"choices[{i}].message.content"
        else:
            text, where = choice.get("text"), f"choices[{i}].text"
        if not isinstance(text, str):
            raise MalformedReply(f"{where} is {_show(text)}, not a string")
        reason = choice.get("finish_reason")
        if reason is not None and not isinstance(reason, str):
            raise MalformedReply(f"choices[{i}].finish_reason is {_show(reason)}, not a string")
        texts.append(text)
        reasons.append(reason)
    usage = data.get("usage")
    usage = {} if usage is None else _object(usage, "usage")
    return texts, reasons, _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")


def _logprob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedReply(f"{where} is {_show(value)}, not a number")
    value = float(value)
    if math.isnan(value) or value > _LOGPROB_ROUNDING:  # -inf is an exact probability 0
        raise MalformedReply(f"{where} is {_show(value)}, not a log-probability (<= 0)")
    return value


def next_token_logprobs(data: dict, *, chat: bool) -> list[tuple[str, float]]:
    """The first generated position's top tokens (text, logprob) from a one-token reply.

    Completions API: choices[0].logprobs.top_logprobs[0] is {token: logprob}. Chat API:
    choices[0].logprobs.content[0].top_logprobs is [{token, logprob}], where two tokens may
    decode to the same text, so pairs are kept rather than a dict.
    """
    choice = ordered_choices(data)[0]
    logprobs = choice.get("logprobs")
    if logprobs is None:
        raise MalformedReply("choices[0] has no logprobs (does the server support logprobs?)")
    logprobs = _object(logprobs, "choices[0].logprobs")
    if chat:
        where = "choices[0].logprobs.content"
        content = logprobs.get("content")
        if not isinstance(content, list) or not content:
            raise MalformedReply(f"{where} is {_show(content)}, not a non-empty list")
        entries = _object(content[0], f"{where}[0]").get("top_logprobs")
        where += "[0].top_logprobs"
        if not isinstance(entries, list):
            raise MalformedReply(f"{where} is {_show(entries)}, not a list")
        pairs = []
        for j, entry in enumerate(entries):
            entry = _object(entry, f"{where}[{j}]")
            token = entry.get("token")
            if not isinstance(token, str):
                raise MalformedReply(f"{where}[{j}].token is {_show(token)}, not a string")
            pairs.append((token, _logprob(entry.get("logprob"), f"{where}[{j}].logprob")))
    else:
        where = "choices[0].logprobs.top_logprobs"
        positions = logprobs.get("top_logprobs")
        if not isinstance(positions, list) or not positions:
            raise MalformedReply(f"{where} is {_show(positions)}, not a non-empty list")
        top = _object(positions[0], f"{where}[0]")
        pairs = [(token, _logprob(lp, f"{where}[0][{token!r}]")) for token, lp in top.items()]
    if not pairs:
        raise MalformedReply(f"{where} is empty (no top tokens came back)")
    return pairs


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))) without overflow or underflow; -inf for no values."""
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


# -- matching the server's top tokens to the choices -------------------------------------------------

_WORD_MARKERS = " \t\r\n\u2581\u0120"  # whitespace, SentencePiece "▁" and byte-BPE "Ġ" word starts


def match_choices(top: Mapping[str, float] | Iterable[tuple[str, float]], choices: Sequence[str]) -> list[float]:
    """Log-probability of each choice from a server's top-k next tokens (token text -> logprob,
    or (text, logprob) pairs; logprobs already checked to be numbers <= 0 or -inf).

    Servers return token *text*: " Yes", "Yes" and "yes" are different tokens that give the same
    answer, so they are compared with leading/trailing whitespace removed and, when the choices
    stay distinct that way, without case; all variants of a choice add up (in log space). A token
    that is the start of exactly one choice ("(A" for "(A)") counts for it, as the local engines
    read a choice's first token; longer tokens ("10" for "1") and shared starts ("(") count for none.
    """
    stripped = [c.strip(_WORD_MARKERS) for c in choices]
    folded = [c.casefold() for c in stripped]
    fold = len(set(folded)) == len(folded)
    wanted = folded if fold else stripped
    if len(set(wanted)) != len(wanted) or not all(wanted):
        raise CaiError(f"choices {list(choices)} cannot be told apart in a server's token text; use distinct words")
    found: list[list[float]] = [[] for _ in choices]
    for token, logprob in (top.items() if isinstance(top, Mapping) else top):
        text = token.strip(_WORD_MARKERS)
        text = text.casefold() if fold else text
        if not text:
            continue
        if text in wanted:
            index = wanted.index(text)
        else:
            starts = [i for i, w in enumerate(wanted) if w.startswith(text)]
            if len(starts) != 1:
                continue
            index = starts[0]
        found[index].append(logprob)
    return [logsumexp(values) for values in found]
