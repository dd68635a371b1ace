"""The engine's request/response types: the contract between an engine and its host.

Every engine kind (``torch`` on CPU, ``tensorrt_llm`` on GPU) consumes
:class:`GenerationRequest` and produces a stream of :class:`StepOutput`.
Everything here is token ids; text (stop strings, detokenisation) is the
host's job (``trillm.detokenizer``), so that both engines behave the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached
    END = "end"  # end_id generated (not returned)
    STOP = "stop"  # a stop word matched (decided by the host)
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class SamplingParams:
    """Per-request decoding parameters, already validated by the host."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (multiplicative, HF semantics)
    presence_penalty: float = 0.0  # subtracted once per token seen in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_tokens: int = 0  # every end id (end_id, extra_end_ids) is masked before this many generated tokens
    seed: int | None = None  # same seed + same input = same output
    end_id: int | None = None  # None = never stop on a token
    # More tokens that end generation like end_id (a model's other EOS ids, e.g. Llama 3
    # instruct's <|eot_id|> beside <|end_of_text|>); never returned, masked before min_tokens.
    extra_end_ids: tuple[int, ...] = ()
    # Token sequences that must never be produced: the last token of a
    # sequence is banned when the output so far ends with the rest of it.
    bad_token_seqs: list[list[int]] = field(default_factory=list)
    return_log_probs: bool = False

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Every token that ends generation."""
        return ((self.end_id,) if self.end_id is not None else ()) + self.extra_end_ids

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class StepOutput:
    """One increment of a request's output.

    ``token_ids`` are the tokens new since the previous StepOutput (possibly
    empty on the final one); ``log_probs`` are their log-probabilities under
    the sampling distribution after penalties (the model's softmax for
    greedy), present when requested. The last StepOutput of a request has
    ``finished=True`` and a ``finish_reason``; ``error`` carries the message
    when finish_reason is ERROR. The end_id token is never included.
    """

    request_id: str
    token_ids: list[int]
    log_probs: list[float] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
