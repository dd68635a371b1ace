"""``tensorrt_llm_bls``: the same pipeline as ``ensemble``, driven from Python.

Business-logic scripting (BLS) calls ``preprocessing``, then streams from
``tensorrt_llm`` and renders each of its responses with ``postprocessing``,
so it returns exactly the ensemble's text. Each request runs on a worker
thread; ``execute`` returns at once.

Version N calls version N of each of them (a version number names a whole
pipeline, trillm.versions), so versions of this model can serve side by side.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import triton_python_backend_utils as pb_utils

from trillm.triton import io
from trillm.triton.lifecycle import watch_parent
from trillm.triton import tensors as T
from trillm.triton.errors import ConfigError, InputError
from trillm.triton.params import model_parameters
from trillm.triton.sender import GuardedSender
from trillm.triton.stop import send_stop

# BLS input -> preprocessing input
PRE_INPUTS = {**{user: pre for pre, user in T.PRE_USER_NAMES.items()}, **{n: n for n in T.PRE_SEEN_INPUTS}}
# preprocessing output -> engine-host input
PRE_TO_ENGINE = {
    T.PRE_OUT_INPUT_ID: T.ENG_INPUT_IDS,
    T.PRE_OUT_INPUT_LEN: T.ENG_INPUT_LENGTHS,
    T.PRE_OUTPUT_LEN: T.ENG_OUTPUT_LEN,
    T.PRE_OUT_END_ID: T.ENG_END_ID,
    T.PRE_OUT_PAD_ID: T.ENG_PAD_ID,
    T.PRE_OUT_STOP_WORDS: T.ENG_STOP_WORDS,
    T.PRE_OUT_BAD_WORDS: T.ENG_BAD_WORDS,
    T.PRE_OUT_MIN_TOKENS: T.SAMPLING_INPUTS[T.MIN_TOKENS].name,
}
# BLS input passed straight to the engine host (min_tokens goes through preprocessing)
DIRECT_INPUTS = {
    T.STREAM: T.ENG_STREAMING,
    T.EXCLUDE_INPUT: T.ENG_EXCLUDE_INPUT,
    T.RETURN_NUM_INPUT: T.RETURN_NUM_INPUT,
    T.RETURN_NUM_OUTPUT: T.RETURN_NUM_OUTPUT,
    **{user: spec.name for user, spec in T.SAMPLING_INPUTS.items() if user != T.MIN_TOKENS},
}
# engine-host output -> postprocessing input
ENGINE_TO_POST = {
    T.ENG_OUT_IDS: T.POST_TOKENS,
    T.ENG_OUT_SEQ_LEN: T.POST_SEQ_LEN,
    T.ENG_OUT_PREFIX_LEN: T.POST_PREFIX_LEN,
    T.ENG_OUT_TEXT_LEN: T.POST_TEXT_LEN,
    **{eng: post for eng, (post, _) in T.OUTPUT_ROUTES.items()},
}
# postprocessing output -> BLS output
POST_TO_USER = {
    T.POST_OUTPUT: T.TEXT_OUTPUT,
    **{T.POST_PASSTHROUGH[post]: user for post, user in T.OUTPUT_ROUTES.values()},
}


@dataclass
class BlsParams:
    """None yet (so that a stray parameter fails the load). The version of the
    composing models is not a parameter: it is this model's own version."""


class BlsError(RuntimeError):
    pass


def _tensors(source, mapping: dict[str, str]) -> list:
    """Rename the tensors of ``source`` (request or response) that ``mapping`` names."""
    out = []
    for src, dst in mapping.items():
        if isinstance(source, dict):
            value = source.get(src)
        else:
            tensor = (pb_utils.get_input_tensor_by_name if hasattr(source, "get_response_sender")
                      else pb_utils.get_output_tensor_by_name)(source, src)
            value = None if tensor is None else tensor.as_numpy()
        if value is not None:
            out.append(pb_utils.Tensor(dst, value))
    return out


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        watch_parent()
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ConfigError(
                "model 'tensorrt_llm_bls' streams and must be decoupled: set "
                "model_transaction_policy { decoupled: true } in its config.pbtxt"
            )
        self.params = model_parameters(args, BlsParams)
        self.version = int(args["model_version"])
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="trillm-bls")
        self._watched: dict[str, object] = {}  # engine call key -> client's response sender
        self._lock = threading.Lock()
        self._closing = threading.Event()
        threading.Thread(target=self._watch, name="trillm-bls-cancel", daemon=True).start()

    def execute(self, requests: list) -> None:
        for request in requests:
            self.pool.submit(self._run, request, GuardedSender(request.get_response_sender()))
        return None

    def _call(self, model: str, inputs: list, outputs: list[str], decoupled: bool = False, request_id: str = ""):
        request = pb_utils.InferenceRequest(
            model_name=model,
            model_version=self.version,
            request_id=request_id,
            inputs=inputs,
            requested_output_names=outputs,
        )
        return request.exec(decoupled=decoupled)

    @staticmethod
    def _check(response, model: str):
        if response.has_error():
            raise BlsError(response.error().message())
        return response

    def _run(self, request, sender) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            pre = self._check(
                self._call("preprocessing", _tensors(request, PRE_INPUTS), list(PRE_TO_ENGINE)), "preprocessing"
            )
            engine_inputs = _tensors(pre, PRE_TO_ENGINE) + _tensors(request, DIRECT_INPUTS)
            key = f"trillm-bls-{uuid.uuid4().hex}"
            with self._lock:
                self._watched[key] = sender
            try:
                stream = self._call("tensorrt_llm", engine_inputs, list(ENGINE_TO_POST), decoupled=True, request_id=key)
                self._relay(stream, sender)
            finally:
                with self._lock:
                    self._watched.pop(key, None)
            sender.send(flags=final)
        except (BlsError, InputError) as exc:
            sender.send(io.error_response(exc), flags=final)
        except Exception as exc:  # a worker must always close its request
            sender.send(io.error_response(RuntimeError(f"tensorrt_llm_bls: {exc!r}")), flags=final)

    def _watch(self) -> None:
        """Poll the clients' cancellation while the engine streams; on cancel,
        stop the engine's call (Triton 2.51 cannot cancel a BLS child request)."""
        while not self._closing.wait(0.02):
            with self._lock:
                watched = list(self._watched.items())
            for key, sender in watched:
                try:
                    if sender.is_cancelled():
                        with self._lock:
                            self._watched.pop(key, None)
                        send_stop(key, self.version)
                except Exception:  # the call ended meanwhile
                    pass

    def finalize(self) -> None:
        self._closing.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _relay(self, stream, sender) -> None:
        """Render each engine response with postprocessing and send it on."""
        for response in stream:
            if sender.is_cancelled():
                continue  # drain: the stop request ends the stream
            self._check(response, "tensorrt_llm")
            if not response.output_tensors():
                continue  # the empty final response of a decoupled stream
            post = self._check(
                self._call("postprocessing", _tensors(response, ENGINE_TO_POST), list(POST_TO_USER)),
                "postprocessing",
            )
            sender.send(pb_utils.InferenceResponse(output_tensors=_tensors(post, POST_TO_USER)))
