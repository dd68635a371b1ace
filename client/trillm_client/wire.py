"""How requests and responses look on each transport.

- gRPC: a request is a list of ``InferInput`` (sync ``async_stream_infer``) or
  a ``ModelInferRequest`` protobuf (the asyncio stream); a response is an
  ``InferResult``; a request is complete when a response carries the
  ``triton_final_response`` parameter (asked for with
  ``triton_enable_empty_final_response``).
- HTTP: ``POST /v2/models/<m>[/versions/<v>]/generate`` takes the inputs as
  top-level JSON fields and answers one JSON object; ``.../generate_stream``
  answers server-sent events, one ``data: {...}`` per response. Triton writes
  a one-element tensor as a JSON scalar and anything larger as a list.

Both become a transport-neutral :class:`Response`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import InferInput, InferResult, service_pb2
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from trillm_client.errors import TrillmError, classify
from trillm_client.params import Request

FINAL_RESPONSE = "triton_final_response"
ENABLE_EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"


@dataclass
class Response:
    """One response of a request, as any transport delivers it.

    ``text`` is bytes from gRPC (decoded by the caller, incrementally, so a
    character split across responses survives) and str from HTTP; ``None``
    when the response carries no ``text_output``. ``finish_reason`` is ""
    when not given (yet).
    """

    text: str | bytes | None = None
    sequence_index: int = 0
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    finish_reason: str = ""
    cum_log_probs: float | None = None
    output_log_probs: list[float] | None = None
    model_version: str = ""


def _flat(value: Any) -> np.ndarray:
    return np.asarray(value).reshape(-1)


def _first_int(value: Any) -> int | None:
    flat = _flat(value)
    return int(flat[0]) if flat.size else None


def _first_text(value: Any) -> str | bytes | None:
    flat = _flat(value)
    if not flat.size:
        return None
    first = flat[0]
    return first if isinstance(first, (bytes, str)) else str(first)


def _fill(response: Response, name: str, value: Any) -> None:
    if name == "text_output":
        response.text = _first_text(value)
    elif name == "sequence_index":
        response.sequence_index = _first_int(value) or 0
    elif name in ("num_input_tokens", "num_output_tokens"):
        setattr(response, name, _first_int(value))
    elif name == "finish_reason":
        reason = _first_text(value) or ""
        response.finish_reason = reason.decode("utf-8") if isinstance(reason, bytes) else reason
    elif name == "cum_log_probs":
        flat = _flat(value).astype(np.float64)
        response.cum_log_probs = float(flat[0]) if flat.size else None
    elif name == "output_log_probs":
        response.output_log_probs = [float(v) for v in _flat(value).astype(np.float64)]


def response_from_grpc(result: InferResult) -> Response:
    """A gRPC ``InferResult`` as a :class:`Response` (text stays bytes)."""
    message = result.get_response()
    response = Response(model_version=message.model_version)
    for output in message.outputs:
        _fill(response, output.name, result.as_numpy(output.name))
    return response


def is_final(result: InferResult) -> bool:
    parameters = result.get_response().parameters
    return FINAL_RESPONSE in parameters and parameters[FINAL_RESPONSE].bool_param


def response_from_json(body: dict[str, Any]) -> Response:
    """One JSON object of HTTP ``generate`` / one SSE event as a :class:`Response`.

    Raises the classified error when the object is ``{"error": ...}``.
    """
    if "error" in body:
        raise classify(str(body["error"]))
    response = Response(model_version=str(body.get("model_version", "")))
    for name, value in body.items():
        _fill(response, name, value)
    return response


def json_object(data: bytes | str) -> dict[str, Any]:
    """The JSON object the server sent (a response body or one SSE event)."""
    try:
        decoded = json.loads(data)
    except ValueError as exc:
        raise TrillmError(f"the server sent invalid JSON: {data[:200]!r}") from exc
    if not isinstance(decoded, dict):
        raise TrillmError(f"the server sent JSON that is not an object: {data[:200]!r}")
    return decoded


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[InferInput]:
    """Tensors as tritonclient gRPC ``InferInput`` objects."""
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_request(
    model: str, version: str, arrays: dict[str, np.ndarray], request_id: str
) -> service_pb2.ModelInferRequest:
    """The ``ModelInferRequest`` the asyncio stream sends (what ``async_stream_infer``
    builds from :func:`infer_inputs`, with the empty final response enabled)."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        if array.dtype == np.object_:
            request.raw_input_contents.append(serialize_byte_tensor(array).item())
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    request.parameters[ENABLE_EMPTY_FINAL_RESPONSE].bool_param = True
    return request


def http_body(request: Request) -> bytes:
    """The UTF-8 JSON body of HTTP ``generate`` / ``generate_stream``."""
    return json.dumps(request.json_payload(), ensure_ascii=False).encode("utf-8")


def http_headers(sse: bool) -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "text/event-stream" if sse else "application/json"}


def generate_path(model: str, version: str, stream: bool) -> str:
    """``/v2/models/<m>[/versions/<v>]/generate[_stream]``."""
    base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    return base + ("/generate_stream" if stream else "/generate")


def error_from_http(status: int, body: bytes) -> TrillmError:
    """The error of a non-200 HTTP answer: ``{"error": ...}`` as JSON or as one SSE event."""
    text = body.decode("utf-8", errors="replace").strip()
    message = text or f"HTTP {status}"
    candidates = [text] + [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    for candidate in candidates:
        try:
            decoded = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(decoded, dict) and "error" in decoded:
            message = str(decoded["error"])
            break
    return classify(message, http_status=status)


class SSEParser:
    """Server-sent events, fed one line at a time.

    :meth:`feed` returns the data of an event when a blank line ends it,
    otherwise ``None``; :meth:`end` returns the data of an event the stream
    left unterminated. Comment lines and fields other than ``data`` are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str | bytes) -> str | None:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.rstrip("\r\n")
        if not line:
            return self.end()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def end(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data
