"""trillm's CPU inference engine for Llama-architecture Hugging Face checkpoints.

``TorchEngine(EngineConfig(checkpoint_dir=...))`` loads the weights and starts
one engine-loop thread (continuous batching over a paged KV cache, chunked
prefill, prefix caching); requests go in with ``submit`` and come back as
``StepOutput`` callbacks. See ``torch_engine.py`` for the threading contract
and ``scheduler.py`` for the scheduling policy.
"""

from trillm.engine.config import EngineConfig
from trillm.engine.torch_engine import TorchEngine
from trillm.engine.types import FinishReason, GenerationRequest, SamplingParams, StepOutput

__all__ = ["EngineConfig", "TorchEngine", "FinishReason", "GenerationRequest", "SamplingParams", "StepOutput"]
