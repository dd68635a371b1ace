"""The engine host: turns validated requests into engine work and responses.

Independent of Triton (the ``tensorrt_llm`` model wraps it), so it is unit
tested with a real engine and no server. One responder thread turns engine
outputs into :class:`HostResponse` objects: it detokenises incrementally,
matches stop words on text, and decides what each response carries. The
engine's own loop thread never waits on it.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from trillm.detokenizer import TextStream, decode_delta
from trillm.engine.types import FinishReason, GenerationRequest, SamplingParams, StepOutput
from trillm.triton.errors import InputError, ServerUnavailable

MAX_RETURN_SEQUENCES = 16
SHUTTING_DOWN = "server shutting down"


class Engine(Protocol):
    """What the host needs of an engine (trillm.engine.TorchEngine, or the TensorRT-LLM one)."""

    max_model_len: int
    vocab_size: int

    def submit(self, request: GenerationRequest, on_output: Callable[[StepOutput], None]) -> None: ...
    def cancel(self, request_id: str) -> None: ...
    def stats(self) -> dict: ...
    def shutdown(self) -> None: ...


@dataclass
class HostRequest:
    """One prompt (one batch row of a Triton request), named by user-facing inputs."""

    input_ids: list[int]
    max_tokens: int
    streaming: bool = False
    exclude_input: bool = True
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    end_id: int | None = None
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 0.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    seed: int | None = None
    beam_width: int = 1
    num_return_sequences: int = 1
    return_log_probs: bool = False

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        if not self.input_ids:
            raise InputError("text_input", "must not be empty (no input_ids)")
        if any(not 0 <= t < vocab_size for t in self.input_ids):
            raise InputError("input_ids", f"every id must be in [0, {vocab_size})")
        if self.max_tokens <= 0:
            raise InputError("max_tokens", f"must be > 0, got {self.max_tokens}")
        if len(self.input_ids) + self.max_tokens > max_model_len:
            raise InputError(
                "max_tokens",
                f"prompt ({len(self.input_ids)} tokens) + max_tokens ({self.max_tokens}) exceeds "
                f"the context window of {max_model_len} tokens",
            )
        for name in ("top_p", "temperature", "length_penalty", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(name, "must be a finite number")
        if self.top_k < 0:
            raise InputError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.temperature < 0.0:
            raise InputError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.repetition_penalty <= 0.0:
            raise InputError("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise InputError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.beam_width != 1:
            raise InputError("beam_width", f"only 1 (sampling/greedy) is supported, got {self.beam_width}")
        if not 1 <= self.num_return_sequences <= MAX_RETURN_SEQUENCES:
            raise InputError(
                "num_return_sequences", f"must be in [1, {MAX_RETURN_SEQUENCES}], got {self.num_return_sequences}"
            )
        if self.end_id is not None and not 0 <= self.end_id < vocab_size:
            raise InputError("end_id", f"must be a token id in [0, {vocab_size}), got {self.end_id}")

    def sampling(self, index: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            # Sequence i of a request is seeded seed+i: n samples differ, a rerun repeats them.
            seed=None if self.seed is None else self.seed + index,
            end_id=self.end_id,
            bad_token_seqs=self.bad_words,
            return_log_probs=self.return_log_probs,
        )


@dataclass
class HostResponse:
    """What one response to the client carries (tensor values, before Triton)."""

    output_ids: list[int]  # the window the text is rendered from
    prefix_length: int  # leading ids of output_ids that were rendered before
    text_length: int  # characters of the rendered text to keep; -1 = all
    text: str  # the text this response carries (what postprocessing will render)
    cum_log_prob: float
    output_log_probs: list[float]
    batch_index: int
    sequence_index: int
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str  # "" until the sequence's last response
    final: bool  # the last response of the whole Triton request
    error: str | None = None
    unavailable: bool = False  # the error is a server fault (UNAVAILABLE), not the request's


@dataclass
class _Sequence:
    """State of one generated sequence (row ``batch_index``, sample ``sequence_index``)."""

    request_id: str
    call: "_Call"
    row: HostRequest
    batch_index: int
    sequence_index: int
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    done: bool = False
    arrived: float = 0.0
    last_token_at: float = 0.0


@dataclass
class _Call:
    """One Triton request: its sequences and where its responses go."""

    send: Callable[[HostResponse], None]
    is_cancelled: Callable[[], bool]
    sequences: list[_Sequence] = field(default_factory=list)
    open: int = 0
    cancelled: bool = False
    keys: tuple[str, ...] = ()  # names a stop request can cancel this call by
    abort_error: str | None = None  # set when the server ends the call (shutdown): its final response's error


# How often the clients' cancellation flags are polled. Each poll of a call is a round trip to
# tritonserver; at 20 ms the polls of 32 streams took 4.7% of the engine process's samples
# (py-spy), and 100 ms served 337 -> 353 tok/s at 32 streams (bench-peers, one run each).
CANCEL_POLL_S = 0.1


class GenerationHost:
    """Owns an engine; submits requests and turns their outputs into responses.

    ``observe`` (optional) is told about latencies: ``observe("ttft", seconds)``,
    ``observe("itl", seconds)``, ``observe("finished", reason)``.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        skip_special_tokens: bool = True,
        observe: Callable[[str, object], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._observer = observe
        self._ids = itertools.count()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: list[_Call] = []
        self._by_key: dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._drain_deadline: float | None = None  # time.monotonic() after which calls in flight are ended
        self._responder = threading.Thread(target=self._respond_loop, name="trillm-responder", daemon=True)
        self._responder.start()
        self._watcher = threading.Thread(target=self._watch_cancellation, name="trillm-cancel", daemon=True)
        self._watcher.start()

    def _sampling(self, seq) -> SamplingParams:
        """The row's parameters; an end_id that is one of the model's EOS ids stands for all of them.

        Chat models end a turn with a different token than a document
        (Llama 3 instruct: ``<|eot_id|>`` and ``<|end_of_text|>``), and the
        end_id a client sends (preprocessing's default is the first) names
        only one.
        """
        params = seq.row.sampling(seq.sequence_index)
        eos_ids = self.tokenizer.eos_ids
        if params.end_id is not None and params.end_id in eos_ids:
            params = replace(params, extra_end_ids=tuple(e for e in eos_ids if e != params.end_id))
        return params

    def observe(self, kind: str, value: object) -> None:
        """Report to the metrics observer; a metrics failure never fails a request."""
        if self._observer is not None:
            try:
                self._observer(kind, value)
            except Exception:
                pass

    # -- request side ------------------------------------------------------
    def start(
        self,
        rows: list[HostRequest],
        send: Callable[[HostResponse], None],
        is_cancelled: Callable[[], bool] = lambda: False,
        keys: tuple[str, ...] = (),
    ) -> None:
        """Validate every row, then submit them all. Raises InputError before
        anything is submitted, so a bad row fails the whole call cleanly.
        ``keys`` name the call for :meth:`cancel_key`."""
        if self._drain_deadline is not None or self._stopping.is_set():
            raise ServerUnavailable(SHUTTING_DOWN + ": not accepting new requests")
        for row in rows:
            row.validate(self.engine.vocab_size, self.engine.max_model_len)
        call = _Call(send=send, is_cancelled=is_cancelled, keys=tuple(k for k in keys if k))
        now = time.monotonic()
        stops = None
        for b, row in enumerate(rows):
            stops = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in row.stop_words]
            for i in range(row.num_return_sequences):
                seq = _Sequence(
                    request_id=f"req-{next(self._ids)}",
                    call=call,
                    row=row,
                    batch_index=b,
                    sequence_index=i,
                    text=TextStream(self.tokenizer, row.input_ids, stops, self.skip_special_tokens),
                    arrived=now,
                )
                call.sequences.append(seq)
        call.open = len(call.sequences)
        with self._lock:
            self._calls.append(call)
            for key in call.keys:
                self._by_key.setdefault(key, call)
        submitted = []
        try:
            for seq in call.sequences:
                self.engine.submit(
                    GenerationRequest(seq.request_id, seq.row.input_ids, self._sampling(seq)),
                    lambda out, seq=seq: self._queue.put((seq, out)),
                )
                submitted.append(seq)
        except ValueError as exc:
            for seq in submitted:
                self.engine.cancel(seq.request_id)
            self._forget(call)
            if isinstance(exc, InputError):  # the engine named the input itself
                raise
            raise InputError("text_input", str(exc)) from exc

    def cancel_key(self, key: str) -> bool:
        """Cancel the call started with ``key`` (a stop request); False if none is running."""
        with self._lock:
            call = self._by_key.get(key)
        if call is None:
            return False
        self._cancel(call)
        return True

    def _cancel(self, call: _Call) -> None:
        call.cancelled = True
        for seq in call.sequences:
            self.engine.cancel(seq.request_id)

    def _forget(self, call: _Call) -> None:
        with self._lock:
            if call in self._calls:
                self._calls.remove(call)
            for key in call.keys:
                if self._by_key.get(key) is call:
                    del self._by_key[key]

    def drain(self, timeout: float) -> None:
        """Refuse new calls from now on; calls still running after ``timeout`` seconds end
        with a "server shutting down" error."""
        deadline = time.monotonic() + max(0.0, timeout)
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline

    @property
    def num_calls(self) -> int:
        with self._lock:
            return len(self._calls)

    def abort_all(self, error: str) -> None:
        """End every call in flight with ``error`` (UNAVAILABLE): the server, not the request, failed."""
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.abort_error = error
            self._cancel(call)

    def shutdown(self) -> None:
        """Stop; calls still in flight end with a "server shutting down" error, never silently."""
        self._stopping.set()
        self.abort_all(SHUTTING_DOWN + ": the model is being unloaded")
        self.engine.shutdown()
        self._queue.put(None)
        self._responder.join(timeout=10)

    # -- responder thread --------------------------------------------------
    def _respond_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            seq, out = item
            try:
                self._on_output(seq, out)
            except Exception as exc:  # one request's bug must not stop the others
                self.engine.cancel(seq.request_id)
                self._finish(seq, FinishReason.ERROR, error=f"internal error: {exc!r}")

    def _on_output(self, seq: _Sequence, out: StepOutput) -> None:
        if seq.done:
            return
        now = time.monotonic()
        if out.token_ids:
            self.observe("ttft" if not seq.tokens else "itl", now - (seq.last_token_at or seq.arrived))
            seq.last_token_at = now
            seq.tokens.extend(out.token_ids)
            seq.log_probs.extend(out.log_probs or [0.0] * len(out.token_ids))
            delta = seq.text.add(out.token_ids)
            if seq.text.stopped:
                self.engine.cancel(seq.request_id)
                self._finish(seq, FinishReason.STOP, last=delta)
                return
            if seq.row.streaming and delta is not None and delta.text:
                self._emit(seq, delta, finish_reason="", final=False)
        if out.finished:
            reason = out.finish_reason or FinishReason.LENGTH
            self._finish(seq, reason, error=out.error, last=None)

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None, last=None) -> None:
        seq.done = True
        call = seq.call
        call.open -= 1
        final = call.open == 0
        self.observe("finished", reason.value)
        if final:
            self._forget(call)
        if call.cancelled:
            if final:
                response = self._empty(seq, reason, final=True)
                if call.abort_error is not None:
                    response.error, response.unavailable = call.abort_error, True
                call.send(response)
            return
        if reason is FinishReason.ERROR:
            response = self._empty(seq, reason, final=final)
            response.error = error or "generation failed"
            call.send(response)
            return
        if seq.row.streaming:
            tail = seq.text.finish()
            pieces = [d for d in (last, tail) if d is not None and d.text]
            if not pieces:
                call.send(self._empty(seq, reason, final=final))
            for k, piece in enumerate(pieces):
                is_last = k == len(pieces) - 1
                self._emit(seq, piece, finish_reason=reason.value if is_last else "", final=final and is_last)
        else:
            seq.text.finish()
            call.send(self._whole(seq, reason, final))

    def _kept(self, seq: _Sequence) -> int:
        return min(seq.text.num_tokens_kept, len(seq.tokens))

    def _emit(self, seq: _Sequence, delta, finish_reason: str, final: bool) -> None:
        kept = self._kept(seq)
        seq.call.send(
            HostResponse(
                output_ids=list(delta.window_ids),
                prefix_length=delta.prefix_len,
                text_length=self._text_length(delta.window_ids, delta.prefix_len, delta.text),
                text=delta.text,
                cum_log_prob=float(sum(seq.log_probs[:kept])),
                output_log_probs=list(seq.log_probs[:kept]) if seq.row.return_log_probs else [],
                batch_index=seq.batch_index,
                sequence_index=seq.sequence_index,
                num_input_tokens=len(seq.row.input_ids),
                num_output_tokens=kept,
                finish_reason=finish_reason,
                final=final,
            )
        )

    def _text_length(self, window: list[int], prefix_len: int, text: str) -> int:
        """-1 when the window renders exactly ``text``; else how much of it to keep
        (a stop word that starts inside a token)."""
        rendered = decode_delta(self.tokenizer, list(window), prefix_len, self.skip_special_tokens)
        if rendered == text or not rendered.startswith(text):
            # Not a prefix only when echoing a prompt whose decode differs from
            # its text (a normalising tokenizer): the rendering is authoritative.
            return -1
        return len(text)

    def _whole(self, seq: _Sequence, reason: FinishReason, final: bool) -> HostResponse:
        kept = self._kept(seq)
        generated = seq.tokens[:kept]
        text = seq.text.text
        if seq.row.exclude_input:
            context = seq.text.context_ids
            window, prefix = list(context) + generated, len(context)
        else:
            window, prefix = list(seq.row.input_ids) + generated, 0
            text = decode_delta(self.tokenizer, list(seq.row.input_ids), 0, self.skip_special_tokens) + text
        return HostResponse(
            output_ids=window,
            prefix_length=prefix,
            text_length=self._text_length(window, prefix, text),
            text=text,
            cum_log_prob=float(sum(seq.log_probs[:kept])),
            output_log_probs=list(seq.log_probs[:kept]) if seq.row.return_log_probs else [],
            batch_index=seq.batch_index,
            sequence_index=seq.sequence_index,
            num_input_tokens=len(seq.row.input_ids),
            num_output_tokens=kept,
            finish_reason=reason.value,
            final=final,
        )

    def _empty(self, seq: _Sequence, reason: FinishReason, final: bool) -> HostResponse:
        kept = self._kept(seq)
        return HostResponse(
            output_ids=[],
            prefix_length=0,
            text_length=-1,
            text="",
            cum_log_prob=float(sum(seq.log_probs[:kept])),
            output_log_probs=[],
            batch_index=seq.batch_index,
            sequence_index=seq.sequence_index,
            num_input_tokens=len(seq.row.input_ids),
            num_output_tokens=kept,
            finish_reason=reason.value,
            final=final,
        )

    # -- cancellation ------------------------------------------------------
    def _watch_cancellation(self, period: float = CANCEL_POLL_S) -> None:
        """Poll the clients' cancellation flags every ``period`` seconds; a cancelled
        call's sequences are dropped by the engine within one step of being seen."""
        while not self._stopping.wait(period):
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self.abort_all(SHUTTING_DOWN + ": the request did not finish within the drain timeout")
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                if call.cancelled:
                    continue
                try:
                    cancelled = call.is_cancelled()
                except Exception:
                    cancelled = False
                if cancelled:
                    self._cancel(call)
