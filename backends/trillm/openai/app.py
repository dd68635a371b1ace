"""The ASGI app: OpenAI's endpoints over :class:`~trillm.openai.pipeline.Pipeline`.

- ``POST /v1/chat/completions``, ``POST /v1/completions``: streamed (SSE,
  ``data: [DONE]`` last) or whole. A streamed request's first pipeline
  response is awaited before the 200 goes out, so a bad input is still a 400;
  a failure after that is an ``error`` event. A client that leaves cancels
  its pipeline requests (streamed or not).
- ``GET /v1/models`` (and ``/v1/models/{id}``): the served model, unpinned,
  and ``<model>:<N>`` for each loaded version N.
- ``GET /health``: 200 when the pipeline model is ready, else 503.

:class:`Guard` (plain ASGI, so it does not buffer streams) checks the API key
on ``/v1/*`` and counts requests in flight; once draining, new requests get a
503 while those in flight finish.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from trillm_client.errors import TrillmError

from trillm.openai.options import DEFAULT_MAX_TOKENS, MODELS, REQUEST_TIMEOUT_S
from trillm.openai.pipeline import Choice, Event, Finished, Piece, Pipeline, api_error
from trillm.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Sampling,
    bad_request,
    parse,
    resolve_model,
)
from trillm.openai.render import DONE, ChatRenderer, CompletionRenderer, Renderer, finish_reason, sse_error

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


@dataclass
class Settings:
    triton_url: str  # gRPC host:port of the Triton server
    model: str = MODELS[0]
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # chat requests that give no max_tokens
    request_timeout: float | None = REQUEST_TIMEOUT_S  # longest wait for each pipeline response


class Gate:
    """Requests in flight, and whether new ones are still let in."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """API key and drain gate in front of ``/v1/*``."""

    def __init__(self, app: Any, gate: Gate, api_key: str | None) -> None:
        self.app = app
        self.gate = gate
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, scope: dict[str, Any]) -> bool:
        if self.api_key is None:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        refusal = None
        if not self._authorized(scope):
            refusal = APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>' with the key "
                               "in the server's TRILLM_API_KEY", code="invalid_api_key")
        elif self.gate.draining:
            refusal = APIError(503, "the server is shutting down and takes no new requests; retry on another "
                               "server or after it restarts", code="shutting_down")
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        self.gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.in_flight -= 1


class ClientDisconnected(Exception):
    """The client left before its answer was ready (its pipeline requests are cancelled)."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``, cancelling it if the client goes away first (its pipeline requests with it)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone.is_set():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad_request(None, f"the request body is not valid JSON: {exc}") from None


class Endpoint:
    """The flow both completion endpoints share: parse, fan out into choices, answer."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.pipeline = pipeline
        self.settings = settings

    def _choices(self, req: Sampling, prompts: list[Any], logprobs: bool) -> list[Choice]:
        n = req.choices_per_prompt
        sampling = req.sampling()
        if logprobs:
            sampling["return_log_probs"] = True
        echo = bool(getattr(req, "echo", False))
        choices = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                seed = req.seed_of(i)
                choices.append(Choice(p * n + i, prompt, req.limit(),
                                      {**sampling, "seed": seed} if seed is not None else sampling, logprobs,
                                      echo=prompt if echo else ""))
        return choices

    async def answer(self, request: Request, req: Sampling, prompts: list[Any], renderer: Renderer,
                     prompt_field: str) -> Response:
        target = resolve_model(req.model, self.settings.model)
        choices = self._choices(req, prompts, req.wants_logprobs)  # type: ignore[attr-defined]
        events = self.pipeline.run(target, choices)

        def failure(exc: TrillmError) -> APIError:
            return api_error(exc, prompt_field, req.limit_field())

        if not req.stream:
            try:
                finished = await cancel_on_disconnect(request, _collect(events))
            except TrillmError as exc:
                raise failure(exc) from None
            return JSONResponse(self._whole(renderer, finished, len(prompts), req.choices_per_prompt))
        try:
            first = await cancel_on_disconnect(request, _first(events))
        except TrillmError as exc:
            await events.aclose()
            raise failure(exc) from None
        body = self._stream(renderer, first, events, len(choices), req.choices_per_prompt, req.include_usage, failure)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    def _whole(self, renderer: Renderer, finished: dict[int, Finished], num_prompts: int, n: int) -> dict[str, Any]:
        ordered = [finished[i] for i in sorted(finished)]
        # Which pipeline version answered: "ensemble:2".
        versions = sorted({f.completion.model_version for f in ordered if f.completion.model_version})
        renderer.fingerprint = ",".join(f"{self.settings.model}:{v}" for v in versions)
        choices = [renderer.choice(f.index, f.completion, f.tokens, f.log_probs) for f in ordered]
        prompt_tokens = sum(finished[p * n].completion.num_input_tokens or 0 for p in range(num_prompts))
        completion_tokens = sum(f.completion.num_output_tokens or 0 for f in ordered)
        return renderer.whole(choices, prompt_tokens, completion_tokens)

    @staticmethod
    async def _stream(renderer: Renderer, first: Event | None, events: AsyncIterator[Event], num_choices: int,
                      n: int, with_usage: bool, failure: Callable[[TrillmError], APIError]) -> AsyncIterator[bytes]:
        offsets = [0] * num_choices
        prompt_tokens = completion_tokens = 0
        try:
            for index in range(num_choices):
                opening = renderer.start(index)
                if opening is not None:
                    yield renderer.chunk([opening], with_usage)
            pending = [first] if first is not None else []
            while True:
                if pending:
                    event = pending.pop()
                else:
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        break
                if isinstance(event, Piece):
                    yield renderer.chunk([renderer.delta(event.index, event.text, event.tokens, event.log_probs,
                                                         offsets[event.index])], with_usage)
                    offsets[event.index] += len(event.text)
                else:
                    completion = event.completion
                    if event.index % n == 0:
                        prompt_tokens += completion.num_input_tokens or 0
                    completion_tokens += completion.num_output_tokens or 0
                    yield renderer.chunk([renderer.end(event.index, finish_reason(completion))], with_usage)
            if with_usage:
                yield renderer.usage_chunk(prompt_tokens, completion_tokens)
        except TrillmError as exc:
            yield sse_error(failure(exc))
        finally:
            await events.aclose()  # cancels what still runs (a client that left)
        yield DONE


async def _collect(events: AsyncIterator[Event]) -> dict[int, Finished]:
    finished: dict[int, Finished] = {}
    async for event in events:
        if isinstance(event, Finished):
            finished[event.index] = event
    return finished


async def _first(events: AsyncIterator[Event]) -> Event | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


def create_app(settings: Settings, gate: Gate | None = None) -> Guard:
    """The app (wrapped in its :class:`Guard`); ``gate`` is shared with the server that drains it."""
    gate = gate or Gate()
    pipeline = Pipeline(settings.triton_url, settings.model, settings.request_timeout)
    endpoint = Endpoint(pipeline, settings)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await pipeline.close()

    app = FastAPI(title="trillm OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(ClientDisconnected)
    async def _client_left(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(TrillmError)
    async def _pipeline_error(_: Request, exc: TrillmError) -> JSONResponse:
        return error_response(api_error(exc, "prompt", "max_tokens"))

    def card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": started, "owned_by": "trillm"}

    async def model_ids() -> list[str]:
        return [settings.model] + [f"{settings.model}:{v}" for v in await pipeline.versions()]

    @app.get("/health")
    async def health() -> Response:
        if gate.draining:
            return error_response(APIError(503, "the server is shutting down", code="shutting_down"))
        if not await pipeline.ready():
            return error_response(APIError(503, f"the pipeline model '{settings.model}' at {settings.triton_url} "
                                           "is not ready", code="service_unavailable"))
        return JSONResponse({"status": "ok", "model": settings.model})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(m) for m in await model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id not in await model_ids():
            resolve_model(model_id, settings.model)  # the 404 that says what is served
            raise APIError(404, f"The model '{model_id}' is not loaded (GET /v1/models lists what is)",
                           param="model", code="model_not_found")
        return card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatCompletionRequest, await _body(request), default_max_tokens=settings.default_max_tokens)
        return await endpoint.answer(request, req, [req.conversation()], ChatRenderer(req.model), "messages")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await _body(request))
        return await endpoint.answer(request, req, req.prompts(), CompletionRenderer(req.model), "prompt")

    return Guard(app, gate, settings.api_key)
