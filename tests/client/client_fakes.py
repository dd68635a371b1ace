"""In-process stand-ins for tritonserver's two frontends, for client unit tests.

Each records the requests it gets and answers with a script the test sets:
- :class:`FakeGrpc`: Triton's gRPC service (``ModelStreamInfer`` and the
  health / repository calls) on a real grpc server on a free loopback port;
- :class:`FakeHttp`: ``generate`` (JSON) and ``generate_stream`` (chunked
  server-sent events) plus the health / repository endpoints.

A script is a list of steps: a response to send, ``("sleep", seconds)``, or
``"hang"`` (send nothing more until the client goes away; ``client_gone`` is set then).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor


def _tensor_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return serialize_byte_tensor(array).item()
    return array.tobytes()


def grpc_response(
    text: str | bytes | None = None,
    *,
    final: bool = False,
    error: str = "",
    version: str = "1",
    **outputs: Any,
) -> service_pb2.ModelStreamInferResponse:
    """One stream response: ``text_output`` plus other outputs (scalars or lists), shaped [1, n]."""
    if error:
        return service_pb2.ModelStreamInferResponse(error_message=error)
    response = service_pb2.ModelInferResponse(model_name="ensemble", model_version=version)
    arrays = {}
    if text is not None:
        arrays["text_output"] = np.array([[text.encode() if isinstance(text, str) else text]], dtype=np.object_)
    for name, value in outputs.items():
        if isinstance(value, str):
            arrays[name] = np.array([[value.encode()]], dtype=np.object_)
        elif isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            arrays[name] = np.array(value, dtype=np.float32).reshape(1, -1)
        else:
            arrays[name] = np.array(value, dtype=np.int32).reshape(1, -1)
    for name, array in arrays.items():
        response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(_tensor_bytes(array))
    response.parameters["triton_final_response"].bool_param = final
    return service_pb2.ModelStreamInferResponse(infer_response=response)


class FakeGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.script: list[Any] = []
        self.client_gone = threading.Event()
        self.models = {("ensemble", ""): True, ("ensemble", "1"): True}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"127.0.0.1:{self.port}"

    def start(self) -> FakeGrpc:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        self.requests.append(next(request_iterator))
        if "hang" in self.script:
            # Such an RPC ends only when the client cancels it (gRPC may stop
            # pulling this generator without resuming it, so it is the callback that tells).
            context.add_callback(self.client_gone.set)
        for step in self.script:
            if step == "hang":
                while context.is_active():
                    time.sleep(0.01)
                return
            if isinstance(step, tuple) and step[0] == "sleep":
                time.sleep(step[1])
                continue
            yield step

    def ServerLive(self, request, context):  # noqa: N802
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=all(self.models.values()))

    def ModelReady(self, request, context):  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=self.models.get((request.name, request.version), False))

    def RepositoryIndex(self, request, context):  # noqa: N802
        index = service_pb2.RepositoryIndexResponse()
        for (name, version), ready in self.models.items():
            if version:
                index.models.add(name=name, version=version, state="READY" if ready else "UNAVAILABLE",
                                 reason="" if ready else "failed to load")
        return index


def sse(*events: dict) -> list[bytes]:
    """Server-sent events as Triton writes them: ``data: {json}`` and a blank line each."""
    return [f"data: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in events]


class FakeHttp:
    """A threaded HTTP server; ``script`` is (status, content_type, [chunks or steps])."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.script: tuple[int, str, list[Any]] = (200, "application/json", [b"{}"])
        self.client_gone = threading.Event()
        self.ready = True
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, content_type: str, steps: list[Any]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for step in steps:
                        if step == "hang":
                            while True:  # writes fail once the client has closed the connection
                                time.sleep(0.02)
                                self.wfile.write(b"1\r\n\n\r\n")
                                self.wfile.flush()
                        if isinstance(step, tuple):
                            time.sleep(step[1])
                            continue
                        self.wfile.write(f"{len(step):x}\r\n".encode() + step + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    fake.client_gone.set()
                    self.close_connection = True

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v2/repository/index":
                    index = [{"name": "ensemble", "version": "1", "state": "READY"}, {"name": "broken"}]
                    return self._reply(200, "application/json", [json.dumps(index).encode()])
                fake.requests.append((self.path, json.loads(body)))
                self._reply(*fake.script)

            def do_GET(self) -> None:  # noqa: N802
                ok = self.path == "/v2/health/live" or fake.ready
                self.send_response(200 if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> FakeHttp:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
