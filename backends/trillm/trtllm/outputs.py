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


def new_log_probs(entries: list[Any], total: int, new: list[int]) -> list[float]:
    """The log-probs of the ``new`` tokens, the last of the ``total`` tokens streamed so far.

    ``CompletionOutput.logprobs`` holds the log-probs of every token so far
    when they are the runtime's own, but only those of the latest response
    when the LLM API computes them from that response's generation logits;
    either is taken, anything else is an error.
    """
    entries = list(entries)
    if len(entries) >= total:
        entries = entries[total - len(new) :]
    elif len(entries) != len(new):
        raise ValueError(
            f"TensorRT-LLM returned {len(entries)} log-probs for {len(new)} new tokens of {total} so far"
        )
    return chosen_log_probs(entries, new)


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
