"""Chat messages -> the prompt text a model sees.

Through the tokenizer's own chat template where it has one (the model was trained on that
format); otherwise the "Human:/Assistant:" transcript style base models know from pretraining.
An `assistant_prefix` is appended after the generation prompt, pre-filling the reply.
"""

from __future__ import annotations

from typing import Sequence

from cai.errors import CaiError

Messages = Sequence[dict]
_PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def render(tokenizer, messages: Messages, assistant_prefix: str = "") -> str:
    _check(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    else:
        text = render_plain(messages)
    return text + assistant_prefix


def render_plain(messages: Messages) -> str:
    parts = [f"\n\n{_PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "".join(parts) + "\n\nAssistant:"


def _check(messages: Messages) -> None:
    if not messages:
        raise CaiError("a conversation needs at least one message")
    for index, message in enumerate(messages):
        if message.get("role") not in _PLAIN_ROLES or not isinstance(message.get("content"), str):
            raise CaiError(f"message {index} needs a role (user/assistant/system) and text content")
