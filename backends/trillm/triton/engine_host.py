"""``tensorrt_llm``: the decoupled engine host (INTERFACE.md "Internal models").

Keeps NVIDIA's model name and tensors so existing clients work; the engine
behind it is chosen by the ``engine_kind`` parameter (``torch`` on any CPU).
``execute`` only parses, validates and enqueues; responses are sent from the
host's responder thread (trillm.host).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from trillm.host import GenerationHost, HostRequest, HostResponse
from trillm.options import ENGINE_OPTIONS, TENSORRT_LLM, first_problem, model_options, option_fields
from trillm.tokenizer import load_tokenizer
from trillm.triton import io
from trillm.triton import tensors as T
from trillm.triton.errors import ConfigError, InputError, ServerUnavailable
from trillm.triton.lifecycle import drain_deadline, mark_drained, watch_parent
from trillm.triton.metrics import HostMetrics
from trillm.triton.params import model_parameters, version_dir
from trillm.triton.sender import GuardedSender


@dataclass
@option_fields(model_options(TENSORRT_LLM))
class EngineHostParams:
    """This model's parameters: a field per option of trillm.options that names ``tensorrt_llm``."""

    def validate(self) -> None:
        broken = first_problem(self, model_options(TENSORRT_LLM))
        if broken:
            name, problem = broken
            raise ConfigError(f"parameter '{name}': {problem}")


def create_engine(params: EngineHostParams, version_dir: str | None = None):
    """The engine ``engine_kind`` names; TensorRT-LLM is imported only when asked for."""
    if params.engine_kind == "tensorrt_llm":
        from trillm.trtllm import create_trtllm_engine

        # A version's engine.json (written by `trillm build-engine`) wins over engine_dir.
        return create_trtllm_engine(params, version_dir=version_dir)
    from trillm.engine import EngineConfig, TorchEngine

    config = EngineConfig(checkpoint_dir=params.checkpoint_dir,
                          **{option.name: getattr(params, option.name) for option in ENGINE_OPTIONS})
    config.validate()
    return TorchEngine(config)


def parse_rows(request, default_exclude: bool) -> list[HostRequest]:
    """One HostRequest per batch row of a ``tensorrt_llm`` request."""
    ids = io.required_input(request, T.ENG_INPUT_IDS, "input_ids")
    lengths = io.optional_input(request, T.ENG_INPUT_LENGTHS)
    out_len = io.required_input(request, T.ENG_OUTPUT_LEN, "max_tokens")
    get = lambda name: io.optional_input(request, name)  # noqa: E731
    sampling = {user: (spec, get(spec.name)) for user, spec in T.SAMPLING_INPUTS.items()}
    stop, bad = get(T.ENG_STOP_WORDS), get(T.ENG_BAD_WORDS)
    end_id, streaming, exclude = get(T.ENG_END_ID), get(T.ENG_STREAMING), get(T.ENG_EXCLUDE_INPUT)
    rows = []
    for b in range(ids.shape[0]):
        row_ids = np.asarray(ids[b]).reshape(-1)
        n = int(io.row_scalar(lengths, b, "input_lengths", row_ids.size))
        if not 0 <= n <= row_ids.size:
            raise InputError("input_lengths", f"must be in [0, {row_ids.size}], got {n}")
        values = {}
        for user, (spec, array) in sampling.items():
            value = io.row_scalar(array, b, user, spec.default)
            if value is not None:
                value = bool(value) if spec.dtype is np.bool_ else (float(value) if spec.dtype is np.float32 else int(value))
            values[user] = value
        rows.append(
            HostRequest(
                input_ids=[int(t) for t in row_ids[:n]],
                max_tokens=int(io.row_scalar(out_len, b, "max_tokens")),
                streaming=bool(io.row_scalar(streaming, b, "stream", False)),
                exclude_input=bool(io.row_scalar(exclude, b, "exclude_input_in_output", default_exclude)),
                stop_words=io.from_word_list(None if stop is None else stop[b]),
                bad_words=io.from_word_list(None if bad is None else bad[b]),
                end_id=io.row_scalar(end_id, b, "end_id"),
                **values,
            )
        )
    return rows


