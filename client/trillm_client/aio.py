"""The asyncio client: :class:`AsyncClient` and its :class:`AsyncTextStream`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from trillm_client.aio_transport import AsyncGrpcCall, AsyncGrpcTransport, AsyncHttpCall, AsyncHttpTransport
from trillm_client.client import (
    _Target,
    control_error,
    model_infos,
    not_ready_error,
    stream_request,
)
from trillm_client.completion import Completion, CompletionBuilder, ModelInfo, StreamProgress
from trillm_client.errors import UnavailableError
from trillm_client.params import Prompt, Request, build_request

AsyncCall = AsyncGrpcCall | AsyncHttpCall


class AsyncTextStream(StreamProgress, AsyncIterator[str]):
    """The asyncio twin of :class:`trillm_client.TextStream`.

    The request is sent when iteration starts (or on ``async with``). If the
    task iterating it is cancelled, or it is closed early (``aclose()``,
    leaving ``async with``, garbage collection), the request is cancelled on
    the server. ``completion``, ``ttft``, ``token_times`` and ``itl`` as in
    :class:`~trillm_client.TextStream`.
    """

    def __init__(self, open_call: Callable[[], Awaitable[AsyncCall]], builder: CompletionBuilder) -> None:
        super().__init__(builder, started=0.0)  # set when the request is sent
        self._open_call = open_call
        self._call: AsyncCall | None = None

    async def start(self) -> None:
        """Sends the request (once)."""
        if self._call is None:
            self._sent()
            self._call = await self._open_call()

    async def __anext__(self) -> str:
        await self.start()
        assert self._call is not None
        while self.completion is None:
            try:
                response = await self._call.__anext__()
            except StopAsyncIteration:
                tail = self._finish()
                if tail:
                    return tail
                break
            delta = self._take(response)
            if delta:
                return delta
        raise StopAsyncIteration

    async def text(self) -> str:
        """Reads the rest of the stream; returns the whole text."""
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion.text

    async def aclose(self) -> None:
        """Cancels the request if it is still running."""
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._call is not None:
            try:
                self._call.cancel()
            except Exception:
                pass


class AsyncClient(_Target):
    """The asyncio twin of :class:`trillm_client.Client` (same arguments and semantics),
    on ``tritonclient.grpc.aio`` / ``tritonclient.http.aio`` and aiohttp.

    Use as ``async with AsyncClient(...) as client:`` or ``await client.close()``.
    """

    _transports = (AsyncGrpcTransport, AsyncHttpTransport)

    async def _open(self, request: Request) -> AsyncCall:
        if self._grpc is not None:
            return await self._grpc.open(self.model, self.version, request)
        assert self._http is not None
        sse = request.stream or request.num_return_sequences > 1
        return await self._http.open(self.model, self.version, request, sse=sse)

    async def generate(self, prompt: Prompt, max_tokens: int, **sampling: Any) -> Completion:
        """See :meth:`trillm_client.Client.generate`. Cancelling the awaiting task cancels the request."""
        request = build_request(prompt, max_tokens, sampling, stream=False, validate=self.validate)
        started = time.perf_counter()
        call = await self._open(request)
        builder = CompletionBuilder(request)
        try:
            async for response in call:
                builder.add(response)
        finally:
            call.cancel()
        return builder.build(latency=time.perf_counter() - started)

    def stream(self, prompt: Prompt, max_tokens: int, **sampling: Any) -> AsyncTextStream:
        """An :class:`AsyncTextStream` of the request (validated now, sent when iterated)."""
        request = stream_request(prompt, max_tokens, sampling, self.validate)
        return AsyncTextStream(lambda: self._open(request), CompletionBuilder(request))

    # -- server state --------------------------------------------------------
    def _control(self) -> Any:
        if self._control_client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc.aio as triton
            else:
                import tritonclient.http.aio as triton  # type: ignore[no-redef]
            self._control_client = triton.InferenceServerClient(self.url)
        return self._control_client

    async def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.protocol == "grpc" and self.timeout is not None:
            kwargs["client_timeout"] = self.timeout
        try:
            return await asyncio.wait_for(getattr(self._control(), method)(*args, **kwargs), self.timeout)
        except Exception as exc:  # CancelledError is a BaseException: it passes through
            raise control_error(exc) from exc

    async def health(self) -> dict[str, Any]:
        """See :meth:`trillm_client.Client.health`."""
        return {
            "live": bool(await self._ask("is_server_live")),
            "ready": bool(await self._ask("is_server_ready")),
            "model": self.model,
            "model_ready": bool(await self._ask("is_model_ready", self.model, self.version)),
        }

    async def models(self) -> list[ModelInfo]:
        """See :meth:`trillm_client.Client.models`."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return model_infos(await self._ask("get_model_repository_index", **kwargs))

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """See :meth:`trillm_client.Client.wait_ready`."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                if await self._ask("is_model_ready", self.model, self.version):
                    return
            except UnavailableError:
                if time.monotonic() >= deadline:
                    raise
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(interval)
        raise not_ready_error(self.model, self.version, time.monotonic() - started, await self.models())

    # -- lifetime ------------------------------------------------------------
    async def close(self) -> None:
        """Closes channels and sessions; requests still running are cancelled."""
        if self._grpc is not None:
            await self._grpc.close()
        if self._http is not None:
            await self._http.close()
        if self._control_client is not None:
            await self._control_client.close()
            self._control_client = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
