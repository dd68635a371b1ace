"""asyncio transports: the twins of :mod:`trillm_client.transport`.

- gRPC: one ``ModelStreamInfer`` call per request on a shared ``grpc.aio``
  channel. ``tritonclient.grpc.aio`` cannot ask for the empty final response
  (it rejects ``triton_*`` parameters), so the request message is built by
  :func:`trillm_client.wire.grpc_request` and sent on the generated stub.
  Our request stream stays open until the final response; ``cancel()``
  cancels the RPC, which cancels the request on the server.
- HTTP: ``aiohttp`` (a dependency of ``tritonclient[http]``); closing the
  response closes its connection, which cancels the request.

An async call is iterated with ``async for``; if the task iterating it is
cancelled, the call cancels its request before ``CancelledError`` propagates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import grpc
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from trillm_client.errors import RequestTimeoutError, TrillmError, UnavailableError, classify
from trillm_client.params import Request
from trillm_client.transport import new_request_id, split_host_port
from trillm_client.wire import (
    Response,
    SSEParser,
    error_from_http,
    generate_path,
    grpc_request,
    http_body,
    http_headers,
    is_final,
    json_object,
    response_from_grpc,
    response_from_json,
)

MAX_MESSAGE_BYTES = 2**31 - 1


class AsyncGrpcTransport:
    """Opens gRPC stream calls on one asyncio channel (created on first use, in the running loop)."""

    def __init__(self, url: str, timeout: float | None) -> None:
        self.url = url
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None

    async def open(self, model: str, version: str, request: Request) -> AsyncGrpcCall:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.url,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ],
            )
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        message = grpc_request(model, version, request.arrays(), new_request_id())
        return AsyncGrpcCall(self._stub, message, self.timeout)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None


class AsyncGrpcCall(AsyncIterator[Response]):
    def __init__(
        self,
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        message: service_pb2.ModelInferRequest,
        timeout: float | None,
    ) -> None:
        self._timeout = timeout
        self._done = asyncio.Event()
        self._open = True
        self._call = stub.ModelStreamInfer(self._requests(message))

    async def _requests(self, message: service_pb2.ModelInferRequest) -> AsyncIterator[service_pb2.ModelInferRequest]:
        yield message
        await self._done.wait()  # closing our side early would end the stream

    async def __anext__(self) -> Response:
        while self._open:
            try:
                message = await asyncio.wait_for(self._call.read(), self._timeout)
            except asyncio.TimeoutError:
                self.cancel()
                raise RequestTimeoutError(f"no response within {self._timeout}s; the request was cancelled") from None
            except grpc.aio.AioRpcError as exc:
                self.cancel()
                raise classify(exc.details() or str(exc), grpc_code=exc.code().name) from None
            except BaseException:  # our task was cancelled
                self.cancel()
                raise
            if message is grpc.aio.EOF:
                self._finish()
                break
            if message.error_message:
                self.cancel()
                raise classify(message.error_message)
            result = InferResult(message.infer_response)
            if is_final(result):
                self._finish()
            if message.infer_response.outputs:
                return response_from_grpc(result)
        raise StopAsyncIteration

    def _finish(self) -> None:
        self._open = False
        self._done.set()

    def cancel(self) -> None:
        """Cancels the request if it is still running."""
        if self._open:
            self._call.cancel()
        self._finish()


class AsyncHttpTransport:
    """Opens HTTP ``generate`` / ``generate_stream`` calls on one aiohttp session."""

    def __init__(self, url: str, timeout: float | None) -> None:
        self.host, self.port = split_host_port(url, 8000)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def open(self, model: str, version: str, request: Request, sse: bool) -> AsyncHttpCall:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
            )
        call = AsyncHttpCall(f"{self.host}:{self.port}", self.timeout, sse)
        url = f"http://{self.host}:{self.port}{generate_path(model, version, sse)}"
        await call.start(self._session, url, http_body(request))
        return call

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None


class AsyncHttpCall(AsyncIterator[Response]):
    def __init__(self, where: str, timeout: float | None, sse: bool) -> None:
        self._where = where
        self._timeout = timeout
        self._sse = SSEParser() if sse else None
        self._pending: list[Response] = []
        self._response: aiohttp.ClientResponse | None = None
        self._open = True

    async def start(self, session: aiohttp.ClientSession, url: str, body: bytes) -> None:
        async with self._guard():
            self._response = await session.post(url, data=body, headers=http_headers(self._sse is not None))
            if self._response.status != 200:
                raise error_from_http(self._response.status, await self._response.read())
            if self._sse is None:
                self._pending.append(response_from_json(json_object(await self._response.read())))
                self._finish()

    async def __anext__(self) -> Response:
        if self._pending:
            return self._pending.pop(0)
        while self._open and self._sse is not None and self._response is not None:
            async with self._guard():
                line = await self._response.content.readline()
                data = self._sse.feed(line) if line else self._sse.end()
                if not line and data is None:
                    self._finish()
                if data is not None:
                    return response_from_json(json_object(data))
        raise StopAsyncIteration

    def _finish(self) -> None:
        self._open = False
        if self._response is not None:
            self._response.release()

    def cancel(self) -> None:
        """Closes the connection, which cancels the request if it is still running."""
        if self._open and self._response is not None:
            self._response.close()
        self._open = False

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except TrillmError:
            self.cancel()
            raise
        except asyncio.TimeoutError as exc:
            self.cancel()
            raise RequestTimeoutError(
                f"no response from {self._where} within {self._timeout}s; the request was cancelled"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            self.cancel()
            raise UnavailableError(f"HTTP connection to {self._where} failed: {exc!r}") from exc
        except BaseException:
            self.cancel()
            raise