def triton_error(message: str, unavailable: bool = False):
    """A TritonError; UNAVAILABLE (HTTP 503) for a server fault, where this Triton has codes."""
    code = getattr(pb_utils.TritonError, "UNAVAILABLE", None) if unavailable else None
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def to_triton(response: HostResponse, key: int = 0):
    """A HostResponse as the model's output tensors (batch dimension 1)."""
    if response.error is not None:
        return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(response.error, response.unavailable))
    ids = np.asarray(response.output_ids, dtype=np.int32).reshape(1, 1, -1)
    one = lambda v, dtype=np.int32: np.asarray([[v]], dtype=dtype)  # noqa: E731
    outputs = [
        (T.ENG_OUT_IDS, ids),
        (T.ENG_OUT_SEQ_LEN, one(ids.shape[2])),
        (T.ENG_OUT_PREFIX_LEN, one(response.prefix_length)),
        (T.ENG_OUT_TEXT_LEN, one(response.text_length)),
        (T.ENG_OUT_CUM_LOG_PROBS, one(response.cum_log_prob, np.float32)),
        (T.ENG_OUT_LOG_PROBS, np.asarray(response.output_log_probs, dtype=np.float32).reshape(1, 1, -1)),
        (T.ENG_OUT_BATCH_INDEX, one(response.batch_index)),
        (T.ENG_OUT_SEQ_INDEX, one(response.sequence_index)),
        (T.ENG_OUT_NUM_INPUT, one(response.num_input_tokens)),
        (T.ENG_OUT_NUM_OUTPUT, one(response.num_output_tokens)),
        (T.ENG_OUT_FINISH_REASON, np.asarray([[response.finish_reason.encode()]], dtype=object)),
        (T.ENG_OUT_REQUEST_KEY, one(key, np.uint64)),
    ]
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in outputs])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        watch_parent()
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ConfigError(
                "model 'tensorrt_llm' streams and must be decoupled: set "
                "model_transaction_policy { decoupled: true } in its config.pbtxt"
            )
        # config.pbtxt's parameters, overridden by this version's parameters.json
        self.params = model_parameters(args, EngineHostParams)
        self.metrics = HostMetrics(args.get("model_name", "tensorrt_llm"), args.get("model_version", "1"))
        directory = version_dir(args)
        engine = create_engine(self.params, None if directory is None else str(directory))
        tokenizer = load_tokenizer(self.params.tokenizer_dir or self.params.checkpoint_dir)
        self.host = GenerationHost(engine, tokenizer, self.params.skip_special_tokens, observe=self.metrics.observe)
        # Keys name calls for stop requests (see postprocessing/bls); random start
        # so a key from before a restart never matches a new call.
        self._keys = itertools.count(random.getrandbits(40) << 20)
        self._stop = threading.Event()
        self._stats_thread = threading.Thread(target=self._publish_stats, name="trillm-metrics", daemon=True)
        self._stats_thread.start()

    def _publish_stats(self) -> None:
        """Every 0.1 s: the engine's stats into the metrics, and the launcher's drain request to the host."""
        while not self._stop.wait(0.1):
            left = drain_deadline()
            if left is not None:
                self.host.drain(left)
                if self.host.num_calls == 0:
                    mark_drained()
            try:
                self.metrics.update(self.host.engine.stats())
            except Exception:  # metrics must never take the model down
                pass

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = GuardedSender(request.get_response_sender())
            try:
                if io.row_scalar(io.optional_input(request, T.ENG_STOP), 0, "stop", False):
                    # A stop request (TensorRT-LLM backend semantics): cancel the call
                    # whose key or request id is this request's id.
                    self.host.cancel_key(request.request_id())
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                rows = parse_rows(request, self.params.default_exclude_input_in_output)
                key = next(self._keys)
                self.host.start(
                    rows,
                    send=lambda r, s=sender, k=key: self._send(s, r, k),
                    is_cancelled=sender.is_cancelled,
                    keys=(str(key), request.request_id()),
                )
            except InputError as exc:
                sender.send(io.error_response(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except ServerUnavailable as exc:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=triton_error(str(exc), True)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    @staticmethod
    def _send(sender, response: HostResponse, key: int) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if response.final else 0
        try:
            sender.send(to_triton(response, key), flags=flags)
        except Exception:
            if response.final:  # the client went away; still close the request
                try:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:
                    pass

    def finalize(self) -> None:
        self._stop.set()
        self._stats_thread.join(timeout=5)
        self.host.shutdown()
        self.metrics.close()
