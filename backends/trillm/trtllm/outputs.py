"""TensorRT-LLM's streamed ``CompletionOutput`` as our StepOutput pieces.

Pure functions over plain values, so the mapping is tested without a GPU.
"""

from __future__ import annotations

from typing import Any

from trillm.engine.types import FinishReason

# CompletionOutput.finish_reason -> ours. "stop" is end_id: the host matches
# stop words itself, so TensorRT-LLM is never given any.
_REASONS = {
    "length": FinishReason.LENGTH,
    "stop": FinishReason.END,
    "cancelled": FinishReason.CANCELLED,
}


def finish_reason(trt_reason: str | None) -> tuple[FinishReason, str | None]:
    """Our finish reason (and error message, for ERROR) for TensorRT-LLM's."""
    reason = _REASONS.get(trt_reason or "")
    if reason is not None:
        return reason, None
    if trt_reason == "timeout":
        return FinishReason.ERROR, "TensorRT-LLM timed the request out"
    return FinishReason.ERROR, f"TensorRT-LLM finished the request with an unknown reason {trt_reason!r}"


def chosen_log_probs(entries: list[Any], token_ids: list[int]) -> list[float]:
    """The log-prob of each chosen token.

    An entry is a float (the runtime's own log-prob of the sampled token) or
    a ``{token_id: Logprob | float}`` dict of the top-k, which always holds
    the sampled token.
    """
    if len(entries) < len(token_ids):
        raise ValueError(f"TensorRT-LLM returned {len(entries)} log-probs for {len(token_ids)} tokens")
    values = []
    for entry, token in zip(entries[: len(token_ids)], token_ids, strict=True):
        if isinstance(entry, dict):
            if token not in entry:
                raise ValueError(f"TensorRT-LLM's log-probs lack the chosen token {token}")
            entry = entry[token]
        values.append(float(getattr(entry, "logprob", entry)))
    return values
