"""Blocking transports. A *call* is one request on the wire: iterating it
yields its :class:`~trillm_client.wire.Response` objects and stops when the
server says the request is complete; ``close()`` before that cancels it.

- gRPC: each call has its own bidirectional stream (``start_stream``,
  ``async_stream_infer``, ``stop_stream``), because a stream is the unit the
  client can cancel (``stop_stream(cancel_requests=True)``). Idle
  ``InferenceServerClient`` objects are pooled for reuse.
- HTTP: each call is one ``http.client`` connection to ``generate`` or
  ``generate_stream``; closing the connection cancels the request.

``timeout`` bounds the wait for each response (for a non-streamed request,
the whole generation); when it passes the request is cancelled and
:class:`~trillm_client.errors.RequestTimeoutError` raised.
"""

from __future__ import annotations

import functools
import http.client
import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tritonclient.grpc import InferenceServerClient
from tritonclient.utils import InferenceServerException

from trillm_client.errors import RequestTimeoutError, TrillmError, UnavailableError, classify
from trillm_client.params import Request
from trillm_client.wire import (
    Response,
    SSEParser,
    error_from_http,
    generate_path,
    http_body,
    http_headers,
    infer_inputs,
    is_final,
    json_object,
    response_from_grpc,
    response_from_json,
)


def split_host_port(url: str, default_port: int) -> tuple[str, int]:
    """``"host:port"`` (an ``http://`` prefix and a trailing ``/`` are allowed)."""
    address = url.split("://", 1)[-1].rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        return address.strip("[]"), default_port
    if not port.isdigit():
        raise ValueError(f"invalid url {url!r}: expected host:port")
    return host.strip("[]"), int(port)


def grpc_error(exc: InferenceServerException) -> TrillmError:
    """A tritonclient gRPC exception as a typed error."""
    return classify(exc.message() or str(exc), grpc_code=exc.status())


def new_request_id() -> str:
    return uuid.uuid4().hex


def _put(responses: queue.SimpleQueue, result, error) -> None:
    responses.put((result, error))


class GrpcTransport:
    """Opens gRPC stream calls; keeps idle clients for the next call."""

    def __init__(self, url: str, timeout: float | None) -> None:
        self.url = url
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: list[InferenceServerClient] = []
        self._clients: list[InferenceServerClient] = []

    def acquire(self) -> InferenceServerClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        client = InferenceServerClient(self.url)
        with self._lock:
            self._clients.append(client)
        return client

    def release(self, client: InferenceServerClient, reusable: bool) -> None:
        with self._lock:
            if reusable:
                self._idle.append(client)
                return
            if client in self._clients:
                self._clients.remove(client)
        client.close()

    def open(self, model: str, version: str, request: Request) -> GrpcCall:
        return GrpcCall(self, model, version, request)

    def close(self) -> None:
        with self._lock:
            clients, self._clients, self._idle = self._clients, [], []
        for client in clients:
            client.close()


class GrpcCall(Iterator[Response]):
    """One request on its own gRPC stream."""

    def __init__(self, transport: GrpcTransport, model: str, version: str, request: Request) -> None:
        self._transport = transport
        self._timeout = transport.timeout
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        self._open = True
        self._client = transport.acquire()
        try:
            self._client.start_stream(callback=functools.partial(_put, self._responses))
            self._client.async_stream_infer(
                model,
                infer_inputs(request.arrays()),
                model_version=version,
                request_id=new_request_id(),
                enable_empty_final_response=True,
            )
        except InferenceServerException as exc:
            # A stream that failed at once (nothing listening) reports why via the callback.
            try:
                exc = self._responses.get(timeout=1.0)[1] or exc
            except queue.Empty:
                pass
            self._end(cancel=True, reusable=False)
            raise grpc_error(exc) from None

    def __next__(self) -> Response:
        while self._open:
            try:
                result, error = self._responses.get(timeout=self._timeout)
            except queue.Empty:
                self._end(cancel=True, reusable=False)
                raise RequestTimeoutError(f"no response within {self._timeout}s; the request was cancelled") from None
            if error is not None:
                self._end(cancel=True, reusable=False)
                raise grpc_error(error)
            if is_final(result):
                self._end(cancel=False, reusable=True)
            if result.get_response().outputs:
                return response_from_grpc(result)
        raise StopIteration

    def close(self) -> None:
        """Cancels the request on the server if it is still running."""
        if self._open:
            self._end(cancel=True, reusable=False)

    def _end(self, cancel: bool, reusable: bool) -> None:
        self._open = False
        stream = getattr(self._client, "_stream", None)
        try:
            self._client.stop_stream(cancel_requests=cancel)
        except Exception:  # a broken stream: drop the client rather than reuse it
            reusable = False
        if cancel:
            # tritonclient does not end its request iterator on a cancelled
            # stream, leaving gRPC's thread that reads it blocked forever.
            requests = getattr(stream, "_request_queue", None)
            if requests is not None:
                requests.put(None)
        self._transport.release(self._client, reusable)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class HttpTransport:
    """Opens HTTP ``generate`` / ``generate_stream`` calls."""

    def __init__(self, url: str, timeout: float | None) -> None:
        self.host, self.port = split_host_port(url, 8000)
        self.timeout = timeout

    def open(self, model: str, version: str, request: Request, sse: bool) -> HttpCall:
        return HttpCall(self, generate_path(model, version, sse), http_body(request), sse)

    def close(self) -> None:
        """Nothing to release: every call has its own connection."""


class HttpCall(Iterator[Response]):
    """One HTTP request: one JSON answer, or server-sent events until the body ends."""

    def __init__(self, transport: HttpTransport, path: str, body: bytes, sse: bool) -> None:
        self._where = f"{transport.host}:{transport.port}"
        self._timeout = transport.timeout
        self._conn = http.client.HTTPConnection(transport.host, transport.port, timeout=transport.timeout)
        self._sse = SSEParser() if sse else None
        self._pending: list[Response] = []
        self._open = True
        with self._guard():
            self._conn.request("POST", path, body=body, headers=http_headers(sse))
            self._response = self._conn.getresponse()
            if self._response.status != 200:
                raise error_from_http(self._response.status, self._response.read())
            if not sse:
                self._pending.append(response_from_json(json_object(self._response.read())))
                self._end()

    def __next__(self) -> Response:
        if self._pending:
            return self._pending.pop(0)
        while self._open and self._sse is not None:
            with self._guard():
                line = self._response.readline()
                data = self._sse.feed(line) if line else self._sse.end()
                if not line and data is None:
                    self._end()
                if data is not None:
                    return response_from_json(json_object(data))
        raise StopIteration

    def close(self) -> None:
        """Closes the connection, which cancels the request if it is still running."""
        self._end()

    def _end(self) -> None:
        self._open = False
        self._conn.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Maps socket and http.client failures to typed errors; closes the call on any error."""
        try:
            yield
        except TrillmError:
            self._end()
            raise
        except TimeoutError as exc:
            self._end()
            raise RequestTimeoutError(
                f"no response from {self._where} within {self._timeout}s; the request was cancelled"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            self._end()
            raise UnavailableError(f"HTTP connection to {self._where} failed: {exc!r}") from exc
        except BaseException:
            self._end()
            raise
