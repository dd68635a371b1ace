"""TrtLlmEngine: the host's Engine (trillm.host.Engine) on TensorRT-LLM's LLM API.

TensorRT-LLM does the in-flight batching and the paged KV cache; this class
only translates. One asyncio event loop, in one thread the engine owns, runs
every request: ``LLM.generate_async(..., streaming=True)`` is called on it
(TensorRT-LLM binds a result's async queue to the loop it is created on) and
one task per request turns the streamed ``RequestOutput`` into StepOutputs.
Request threads only schedule work on the loop; ``on_output`` is called from
the loop thread and must not block.

Each request gets exactly one ``finished=True`` StepOutput:
LENGTH, END (end_id, never included), CANCELLED (sent as soon as ``cancel``
reaches the loop; the TensorRT-LLM request is aborted, and its own CANCELLED,
which comes later, is not waited for) or ERROR (message).

Failures, as TensorRT-LLM reports them: a request it refuses at submission
(``RequestError``, e.g. a sampling value its runtime rejects) or one that
fails while streaming (``RequestError`` raised from the result stream, or
outputs we cannot map) ends that request with ERROR and the engine carries
on. Any other exception from a stream means the executor has shut itself
down: every request in flight, and every later one, ends with ERROR naming it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from trillm.engine.types import FinishReason, GenerationRequest, StepOutput
from trillm.trtllm.config import TrtLlmConfig
from trillm.trtllm.outputs import finish_reason, new_log_probs
from trillm.trtllm.runtime import TrtLlmApi, load_api
from trillm.trtllm.sampling import make_sampling_params

log = logging.getLogger(__name__)

SUBMIT_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0


@dataclass
class _Stream:
    """One request in flight."""

    request: GenerationRequest
    on_output: Callable[[StepOutput], None]
    result: Any  # tensorrt_llm RequestOutput
    task: asyncio.Task | None = None
    sent: int = 0  # tokens of outputs[0].token_ids already passed on
    done: bool = False


class TrtLlmEngine:
    def __init__(self, config: TrtLlmConfig, api: TrtLlmApi | None = None) -> None:
        self.config = config
        self.max_model_len = config.max_model_len
        self.max_input_len = config.max_input_len
        self.vocab_size = config.vocab_size
        self._api = api or load_api()
        self._llm = self._api.LLM(**config.llm_kwargs(self._api.KvCacheConfig))
        self._seeds = random.Random()
        self._streams: dict[str, _Stream] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._closed = False
        self._failure: str | None = None  # why the executor stopped, once it has
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trillm-trtllm-loop", daemon=True)
        self._thread.start()

    # -- Engine protocol ---------------------------------------------------
    def submit(self, request: GenerationRequest, on_output: Callable[[StepOutput], None]) -> None:
        """Start a request. Raises ValueError when its input breaks a rule of
        this engine (a prompt longer than it takes, a parameter this
        TensorRT-LLM cannot honour); every other failure arrives as ERROR."""
        if self._closed:
            raise RuntimeError("the TensorRT-LLM engine is shut down")
        future = asyncio.run_coroutine_threadsafe(self._start(request, on_output), self._loop)
        future.result(timeout=SUBMIT_TIMEOUT_S)

    def cancel(self, request_id: str) -> None:
        if self._closed:
            return  # shutdown has cancelled everything
        try:
            self._loop.call_soon_threadsafe(self._abort, request_id)
        except RuntimeError:  # the loop closed while we were called: same as above
            pass

    def stats(self) -> dict:
        return {
            "engine": "tensorrt_llm",
            "running": len(self._streams),
            "prompt_tokens_total": self._prompt_tokens,
            "generation_tokens_total": self._generation_tokens,
        }

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop).result(timeout=SHUTDOWN_TIMEOUT_S)
        try:
            self._llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=SHUTDOWN_TIMEOUT_S)
            self._loop.close()

    # -- on the loop thread ------------------------------------------------
    async def _start(self, request: GenerationRequest, on_output: Callable[[StepOutput], None]) -> None:
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already running")
        prompt = list(request.prompt_ids)
        if len(prompt) > self.max_input_len:
            # The runtime would fail it later, from inside the stream, as if the server were at fault.
            raise ValueError(
                f"prompt is {len(prompt)} tokens, more than this TensorRT-LLM engine takes ({self.max_input_len}: "
                "its max_input_len, and max_num_tokens without chunked prefill)"
            )
        trt_params = make_sampling_params(self._api.SamplingParams, request.params, len(prompt),
                                          self._seeds.getrandbits(64))
        if self._failure is not None:
            self._error(request.request_id, on_output, self._failure)
            return
        try:
            result = self._llm.generate_async(prompt, sampling_params=trt_params, streaming=True)
        except ValueError:  # refused (e.g. longer than the engine allows): the host's input error
            raise
        except Exception as exc:  # RequestError (refused by the runtime) or a broken runtime: this request fails
            self._error(request.request_id, on_output, f"TensorRT-LLM: {exc}")
            return
        stream = _Stream(request=request, on_output=on_output, result=result)
        self._streams[request.request_id] = stream
        self._prompt_tokens += len(request.prompt_ids)
        stream.task = self._loop.create_task(self._consume(stream))

    async def _consume(self, stream: _Stream) -> None:
        try:
            async for output in stream.result:
                completion = output.outputs[0]
                tokens = list(completion.token_ids)
                new = tokens[stream.sent :]
                log_probs = None
                if stream.request.params.return_log_probs and new:
                    log_probs = new_log_probs(completion.logprobs, len(tokens), new)
                stream.sent = len(tokens)
                if output.finished:
                    reason, error = finish_reason(completion.finish_reason)
                    end_ids = stream.request.params.end_ids
                    if reason is FinishReason.END and new and new[-1] in end_ids:
                        new, log_probs = new[:-1], None if log_probs is None else log_probs[:-1]
                    self._finish(stream, new, log_probs, reason, error)
                    return
                if new:
                    self._emit(stream, StepOutput(stream.request.request_id, new, log_probs))
            self._finish(stream, [], None, FinishReason.ERROR, "TensorRT-LLM ended the stream without finishing it")
        except asyncio.CancelledError:
            pass  # cancelled by _abort or _fail_all, which have already sent the final output
        except (self._api.RequestError, ValueError) as exc:  # this request failed (there, or its outputs here)
            self._finish(stream, [], None, FinishReason.ERROR, f"TensorRT-LLM: {exc}")
        except Exception as exc:  # the executor has shut itself down: no stream will move again
            log.error("TensorRT-LLM stopped: %r", exc)
            self._fail_all(f"TensorRT-LLM stopped ({type(exc).__name__}: {exc}); reload the model to restart it")

    def _abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.done:
            return
        try:
            stream.result.abort()
        except Exception:  # already finished inside TensorRT-LLM; we still end it here
            log.debug("abort of %s failed", request_id, exc_info=True)
        self._finish(stream, [], None, FinishReason.CANCELLED)
        if stream.task is not None:
            stream.task.cancel()

    async def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._abort(request_id)

    def _fail_all(self, error: str) -> None:
        self._failure = error
        current = asyncio.current_task()
        for stream in list(self._streams.values()):
            self._finish(stream, [], None, FinishReason.ERROR, error)
            if stream.task is not None and stream.task is not current:
                stream.task.cancel()

    @staticmethod
    def _error(request_id: str, on_output: Callable[[StepOutput], None], error: str) -> None:
        on_output(StepOutput(request_id, [], finished=True, finish_reason=FinishReason.ERROR, error=error))

    def _finish(
        self,
        stream: _Stream,
        tokens: list[int],
        log_probs: list[float] | None,
        reason: FinishReason,
        error: str | None = None,
    ) -> None:
        if stream.done:
            return
        stream.done = True
        self._streams.pop(stream.request.request_id, None)
        self._emit(stream, StepOutput(stream.request.request_id, tokens, log_probs, True, reason, error))

    def _emit(self, stream: _Stream, output: StepOutput) -> None:
        self._generation_tokens += len(output.token_ids)
        try:
            stream.on_output(output)
        except Exception:  # the host's callback must not take the loop down
            log.exception("on_output failed for %s", stream.request.request_id)
