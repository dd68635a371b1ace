"""A FAKE ``tensorrt_llm`` for CPU contract tests. It is not TensorRT-LLM.

It implements only the LLM API surface trillm calls, with TensorRT-LLM 1.x's
names (``tensorrt_llm.SamplingParams``, ``tensorrt_llm._tensorrt_engine.LLM``,
``tensorrt_llm.llmapi.{KvCacheConfig, BuildConfig, QuantConfig, QuantAlgo,
CalibConfig}``, ``tensorrt_llm.executor.RequestError``) and the behaviour read
from its sources (llmapi/llm.py, llmapi/llm_args.py, sampling_params.py,
executor/worker.py, executor/result.py, and the C++ SamplingConfig checks), so
that a wrong argument or a path that only works on a kind API fails here:

- constructors take keyword arguments only and refuse unknown ones;
  ``SamplingParams`` validates as the LLM API does (best_of >= n, no greedy
  best_of > 1), and the runtime checks (top_k >= 0, top_p in (0, 1],
  temperature >= 0, seed a uint64, ...) run when a request is enqueued, where a
  failure is a ``RequestError`` raised by ``generate_async``; the request must
  pickle (the LLM sends it to an executor worker process);
- ``LLM(...)`` refuses runtime max_batch_size / max_num_tokens above the
  engine's build limits;
- ``LLM.generate_async`` needs a running event loop, refuses prompt +
  max_tokens over max_seq_len with ValueError, and returns a result that
  streams cumulative ``outputs[0].token_ids`` / ``logprobs`` with ``finished``
  and ``finish_reason`` ("length"; "stop" for end_id or a stop token, which is
  dropped; "cancelled");
- a prompt over the engine's max_input_len (or max_num_tokens) fails from
  inside the stream with ``RequestError``, as the executor reports requests it
  cannot schedule; so does a per-request failure (Behaviour.fail_after_steps);
  a fatal one (Behaviour.fatal_after_steps) stops the executor: the failing
  stream raises RuntimeError and no other stream ever moves again;
- ``abort()`` only asks: the stream goes on for Behaviour.cancel_after_steps
  more steps before its "cancelled" output arrives;
- decoding is a tiny sampler over real logits (torch): the preferred token is
  the previous token + 1 (mod vocab), starting from the prompt's last token;
  bad words, end_id before min_tokens (default 1, as the runtime's) and the
  request's logits processor can rule tokens out, and the next preferred
  allowed one is taken.

``install(monkeypatch, version=...)`` puts the fake in ``sys.modules``; a
version below 1.2 gets the SamplingParams without ``prompt_ignore_length``.
Every call is recorded on the instances.
"""

from __future__ import annotations

import asyncio
import enum
import json
import pickle
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__version__ = "1.2.0"
UINT64_LIMIT = 2**64


class RequestError(RuntimeError):
    """``tensorrt_llm.executor.RequestError``: one request failed; the LLM carries on."""


