"""The Triton pipeline behind the API: trillm_client's AsyncClient over the gRPC stream.

One OpenAI request becomes one pipeline request per choice (``n`` times the
prompts of a completions batch), run concurrently; choice *i* of a prompt is
seeded ``seed + i``. Every choice runs as a pipeline stream, even for an
unstreamed answer: Triton 2.51 passes a cancellation on to a running
ensemble only through its streamed responses (postprocessing sees it), so a
non-streamed ensemble request would run to its end after its client left.
Streaming also gives each response's new tokens the text released with them
(the ``token`` of log probs).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from trillm_client import AsyncClient, Completion
from trillm_client.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimeoutError,
    TrillmError,
    UnavailableError,
)

from trillm.openai.protocol import APIError, Target

# The pipeline's input names that an OpenAI field stands for (others keep their name).
FIELD_OF_INPUT = {"stop_words": "stop"}
# Health and the model list ask Triton about itself: an answer takes milliseconds, so a
# server that does not answer in this long counts as unavailable (not the request timeout).
CONTROL_TIMEOUT_S = 10.0
_INPUT_NAME = re.compile(r"(?:input|parameter) '(\w+)'")


@dataclass
class Choice:
    """One sequence to generate: text (completions) or a conversation (chat)."""

    index: int
    prompt: str | list[dict[str, str]]
    max_tokens: int
    sampling: dict[str, Any]
    logprobs: bool = False
    # Text the answer starts with: the prompt, for completions' echo. The pipeline
    # streams only generated text (as TensorRT-LLM's does), so it is added here.
    echo: str = ""


@dataclass
class Piece:
    """Text a streamed choice adds, with the log probabilities of the tokens it came with."""

    index: int
    text: str
    # When log probs were asked: the text each token released ("" until one completes some), and its log prob.
    tokens: list[str] | None = None
    log_probs: list[float] | None = None


@dataclass
class Finished:
    """A choice is done; ``completion`` has its token counts and finish reason."""

    index: int
    completion: Completion
    tokens: list[str] | None = None  # per token, when log probs were asked (as in Piece)
    log_probs: list[float] | None = None


Event = Piece | Finished


def api_error(exc: TrillmError, prompt_field: str, limit_field: str) -> APIError:
    """What a pipeline failure is for an OpenAI client: a bad input names its field."""
    if isinstance(exc, InvalidInputError):
        match = _INPUT_NAME.search(exc.message)
        name = match.group(1) if match else None
        fields = {"text_input": prompt_field, "messages": prompt_field, "prompt": prompt_field,
                  "max_tokens": limit_field, **FIELD_OF_INPUT}
        param = fields.get(name, name) if name else None
        # The OpenAI field first, then the pipeline's own words (which name its input).
        return APIError(400, f"{param}: {exc.message}" if param else exc.message, param=param, code="invalid_value")
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, exc.message, param="model", code="model_not_found")
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, exc.message, code="timeout")
    if isinstance(exc, (UnavailableError, ModelNotReadyError)):
        return APIError(503, f"the pipeline is unavailable: {exc.message}", code="service_unavailable")
    return APIError(503, f"the pipeline failed: {exc.message}", code="service_unavailable")


class Pipeline:
    """AsyncClients of one served model: unpinned, and one per version asked for."""

    def __init__(self, url: str, model: str, timeout: float | None) -> None:
        self.url = url
        self.model = model
        self.timeout = timeout
        self._clients: dict[str, AsyncClient] = {"": self._new("")}
        self._lock = asyncio.Lock()

    def _new(self, version: str) -> AsyncClient:
        return AsyncClient(self.url, protocol="grpc", model=self.model, version=version or None,
                           timeout=self.timeout)

    async def client(self, target: Target) -> AsyncClient:
        """The client of ``target``; a pinned version must be loaded (else 404), so that
        requests for made-up versions do not each leave a client behind."""
        if target.version in self._clients:
            return self._clients[target.version]
        async with self._lock:
            if target.version not in self._clients:
                if target.version not in await self.versions():
                    raise APIError(404, f"The model '{target.id}' does not exist: version {target.version} of "
                                   f"'{self.model}' is not loaded (GET /v1/models lists what is)",
                                   param="model", code="model_not_found")
                self._clients[target.version] = self._new(target.version)
        return self._clients[target.version]

    async def versions(self) -> list[str]:
        """The versions of the served model that are ready, in order."""
        try:
            infos = await asyncio.wait_for(self._clients[""].models(), CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise UnavailableError(f"Triton at {self.url} did not list its models within {CONTROL_TIMEOUT_S:g}s") from None
        ready = {i.version for i in infos if i.name == self.model and i.state == "READY" and i.version}
        return sorted(ready, key=int)

    async def ready(self) -> bool:
        try:
            health = await asyncio.wait_for(self._clients[""].health(), CONTROL_TIMEOUT_S)
        except (TrillmError, asyncio.TimeoutError):
            return False
        return bool(health["model_ready"])

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def run(self, target: Target, choices: list[Choice]) -> AsyncIterator[Event]:
        """Every choice's events as they come; the first failure raises (the rest are cancelled)."""
        client = await self.client(target)
        async for event in merge([_stream(client, c) for c in choices]):
            yield event


async def _stream(client: AsyncClient, choice: Choice) -> AsyncIterator[Event]:
    tokens: list[str] | None = [] if choice.logprobs else None
    log_probs: list[float] | None = [] if choice.logprobs else None
    async with client.stream(choice.prompt, choice.max_tokens, **choice.sampling) as stream:  # type: ignore[arg-type]
        if choice.echo:
            yield Piece(choice.index, choice.echo)
        async for delta in stream:
            piece = Piece(choice.index, delta)
            if tokens is not None and log_probs is not None:
                # The engine reports the log probs of every token kept so far; the new ones came
                # with this text, which the last of them completed.
                new = (stream.received.output_log_probs or [])[len(log_probs):]
                piece.log_probs = new
                piece.tokens = [""] * (len(new) - 1) + [delta] if new else []
                tokens += piece.tokens
                log_probs += new
            yield piece
    assert stream.completion is not None
    kept = stream.completion.num_output_tokens
    if tokens is not None and log_probs is not None and kept is not None:
        # A stop string can end the answer before tokens already counted: keep the answer's
        # tokens, the last of them releasing the rest of its text.
        del tokens[kept:], log_probs[kept:]
        before = "".join(tokens[:-1])
        if tokens and stream.completion.text.startswith(before):
            tokens[-1] = stream.completion.text[len(before):]
    completion = replace(stream.completion, text=choice.echo + stream.completion.text)
    yield Finished(choice.index, completion, tokens, log_probs)


async def merge(runs: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """The events of several runs as they arrive; leaving early, or a failure, cancels them all."""
    if len(runs) == 1:
        async for event in runs[0]:
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(run: AsyncIterator[Event]) -> None:
        try:
            async for event in run:
                await queue.put(event)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(exc)
        else:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
