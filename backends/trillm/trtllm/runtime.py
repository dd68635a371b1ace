"""Import TensorRT-LLM lazily, once, with an error that says what to install.

CPU installs never import this package's TensorRT-LLM side: only
:func:`load_api` imports ``tensorrt_llm``, and it is called when a
``tensorrt_llm`` engine is created or built.

Since TensorRT-LLM 1.0, ``tensorrt_llm.LLM`` is the PyTorch-backend LLM; the
LLM that loads and builds TensorRT *engines* is
``tensorrt_llm._tensorrt_engine.LLM`` (NVIDIA's own examples import it from
there). That is the one we use, so we need 1.0 or newer; a later release
removes the TensorRT backend (upstream PR #15918), so we stop below 1.3, the
range this code is written against (SUPPORTED_RANGE, checked at load).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

from trillm.triton.errors import ConfigError

SUPPORTED_RANGE = ">=1.0,<1.3"
_LOWEST, _BELOW = (1, 0, 0), (1, 3, 0)  # the two ends of SUPPORTED_RANGE, as release numbers

INSTALL_HINT = (
    "run inside NVIDIA's Triton TensorRT-LLM image "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3, a release whose TensorRT-LLM is 1.0 to 1.2), "
    f"or `pip install \"tensorrt_llm{SUPPORTED_RANGE}\"` on a Linux host with an NVIDIA GPU and CUDA driver; "
    "see docs/gpu.md"
)

# PEP 440's start: release numbers, then an optional pre-release (a, b, rc) or dev marker.
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(a|b|rc|\.?dev)?")


class TrtLlmUnavailable(ConfigError):
    """TensorRT-LLM cannot be used here; the message says what to install."""


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
    RequestError: type  # what a result stream raises for one failed request (the LLM carries on)


def is_supported(version: str) -> bool:
    """Whether ``version`` is in SUPPORTED_RANGE, as pip reads it (a pre-release of 1.0.0 is below 1.0)."""
    match = _VERSION.match(version)
    if match is None:
        return False
    release = (int(match[1]), int(match[2]), int(match[3] or 0))
    return _LOWEST <= release < _BELOW and not (match[4] and release == _LOWEST)


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
    if not is_supported(version):
        raise TrtLlmUnavailable(
            f"tensorrt_llm {version} is installed, but trillm supports tensorrt_llm{SUPPORTED_RANGE} "
            "(1.0 brought the TensorRT-engine LLM API trillm uses; later releases drop or change it). "
            f"To get a supported one, {INSTALL_HINT}."
        )
    try:
        engine_llm = importlib.import_module("tensorrt_llm._tensorrt_engine")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        executor = importlib.import_module("tensorrt_llm.executor")
        return TrtLlmApi(
            version=version,
            LLM=engine_llm.LLM,
            SamplingParams=trtllm.SamplingParams,
            KvCacheConfig=llmapi.KvCacheConfig,
            BuildConfig=llmapi.BuildConfig,
            QuantConfig=llmapi.QuantConfig,
            QuantAlgo=llmapi.QuantAlgo,
            CalibConfig=llmapi.CalibConfig,
            RequestError=executor.RequestError,
        )
    except (ImportError, AttributeError) as exc:
        raise TrtLlmUnavailable(
            f"tensorrt_llm {version} lacks the LLM API trillm uses "
            f"(tensorrt_llm._tensorrt_engine.LLM, tensorrt_llm.llmapi.KvCacheConfig, "
            f"tensorrt_llm.executor.RequestError, ...: {exc}); {INSTALL_HINT}"
        ) from exc