@dataclass(slots=True, kw_only=True)
class SamplingParamsBefore12:
    """The LLM API's SamplingParams fields trillm may touch (names and defaults of TensorRT-LLM 1.0 and 1.1)."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: Any | None = None
    bad_token_ids: list[int] | None = None
    _bad_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    stop: Any | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any | None = None
    logits_processor: Any | None = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    min_p: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    exclude_input_from_output: bool = True
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.best_of > 1 and self._greedy_decoding:
            raise ValueError(
                f"Greedy decoding in the LLM API does not allow multiple returns, got best_of={self.best_of}")
        self.logprobs = self.logprobs and int(self.logprobs)

    @property
    def _greedy_decoding(self) -> bool:
        return not self.use_beam_search and self.top_k in (None, 1) and self.top_p in (None, 0.0)

    def _get_bad_words(self) -> list[list[int]]:
        """What the real executor is given as the request's bad words."""
        words = [[i] for i in self.bad_token_ids or []]
        if self.bad is None:
            return words
        if self._bad_word_ids is None:
            raise RuntimeError("SamplingParams.bad is not processed by tokenizer")
        return words + self._bad_word_ids

    def _check_sampling_config(self) -> None:
        """The checks of the C++ executor's SamplingConfig (TLLM_CHECK), run when a request is enqueued."""
        checks = [
            (self.top_k is None or self.top_k >= 0, "topK >= 0"),
            (self.top_p is None or 0.0 < self.top_p <= 1.0, "topP > 0.f && topP <= 1.f"),
            (self.temperature is None or self.temperature >= 0.0, "temperature >= 0.f"),
            (self.min_tokens is None or self.min_tokens >= 0, "minTokens >= 0"),
            (self.repetition_penalty is None or self.repetition_penalty > 0.0, "repetitionPenalty > 0.f"),
            (self.seed is None or 0 <= self.seed < UINT64_LIMIT, "seed is a uint64"),
            (self.min_p is None or 0.0 <= self.min_p <= 1.0, "minP in [0, 1]"),
            (getattr(self, "prompt_ignore_length", None) is None or self.prompt_ignore_length >= 0,
             "promptIgnoreLength >= 0"),
            (self.logits_processor is None or callable(self.logits_processor), "a callable logits post-processor"),
        ]
        for ok, rule in checks:
            if not ok:
                raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: {rule}")


@dataclass(slots=True, kw_only=True)
class SamplingParams(SamplingParamsBefore12):
    """TensorRT-LLM 1.2's SamplingParams: presence and frequency penalties can skip the prompt."""

    prompt_ignore_length: int | None = None


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = None


@dataclass(kw_only=True)
class BuildConfig:
    max_batch_size: int = 2048
    max_input_len: int = 1024
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    max_beam_width: int = 1


class QuantAlgo(str, enum.Enum):
    FP8 = "FP8"
    W4A16_AWQ = "W4A16_AWQ"
    NVFP4 = "NVFP4"


@dataclass(kw_only=True)
class QuantConfig:
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None


@dataclass(kw_only=True)
class CalibConfig:
    calib_dataset: str = "cnn_dailymail"
    calib_batches: int = 512
    calib_max_seq_length: int = 512


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None


# The LLM keyword arguments trillm may use (a subset of TrtLlmArgs; the real LLM refuses unknown ones too).
LLM_ARGS = {
    "model", "tokenizer", "skip_tokenizer_init", "dtype", "build_config", "quant_config", "calib_config",
    "kv_cache_config", "max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len",
    "gather_generation_logits", "tensor_parallel_size", "enable_chunked_prefill",
}


@dataclass
class Behaviour:
    """How the fake runtime behaves; tests change it per LLM instance."""

    tokens_per_step: int = 1
    step_delay: float = 0.0  # seconds between streamed steps
    empty_first_step: bool = False  # a first response with no new tokens
    include_end_id: bool = False  # whether the end_id token appears in token_ids
    fail_after_steps: int | None = None  # this request fails (RequestError) on the next step
    fatal_after_steps: int | None = None  # the executor stops on the next step
    cancel_after_steps: int = 2  # steps a request still streams after abort()
    logprobs_as_floats: bool = False  # runtime log-probs (floats) instead of top-k dicts
    logprobs_per_response: bool = False  # only the latest response's log-probs, as computed from its logits


