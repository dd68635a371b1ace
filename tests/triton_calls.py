"""Raw calls to a tritonserver with tritonclient and the HTTP generate API,
as any client of the TensorRT-LLM backend makes them (no trillm_client)."""

from __future__ import annotations

import http.client
import json
import queue
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

# Input name -> numpy dtype, as INTERFACE.md declares them.
DTYPES = {
    "text_input": object, "bad_words": object, "stop_words": object,
    "max_tokens": np.int32, "end_id": np.int32, "pad_id": np.int32, "top_k": np.int32,
    "min_tokens": np.int32, "beam_width": np.int32, "num_return_sequences": np.int32,
    "top_p": np.float32, "temperature": np.float32, "length_penalty": np.float32,
    "repetition_penalty": np.float32, "presence_penalty": np.float32, "frequency_penalty": np.float32,
    "seed": np.uint64,
    "stream": bool, "exclude_input_in_output": bool, "return_log_probs": bool,
    "return_num_input_tokens": bool, "return_num_output_tokens": bool,
}


@dataclass
class Result:
    pieces: list[str] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _grpc_input(name: str, value) -> grpcclient.InferInput:
    dtype = DTYPES[name]
    if isinstance(value, (list, tuple)):
        array = np.array([[v.encode() if isinstance(v, str) else v for v in value]], dtype=dtype)
    else:
        array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype) if dtype is not object else "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def grpc_stream(url: str, model: str, inputs: dict, version: str = "", timeout: float = 300) -> Result:
    """One request over the gRPC stream API; collects every response until the final one."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tensors = []
        for name, value in inputs.items():
            tensors.append(value if isinstance(value, grpcclient.InferInput) else _grpc_input(name, value))
        client.async_stream_infer(model, tensors, model_version=version, enable_empty_final_response=True)
        out = Result()
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                out.error = str(error)
                return out
            response = result.get_response()
            names = {o.name for o in response.outputs}
            if "text_output" in names:
                text = result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")
                out.pieces.append(text)
                out.responses.append({n: result.as_numpy(n) for n in names})
            if response.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def _post(http_url: str, path: str, payload: dict | bytes, timeout: float = 300):
    host, port = http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def model_path(model: str, version: str = "") -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def http_generate(http_url: str, model: str, payload: dict | bytes, version: str = "") -> Result:
    conn, response = _post(http_url, model_path(model, version) + "/generate", payload)
    try:
        body = json.loads(response.read() or b"{}")
    finally:
        conn.close()
    # Triton reports some errors (e.g. a second response on /generate) with status 200.
    if response.status != 200 or "error" in body:
        return Result(error=body.get("error", str(body)))
    return Result(pieces=[body["text_output"]], responses=[body])


def http_generate_stream(http_url: str, model: str, payload: dict, version: str = "") -> Result:
    conn, response = _post(http_url, model_path(model, version) + "/generate_stream", payload)
    out = Result()
    try:
        if response.status != 200:
            body = response.read().decode("utf-8", "replace").strip()
            body = body[len("data:"):] if body.startswith("data:") else body
            out.error = json.loads(body or "{}").get("error", f"HTTP {response.status}")
            return out
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                out.error = event["error"]
                return out
            if "text_output" in event:
                out.pieces.append(event["text_output"])
                out.responses.append(event)
        return out
    finally:
        conn.close()
