"""A FAKE ``tensorrt_llm`` for CPU contract tests. It is not TensorRT-LLM.

It implements only the LLM API surface trillm calls, with TensorRT-LLM 1.x's
names (``tensorrt_llm.SamplingParams``, ``tensorrt_llm._tensorrt_engine.LLM``,
``tensorrt_llm.llmapi.{KvCacheConfig, BuildConfig, QuantConfig, QuantAlgo,
CalibConfig}``) and behaviour, so that a wrong argument name or a broken
mapping fails here:

- constructors take keyword arguments only and refuse unknown ones;
- ``LLM.generate_async`` needs a running event loop (as the real one does for
  async iteration), refuses prompt + max_tokens over the engine's max_seq_len
  with ValueError, and returns a result that streams cumulative
  ``outputs[0].token_ids`` / ``logprobs`` with ``finished`` and
  ``finish_reason`` ("length", "stop" for end_id, "cancelled" after abort()).

Tokens are deterministic: each is the previous token + 1 (mod vocab), starting
from the prompt's last token. Every call is recorded on the instances.
``install(monkeypatch)`` puts the fake in ``sys.modules``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__version__ = "1.0.0-fake"


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """The LLM API's SamplingParams fields (names and defaults of TensorRT-LLM 1.x)."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: Any | None = None
    bad_token_ids: list[int] | None = None
    _bad_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    stop: Any | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
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

    def _get_bad_words(self) -> list[list[int]]:
        """What the real executor is given as the request's bad words."""
        words = [[i] for i in self.bad_token_ids or []]
        if self.bad is None:
            return words
        if self._bad_word_ids is None:
            raise RuntimeError("SamplingParams.bad is not processed by tokenizer")
        return words + self._bad_word_ids


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
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
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
    fail_after_steps: int | None = None  # raise RuntimeError on this step
    logprobs_as_floats: bool = False  # runtime log-probs (floats) instead of top-k dicts


class RequestOutput:
    """What generate_async returns: an async iterator over itself."""

    def __init__(self, llm: "LLM", prompt: list[int], params: SamplingParams, streaming: bool) -> None:
        self.llm, self.prompt_token_ids, self.sampling_params, self.streaming = llm, prompt, params, streaming
        self.outputs = [CompletionOutput(0)]
        self.finished = False
        self.aborted = False
        self.steps = 0
        self._last = prompt[-1]

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> "RequestOutput":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self.finished:
            raise StopAsyncIteration
        behaviour = self.llm.behaviour
        if behaviour.step_delay:
            await asyncio.sleep(behaviour.step_delay)
        else:
            await asyncio.sleep(0)
        self.steps += 1
        if behaviour.fail_after_steps is not None and self.steps > behaviour.fail_after_steps:
            raise RuntimeError("fake runtime failure")
        out = self.outputs[0]
        if self.aborted:
            self.finished, out.finish_reason = True, "cancelled"
            return self
        if behaviour.empty_first_step and self.steps == 1:
            return self
        params = self.sampling_params
        end_id = None if params.ignore_eos else params.end_id
        stop_ids = set(params.stop_token_ids or ())
        for _ in range(behaviour.tokens_per_step):
            token = (self._last + 1) % self.llm.vocab_size
            self._last = token
            if token == end_id or token in stop_ids:
                if behaviour.include_end_id or (token in stop_ids and params.include_stop_str_in_output):
                    self._append(token)
                self.finished, out.finish_reason = True, "stop"
                break
            self._append(token)
            if len(out.token_ids) >= params.max_tokens:
                self.finished, out.finish_reason = True, "length"
                break
        return self

    def _append(self, token: int) -> None:
        out = self.outputs[0]
        out.token_ids.append(token)
        if self.sampling_params.logprobs:
            value = -0.5 - 0.01 * len(out.token_ids)
            entry: Any = value if self.llm.behaviour.logprobs_as_floats else {
                token: Logprob(value, rank=1), token + 1: Logprob(value - 1.0, rank=2),
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
        config = json.loads((self.model / "config.json").read_text())
        if "build_config" in config:  # a saved engine
            self.max_seq_len = config["build_config"]["max_seq_len"]
            self.vocab_size = config["pretrained_config"]["vocab_size"]
        else:  # a Hugging Face checkpoint: build
            self.max_seq_len = kwargs["build_config"].max_seq_len
            self.vocab_size = config["vocab_size"]
        LLM.instances.append(self)

    def generate_async(self, inputs: Any, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> RequestOutput:
        asyncio.get_running_loop()  # the real result binds its async queue to the running loop
        if not (isinstance(inputs, list) and all(isinstance(t, int) for t in inputs)):
            raise TypeError(f"inputs must be a list of token ids, got {inputs!r}")
        params = sampling_params or SamplingParams()
        if params.end_id is None and self.kwargs.get("skip_tokenizer_init"):
            raise ValueError("tokenizer is required to reset end_id if it is None")
        params._get_bad_words()  # what the executor would do with them
        if len(inputs) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({len(inputs)}) and max_tokens ({params.max_tokens}) "
                f"should not exceed max_seq_len ({self.max_seq_len})"
            )
        result = RequestOutput(self, list(inputs), params, streaming)
        self.requests.append(result)
        return result

    def save(self, engine_dir: str) -> None:
        out = Path(engine_dir)
        out.mkdir(parents=True, exist_ok=True)
        build = self.kwargs["build_config"]
        config = {
            "version": __version__,
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


def install(monkeypatch: Any) -> types.ModuleType:
    """Make ``import tensorrt_llm`` (and its submodules we use) import this fake."""
    LLM.instances = []
    root = sys.modules[__name__]
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine.LLM = LLM
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    for name in ("KvCacheConfig", "BuildConfig", "QuantConfig", "QuantAlgo", "CalibConfig", "SamplingParams"):
        setattr(llmapi, name, getattr(root, name))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    return root
