"""OpenAI's response bodies: whole answers and server-sent-event chunks, for chat and completions.

Finish reasons: the pipeline's ``length`` stays ``length``; ``stop`` (a stop
sequence) and ``end`` (the end token) are both OpenAI's ``stop``. Usage:
prompt tokens are the pipeline's ``num_input_tokens`` (once per prompt, not
per choice: the chat template's tokens included), completion tokens the sum
of every choice's ``num_output_tokens``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from trillm_client import Completion

from trillm.openai.protocol import APIError

DONE = b"data: [DONE]\n\n"


def finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(error: APIError) -> bytes:
    """A failure after the stream began: OpenAI's clients raise it from the ``error`` event."""
    return sse(error.body())


class Renderer:
    """One response's id, timestamps and shapes; subclasses give chat's or completions' fields."""

    object_whole = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, model: str, fingerprint: str = "") -> None:
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if self.fingerprint:
            body["system_fingerprint"] = self.fingerprint
        return body

    def whole(self, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._envelope(self.object_whole, choices), "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool) -> bytes:
        body = self._envelope(self.object_chunk, choices)
        if with_usage:
            body["usage"] = None  # OpenAI's clients expect the key on every chunk when usage is asked for
        return sse(body)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self._envelope(self.object_chunk, []), "usage": usage(prompt_tokens, completion_tokens)})

    # -- per kind ------------------------------------------------------------
    def choice(self, index: int, completion: Completion, tokens: list[str] | None,
               log_probs: list[float] | None) -> dict[str, Any]:
        raise NotImplementedError

    def start(self, index: int) -> dict[str, Any] | None:
        """The chunk choice that opens choice ``index`` (chat: the role), or None."""
        return None

    def delta(self, index: int, text: str, tokens: list[str] | None, log_probs: list[float] | None,
              offset: int) -> dict[str, Any]:
        raise NotImplementedError

    def end(self, index: int, reason: str) -> dict[str, Any]:
        raise NotImplementedError


class ChatRenderer(Renderer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    @staticmethod
    def _logprobs(tokens: list[str] | None, log_probs: list[float] | None) -> dict[str, Any] | None:
        if tokens is None or log_probs is None:
            return None
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in zip(tokens, log_probs)], "refusal": None}

    def choice(self, index, completion, tokens, log_probs):
        return {"index": index, "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": self._logprobs(tokens, log_probs), "finish_reason": finish_reason(completion)}

    def start(self, index):
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, index, text, tokens, log_probs, offset):
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(tokens, log_probs),
                "finish_reason": None}

    def end(self, index, reason):
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}


class CompletionRenderer(Renderer):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    @staticmethod
    def _logprobs(tokens: list[str] | None, log_probs: list[float] | None, offset: int) -> dict[str, Any] | None:
        if tokens is None or log_probs is None:
            return None
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": log_probs, "top_logprobs": None, "text_offset": offsets}

    def choice(self, index, completion, tokens, log_probs):
        return {"index": index, "text": completion.text, "logprobs": self._logprobs(tokens, log_probs, 0),
                "finish_reason": finish_reason(completion)}

    def delta(self, index, text, tokens, log_probs, offset):
        return {"index": index, "text": text, "logprobs": self._logprobs(tokens, log_probs, offset),
                "finish_reason": None}

    def end(self, index, reason):
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
