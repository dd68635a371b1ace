"""One request's state inside the engine: its tokens, KV blocks and pending output."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

from trillm.engine.types import GenerationRequest, SamplingParams, StepOutput


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # admitted: holds KV blocks, prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    on_output: Callable[[StepOutput], None]
    generator: torch.Generator | None  # per-request sampling RNG (None for greedy)
    token_ids: list[int] = field(default_factory=list)  # prompt, then generated tokens
    num_prompt_tokens: int = 0
    # Tokens whose K/V are in the cache. The tokens after it are computed by
    # the next scheduled chunks; the last token of a decoding sequence is
    # always uncomputed (it is the next step's input).
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hashes of the leading full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    admitted_at: int = -1  # scheduler's admission counter; the newest running sequence is preempted first
    ever_admitted: bool = False
    # Output not yet handed to on_output.
    pending_ids: list[int] = field(default_factory=list)
    pending_log_probs: list[float] = field(default_factory=list)

    @classmethod
    def create(cls, request: GenerationRequest, on_output: Callable[[StepOutput], None]) -> Sequence:
        params = request.params
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        prompt = [int(t) for t in request.prompt_ids]
        return cls(request=request, on_output=on_output, generator=generator,
                   token_ids=prompt, num_prompt_tokens=len(prompt))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def append_token(self, token_id: int, log_prob: float | None) -> None:
        self.token_ids.append(token_id)
        self.pending_ids.append(token_id)
        if log_prob is not None:
            self.pending_log_probs.append(log_prob)

    def take_output(self) -> tuple[list[int], list[float] | None]:
        """The tokens (and log-probs, when asked for) produced since the last call."""
        ids, self.pending_ids = self.pending_ids, []
        log_probs, self.pending_log_probs = self.pending_log_probs, []
        return ids, (log_probs if self.params.return_log_probs else None)
