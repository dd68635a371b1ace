"""Chat requests: a JSON list of messages rendered with the checkpoint's own chat template.

The template is the checkpoint's (``chat_template`` in tokenizer_config.json or
chat_template.jinja, read by :mod:`trillm.tokenizer`, which renders it as
transformers' ``apply_chat_template`` does). This module checks what a client
sends, renders it with the generation prompt added, and finds the token that
ends an assistant turn (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), so
that generation stops there even when the checkpoint's EOS ids do not list it.

The rendered prompt is encoded with ``add_special_tokens=False``, as
transformers does: a template that wants BOS writes ``{{ bos_token }}`` itself,
and adding it again would give two.
"""

from __future__ import annotations

import json
from typing import Any, Protocol


class ChatError(ValueError):
    """The messages, or the template rendering them, broke a rule; the message says which."""


class ChatTokenizer(Protocol):
    """What this module needs of :class:`trillm.tokenizer.Tokenizer`."""

    chat_template: str | None
    backend: Any

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str: ...


# A message a chat template is asked to render: both keys, string values. More
# keys (e.g. "name") are passed through for templates that use them.
REQUIRED_KEYS = ("role", "content")
# Assistant text that no template changes, to find what follows an assistant turn.
_PROBE = "trillm end of turn probe"


def parse_messages(raw: str) -> list[dict[str, Any]]:
    """The messages of a ``messages`` input: a JSON list of {"role": str, "content": str} objects."""
    try:
        messages = json.loads(raw)
    except ValueError as exc:
        raise ChatError(f"must be a JSON list of {{\"role\", \"content\"}} objects; not valid JSON ({exc})") from None
    if not isinstance(messages, list) or not messages:
        raise ChatError(
            f"must be a non-empty JSON list of {{\"role\", \"content\"}} objects, got {type(messages).__name__}"
            + (" (empty)" if messages == [] else "")
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"message {i} must be an object with \"role\" and \"content\", got {type(message).__name__}")
        for key in REQUIRED_KEYS:
            if key not in message:
                raise ChatError(f"message {i} has no \"{key}\"")
            if not isinstance(message[key], str):
                raise ChatError(f"message {i}: \"{key}\" must be a string, got {type(message[key]).__name__}")
    return messages


def render_prompt(tokenizer: ChatTokenizer, messages: list[dict[str, Any]]) -> str:
    """The prompt text of ``messages`` for the next assistant turn (the generation prompt added)."""
    if not tokenizer.chat_template:
        raise ChatError(
            "this model has no chat template (no 'chat_template' in its tokenizer_config.json and no "
            "chat_template.jinja); send the prompt as text_input instead"
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # raise_exception() in the template, or the template failing on this input
        raise ChatError(f"the model's chat template failed to render them: {exc}") from None


def end_of_turn_id(tokenizer: ChatTokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's text, or None.

    Renders user, assistant, user (a conversation every template accepts, and
    in which the assistant turn is closed) and takes the first token after the
    assistant's text when it is a special token: ``<|im_end|>`` in ChatML,
    ``<|eot_id|>`` in Llama 3, ``</s>`` in Zephyr's template.
    """
    if not tokenizer.chat_template:
        return None
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _PROBE},
        {"role": "user", "content": "Thanks"},
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=False)
    except Exception:  # a template with other rules; requests will report them
        return None
    _, found, after = text.partition(_PROBE)
    ids = tokenizer.backend.encode(after.lstrip(), add_special_tokens=False).ids if found else []
    if not ids:
        return None
    added = tokenizer.backend.get_added_tokens_decoder().get(ids[0])
    return ids[0] if added is not None and added.special else None
