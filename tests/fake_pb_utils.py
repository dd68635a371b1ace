"""A FAKE ``triton_python_backend_utils`` for unit tests (no tritonserver).

It implements just what our model code calls, with the real module's names
and semantics, so a model's ``initialize``/``execute`` run in-process. The
same model code runs under a real tritonserver in tests/server.
"""

from __future__ import annotations

import json
import threading

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, msg: str, code: int = 0) -> None:
        super().__init__(msg)
        self._msg = msg
        self._code = code

    def code(self) -> int:
        return self._code

    def message(self) -> str:
        return self._msg


class Tensor:
    def __init__(self, name: str, value) -> None:
        self._name = name
        self._value = np.asarray(value)

    def name(self) -> str:
        return self._name

    def as_numpy(self):
        return self._value


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self):
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error


class ResponseSender:
    """Records what a decoupled model sends; ``done`` is set by the final flag."""

    def __init__(self) -> None:
        self.responses: list[InferenceResponse] = []
        self.done = threading.Event()
        self.cancelled = False

    def send(self, response=None, flags: int = 0) -> None:
        if self.done.is_set():
            raise RuntimeError("response sent after the final flag")
        if response is not None:
            self.responses.append(response)
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


class InferenceRequest:
    """A request as a model's ``execute`` receives it."""

    def __init__(self, inputs: dict[str, object]) -> None:
        self._inputs = {k: Tensor(k, v) for k, v in inputs.items() if v is not None}
        self.sender = ResponseSender()

    def inputs(self):
        return list(self._inputs.values())

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.sender.cancelled


def get_input_tensor_by_name(request, name):
    return request._inputs.get(name)


def get_output_tensor_by_name(response, name):
    for tensor in response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def using_decoupled_model_transaction_policy(model_config) -> bool:
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def install() -> None:
    """Make ``import triton_python_backend_utils`` return this module."""
    import sys

    sys.modules["triton_python_backend_utils"] = sys.modules[__name__]
