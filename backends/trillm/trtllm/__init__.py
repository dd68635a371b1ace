"""Engine kind ``tensorrt_llm``: TensorRT-LLM engines on NVIDIA GPUs (docs/gpu.md).

| module | job |
|---|---|
| runtime | import ``tensorrt_llm`` lazily, with an error naming what to install |
| config | resolve the engine's configuration from the model parameters |
| sampling | our SamplingParams as TensorRT-LLM's |
| outputs | TensorRT-LLM's streamed outputs as our StepOutputs |
| engine | ``TrtLlmEngine``, the host's Engine on the LLM API |
| manifest | ``trillm-engine.json`` and the version pointer ``engine.json`` |
| build | ``trillm build-engine`` |

Importing this package never imports ``tensorrt_llm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trillm.trtllm.engine import TrtLlmEngine


def create_trtllm_engine(params: Any, version_dir: str | Path | None = None) -> "TrtLlmEngine":
    """The ``tensorrt_llm`` engine for a model's EngineHostParams.

    ``version_dir`` (optional) is the model version directory being loaded;
    an ``engine.json`` there names the engine and wins over ``engine_dir``.
    Raises ConfigError (TrtLlmUnavailable when TensorRT-LLM is missing).
    """
    from trillm.trtllm.config import TrtLlmConfig
    from trillm.trtllm.engine import TrtLlmEngine
    from trillm.trtllm.runtime import load_api

    api = load_api()  # first: a missing install is the error to report, whatever else is wrong
    config = TrtLlmConfig.from_params(params, Path(version_dir) if version_dir is not None else None)
    return TrtLlmEngine(config, api)
