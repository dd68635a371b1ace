"""Stop requests: how a model downstream of ``tensorrt_llm`` cancels a call.

Triton 2.51 does not pass a client's cancellation to a step that is already
running (the engine host of an ensemble, or a BLS child request), only to
requests made after it. So ``postprocessing`` (which sees it) and
``tensorrt_llm_bls`` send the engine host a request with ``stop=true`` and
the call's key as request id, as NVIDIA's backend does for its ``stop`` input.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from trillm.triton import tensors as T


def send_stop(request_id: str, model_version: int = -1) -> None:
    inputs = [
        pb_utils.Tensor(T.ENG_INPUT_IDS, np.zeros((1, 1), dtype=np.int32)),
        pb_utils.Tensor(T.ENG_INPUT_LENGTHS, np.ones((1, 1), dtype=np.int32)),
        pb_utils.Tensor(T.ENG_OUTPUT_LEN, np.ones((1, 1), dtype=np.int32)),
        pb_utils.Tensor(T.ENG_STOP, np.ones((1, 1), dtype=bool)),
    ]
    request = pb_utils.InferenceRequest(
        model_name="tensorrt_llm",
        model_version=model_version,
        request_id=request_id,
        inputs=inputs,
        requested_output_names=[],
    )
    for _ in request.exec(decoupled=True):
        pass


class StopOnce:
    """Sends at most one stop per key (every streamed piece of a cancelled
    call reaches postprocessing cancelled) to ``tensorrt_llm`` version ``model_version``."""

    def __init__(self, model_version: int = -1, remember: int = 4096) -> None:
        self._sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._model_version = model_version
        self._remember = remember
        self._lock = threading.Lock()

    def __call__(self, key: str) -> None:
        with self._lock:
            if key in self._sent:
                return
            self._sent[key] = None
            while len(self._sent) > self._remember:
                self._sent.popitem(last=False)
        send_stop(key, self._model_version)
