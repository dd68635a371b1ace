"""Import TensorRT-LLM lazily, once, with an error that says what to install.

CPU installs never import this package's TensorRT-LLM side: only
:func:`load_api` imports ``tensorrt_llm``, and it is called when a
``tensorrt_llm`` engine is created or built.

Since TensorRT-LLM 1.0, ``tensorrt_llm.LLM`` is the PyTorch-backend LLM; the
LLM that loads and builds TensorRT *engines* is
``tensorrt_llm._tensorrt_engine.LLM`` (NVIDIA's own examples import it from
there). That is the one we use, so we need 1.0 or newer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from trillm.triton.errors import ConfigError

INSTALL_HINT = (
    "run inside NVIDIA's Triton TensorRT-LLM image "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3), or `pip install tensorrt_llm` "
    "(>= 1.0) on a Linux host with an NVIDIA GPU and CUDA driver; see docs/gpu.md"
)


class TrtLlmUnavailable(ConfigError):
    """TensorRT-LLM cannot be imported here; the message says what to install."""


@dataclass(frozen=True)
class TrtLlmApi:
    """The parts of TensorRT-LLM's Python LLM API that trillm calls."""

    version: str
    LLM: Any  # tensorrt_llm._tensorrt_engine.LLM: loads (and builds) TensorRT engines
    SamplingParams: Any
    KvCacheConfig: Any
    BuildConfig: Any
    QuantConfig: Any
    QuantAlgo: Any
    CalibConfig: Any


def load_api() -> TrtLlmApi:
    try:
        trtllm = importlib.import_module("tensorrt_llm")
    except Exception as exc:  # ImportError, or a CUDA/driver error raised at import
        raise TrtLlmUnavailable(
            "the TensorRT-LLM engine (engine_kind 'tensorrt_llm', trillm build-engine) needs the tensorrt_llm "
            f"package and an NVIDIA GPU, but `import tensorrt_llm` failed ({type(exc).__name__}: {exc}). "
            f"To get it, {INSTALL_HINT}. Without a GPU, serve with engine_kind 'torch' (the default)."
        ) from exc
    version = str(getattr(trtllm, "__version__", "unknown"))
    try:
        engine_llm = importlib.import_module("tensorrt_llm._tensorrt_engine")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        return TrtLlmApi(
            version=version,
            LLM=engine_llm.LLM,
            SamplingParams=trtllm.SamplingParams,
            KvCacheConfig=llmapi.KvCacheConfig,
            BuildConfig=llmapi.BuildConfig,
            QuantConfig=llmapi.QuantConfig,
            QuantAlgo=llmapi.QuantAlgo,
            CalibConfig=llmapi.CalibConfig,
        )
    except (ImportError, AttributeError) as exc:
        raise TrtLlmUnavailable(
            f"tensorrt_llm {version} lacks the LLM API trillm uses "
            f"(tensorrt_llm._tensorrt_engine.LLM, tensorrt_llm.llmapi.KvCacheConfig, ...: {exc}); "
            f"TensorRT-LLM 1.0 or newer is needed: {INSTALL_HINT}"
        ) from exc
