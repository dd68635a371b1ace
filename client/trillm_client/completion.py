"""What a request returns, and how its responses add up to it."""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from itertools import pairwise

from trillm_client.params import Request
from trillm_client.wire import Response

FINISH_REASONS = ("length", "stop", "end")


@dataclass
class Sequence:
    """One generated sequence (``num_return_sequences`` > 1 gives several)."""

    text: str = ""
    num_output_tokens: int | None = None
    finish_reason: str | None = None
    cum_log_probs: float | None = None
    output_log_probs: list[float] | None = None


@dataclass
class Completion:
    """The result of one request.

    The top-level fields are those of the first sequence; ``sequences`` holds
    every sequence in ``sequence_index`` order (``sequences[0]`` included).

    - ``finish_reason``: ``"length"`` (max_tokens reached), ``"stop"`` (a stop
      word) or ``"end"`` (end_id). The server's ``finish_reason`` output when
      it sends one; otherwise inferred: ``"length"`` when num_output_tokens
      reached max_tokens, else ``"stop"`` if stop words were given, else ``"end"``.
    - ``cum_log_probs`` / ``output_log_probs``: only with ``return_log_probs=True``.
    - ``model_version``: the version that served the request (from the response).
    - ``latency``: seconds from sending the request to its last response.
    """

    text: str
    num_input_tokens: int | None
    num_output_tokens: int | None
    finish_reason: str | None
    cum_log_probs: float | None
    output_log_probs: list[float] | None
    model_version: str
    latency: float
    sequences: list[Sequence] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the server's model repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


class _SequenceState:
    def __init__(self) -> None:
        self.sequence = Sequence()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_text(self, text: str | bytes) -> str:
        delta = self.decoder.decode(text) if isinstance(text, bytes) else text
        self.sequence.text += delta
        return delta

    def flush(self) -> str:
        return self.add_text(self.decoder.decode(b"", final=True))


class CompletionBuilder:
    """Adds up the responses of one request into a :class:`Completion`.

    Values that the server reports cumulatively (token counts, log probs) are
    taken from the latest response that carries them; text is concatenated.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.num_input_tokens: int | None = None
        self.model_version = ""
        self._sequences: dict[int, _SequenceState] = {}

    def _state(self, index: int) -> _SequenceState:
        if index not in self._sequences:
            self._sequences[index] = _SequenceState()
        return self._sequences[index]

    def add(self, response: Response) -> str:
        """Takes one response; returns the text it adds to its sequence."""
        state = self._state(response.sequence_index)
        sequence = state.sequence
        if response.model_version:
            self.model_version = response.model_version
        if response.num_input_tokens is not None:
            self.num_input_tokens = response.num_input_tokens
        if response.num_output_tokens is not None:
            sequence.num_output_tokens = response.num_output_tokens
        if response.finish_reason:
            sequence.finish_reason = response.finish_reason
        if self.request.return_log_probs:
            if response.cum_log_probs is not None:
                sequence.cum_log_probs = response.cum_log_probs
            if response.output_log_probs:
                sequence.output_log_probs = response.output_log_probs
        return state.add_text(response.text) if response.text is not None else ""

    def flush(self) -> str:
        """Text held back by the UTF-8 decoder of the first sequence (normally "")."""
        return self._state(0).flush()

    def _finish_reason(self, sequence: Sequence) -> str | None:
        if sequence.finish_reason:
            return sequence.finish_reason
        if sequence.num_output_tokens is None:
            return None
        if sequence.num_output_tokens >= self.request.max_tokens:
            return "length"
        return "stop" if self.request.stop_words else "end"

    def build(self, latency: float) -> Completion:
        self._state(0)
        for state in self._sequences.values():
            state.flush()
        sequences = [self._sequences[i].sequence for i in sorted(self._sequences)]
        for sequence in sequences:
            sequence.finish_reason = self._finish_reason(sequence)
        first = sequences[0]
        return Completion(
            text=first.text,
            num_input_tokens=self.num_input_tokens,
            num_output_tokens=first.num_output_tokens,
            finish_reason=first.finish_reason,
            cum_log_probs=first.cum_log_probs,
            output_log_probs=first.output_log_probs,
            model_version=self.model_version,
            latency=latency,
            sequences=sequences,
        )


class StreamProgress:
    """The bookkeeping TextStream and AsyncTextStream share: deltas, their
    arrival times and the completion at the end.

    ``token_times``: seconds from sending to the arrival of each response
    that carried text; ``ttft`` the first of them; ``itl`` the gaps between them.
    """

    def __init__(self, builder: CompletionBuilder, started: float) -> None:
        self._builder = builder
        self._started = started  # time.perf_counter() when the request was sent
        self.completion: Completion | None = None
        self.token_times: list[float] = []

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in pairwise(self.token_times)]

    @property
    def received(self) -> Sequence:
        """The streamed sequence so far: its text, and the ``num_output_tokens`` and
        ``output_log_probs`` of the latest response that carried them (live: it grows)."""
        return self._builder._state(0).sequence

    def _sent(self) -> None:
        self._started = time.perf_counter()

    def _take(self, response: Response) -> str:
        """The text ``response`` adds to the first sequence ("" for none)."""
        delta = self._builder.add(response)
        if not delta or response.sequence_index:
            return ""
        self.token_times.append(time.perf_counter() - self._started)
        return delta

    def _finish(self) -> str:
        """Builds the completion; returns any text the UTF-8 decoder still held."""
        tail = self._builder.flush()
        elapsed = time.perf_counter() - self._started
        if tail:
            self.token_times.append(elapsed)
        self.completion = self._builder.build(latency=elapsed)
        return tail