class RequestOutput:
    """What generate_async returns: an async iterator over itself."""

    def __init__(self, llm: "LLM", client_id: int, prompt: list[int], params: SamplingParams,
                 streaming: bool) -> None:
        self.llm, self.client_id, self.prompt_token_ids = llm, client_id, prompt
        self.sampling_params, self.streaming = params, streaming
        self.outputs = [CompletionOutput(0)]
        self.finished = False
        self.aborted = False
        self.steps = 0
        self.steps_after_abort = 0
        self._last = prompt[-1]

    def abort(self) -> None:
        if self.finished:  # the real executor no longer knows the request
            raise RuntimeError(f"Request of client_id {self.client_id} is finished, cannot abort it.")
        self.aborted = True

    def __aiter__(self) -> "RequestOutput":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self.finished:
            raise StopAsyncIteration
        llm, behaviour = self.llm, self.llm.behaviour
        await asyncio.sleep(behaviour.step_delay)
        if llm.stopped.is_set():  # an executor that has stopped never answers again
            await asyncio.Event().wait()
        self.steps += 1
        if behaviour.fatal_after_steps is not None and self.steps > behaviour.fatal_after_steps:
            llm.stopped.set()
            raise RuntimeError("fake executor failure: the executor has shut down")
        if behaviour.fail_after_steps is not None and self.steps > behaviour.fail_after_steps:
            raise RequestError("fake per-request failure")
        if llm.refusal(self.prompt_token_ids) is not None:
            raise RequestError(llm.refusal(self.prompt_token_ids))
        out = self.outputs[0]
        if out.logprobs and behaviour.logprobs_per_response:
            out.logprobs = []
        if self.aborted:
            self.steps_after_abort += 1
            if self.steps_after_abort > behaviour.cancel_after_steps:
                self.finished, out.finish_reason = True, "cancelled"
                return self
        if behaviour.empty_first_step and self.steps == 1:
            return self
        params = self.sampling_params
        end_id = None if params.ignore_eos else params.end_id
        stop_ids = set(params.stop_token_ids or ())
        for _ in range(behaviour.tokens_per_step):
            token = self._decode()
            self._last = token
            if token == end_id or token in stop_ids:
                if (token == end_id and behaviour.include_end_id) or (
                        token in stop_ids and params.include_stop_str_in_output):
                    self._append(token)
                self.finished, out.finish_reason = True, "stop"
                break
            self._append(token)
            if len(out.token_ids) >= params.max_tokens:
                self.finished, out.finish_reason = True, "length"
                break
        return self

    def _decode(self) -> int:
        """The next token: the preferred one (previous + 1) unless ruled out, then the next allowed."""
        vocab = self.llm.vocab_size
        params, generated = self.sampling_params, self.outputs[0].token_ids
        preferred = (self._last + 1) % vocab
        logits = -((torch.arange(vocab) - preferred) % vocab).to(torch.float32).view(1, 1, vocab)
        sequence = self.prompt_token_ids + generated
        min_tokens = 1 if params.min_tokens is None else params.min_tokens
        if params.end_id is not None and not params.ignore_eos and len(generated) < min_tokens:
            logits[..., params.end_id] = float("-inf")
        for word in params._get_bad_words():
            if sequence[len(sequence) - len(word) + 1:] == word[:-1]:
                logits[..., word[-1]] = float("-inf")
        if params.logits_processor is not None:
            params.logits_processor(self.client_id, logits, [list(sequence)], None, self.client_id)
        return int(logits.view(-1).argmax())

    def _append(self, token: int) -> None:
        out = self.outputs[0]
        out.token_ids.append(token)
        if self.sampling_params.logprobs:
            value = -0.5 - 0.01 * len(out.token_ids)
            entry: Any = value if self.llm.behaviour.logprobs_as_floats else {
                token: Logprob(value, rank=1), (token + 1) % self.llm.vocab_size: Logprob(value - 1.0, rank=2),
            }
            out.logprobs.append(entry)


class LLM:
    """``tensorrt_llm._tensorrt_engine.LLM``: builds from a checkpoint, or loads a saved engine."""

    instances: list["LLM"] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - LLM_ARGS
        if unknown:
            raise ValueError(f"LLM got invalid argument: {sorted(unknown)}")
        self.model = Path(model)
        self.kwargs = kwargs
        self.behaviour = Behaviour()
        self.requests: list[RequestOutput] = []
        self.saved_to: Path | None = None
        self.shut_down = False
        self.stopped = asyncio.Event()  # only ever awaited on the caller's loop
        config = json.loads((self.model / "config.json").read_text())
        if "build_config" in config:  # a saved engine: its build config is the one that counts
            build = BuildConfig(**{k: v for k, v in config["build_config"].items() if k in BuildConfig.__annotations__})
            self.vocab_size = config["pretrained_config"]["vocab_size"]
        else:  # a Hugging Face checkpoint: build
            build = kwargs["build_config"]
            self.vocab_size = config["vocab_size"]
        for name in ("max_batch_size", "max_num_tokens"):  # TrtLlmArgs.validate_build_config_with_runtime_params
            if kwargs.get(name) is not None and kwargs[name] > getattr(build, name):
                raise ValueError(f"{name} [{kwargs[name]}] is greater than build_config.{name} "
                                 f"[{getattr(build, name)}] in build_config")
        self.build = build
        self.max_seq_len = build.max_seq_len
        self._client_ids = iter(range(1, 2**62))
        LLM.instances.append(self)

    def refusal(self, prompt: list[int]) -> str | None:
        """Why the executor cannot schedule this prompt, if it cannot."""
        max_num_tokens = self.kwargs.get("max_num_tokens") or self.build.max_num_tokens
        if len(prompt) > self.build.max_input_len:
            return f"Prompt length ({len(prompt)}) exceeds maximum input length ({self.build.max_input_len})."
        if not self.kwargs.get("enable_chunked_prefill") and len(prompt) > max_num_tokens:
            return f"Prompt length ({len(prompt)}) exceeds the maximum number of tokens ({max_num_tokens})."
        return None

    def generate_async(self, inputs: Any, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> RequestOutput:
        asyncio.get_running_loop()  # the real result binds its async queue to the running loop
        if self.stopped.is_set():
            raise RuntimeError("the executor has shut down")
        if not (isinstance(inputs, list) and all(isinstance(t, int) for t in inputs)):
            raise TypeError(f"inputs must be a list of token ids, got {inputs!r}")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParamsBefore12):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got {type(params)}")
        if params.end_id is None and self.kwargs.get("skip_tokenizer_init"):
            raise ValueError("tokenizer is required to reset end_id if it is None")
        if params.n > self.build.max_batch_size:
            raise ValueError(f"SamplingParams.n ({params.n}) should not exceed max_batch_size "
                             f"({self.build.max_batch_size})")
        if len(inputs) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({len(inputs)}) and max_tokens ({params.max_tokens}) "
                f"should not exceed max_seq_len ({self.max_seq_len})"
            )
        try:  # what the executor worker does with the request (_enqueue_request)
            pickle.dumps(params)
            params._check_sampling_config()
            params._get_bad_words()
        except Exception as exc:
            raise RequestError(str(exc)) from exc
        result = RequestOutput(self, next(self._client_ids), list(inputs), params, streaming)
        self.requests.append(result)
        return result

    def save(self, engine_dir: str) -> None:
        out = Path(engine_dir)
        out.mkdir(parents=True, exist_ok=True)
        build = self.kwargs["build_config"]
        config = {
            "version": sys.modules["tensorrt_llm"].__version__,
            "pretrained_config": {"vocab_size": self.vocab_size, "dtype": self.kwargs.get("dtype")},
            "build_config": {
                "max_batch_size": build.max_batch_size,
                "max_input_len": build.max_input_len,
                "max_seq_len": build.max_seq_len,
                "max_num_tokens": build.max_num_tokens,
            },
        }
        (out / "config.json").write_text(json.dumps(config))
        (out / "rank0.engine").write_bytes(b"fake engine")
        self.saved_to = out

    def shutdown(self) -> None:
        self.shut_down = True


def install(monkeypatch: Any, version: str = __version__) -> types.ModuleType:
    """Make ``import tensorrt_llm`` (and its submodules we use) import this fake, reporting ``version``."""
    LLM.instances = []
    root = sys.modules[__name__]
    monkeypatch.setattr(root, "__version__", version)
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if release < (1, 2):
        monkeypatch.setattr(root, "SamplingParams", SamplingParamsBefore12)
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine.LLM = LLM
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    for name in ("KvCacheConfig", "BuildConfig", "QuantConfig", "QuantAlgo", "CalibConfig", "SamplingParams"):
        setattr(llmapi, name, getattr(root, name))
    executor = types.ModuleType("tensorrt_llm.executor")
    executor.RequestError = RequestError
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.executor", executor)
    return root
