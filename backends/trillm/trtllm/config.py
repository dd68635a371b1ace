"""The TensorRT-LLM engine's configuration, resolved once from the model's parameters.

What each ``tensorrt_llm`` model parameter means for this engine kind:

| parameter | here |
|---|---|
| engine_dir | the engine (a version's ``engine.json`` pointer overrides it) |
| max_model_len | capped at the engine's build max_seq_len (0 = that) |
| (prompt length) | at most the engine's max_input_len and the runtime max_num_tokens (no chunked prefill) |
| max_num_seqs | runtime max_batch_size, at most the engine's (0 = the engine's) |
| max_num_batched_tokens | runtime max_num_tokens, at most the engine's (0 = the engine's) |
| kv_cache_blocks x block_size | KvCacheConfig.max_tokens (0 = TensorRT-LLM's share of free GPU memory) |
| enable_prefix_caching | KvCacheConfig.enable_block_reuse |
| dtype, num_threads | unused: the dtype is built into the engine |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trillm.trtllm.manifest import read_pointer
from trillm.triton.errors import ConfigError


@dataclass(frozen=True)
class EngineLimits:
    """What a built engine allows, from its ``config.json``."""

    max_seq_len: int
    max_input_len: int
    max_batch_size: int
    max_num_tokens: int
    vocab_size: int

    @classmethod
    def read(cls, engine_dir: Path) -> "EngineLimits":
        path = Path(engine_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
            build, pretrained = config["build_config"], config["pretrained_config"]
            return cls(
                max_seq_len=int(build["max_seq_len"]),
                max_input_len=int(build["max_input_len"]),
                max_batch_size=int(build["max_batch_size"]),
                max_num_tokens=int(build["max_num_tokens"]),
                vocab_size=int(pretrained["vocab_size"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{engine_dir} is not a TensorRT-LLM engine directory ({path}: {exc!r}); "
                "build one with `trillm build-engine --checkpoint DIR --out ENGINE_DIR`"
            ) from exc


@dataclass(frozen=True)
class TrtLlmConfig:
    engine_dir: Path
    max_model_len: int
    max_input_len: int  # the longest prompt the runtime takes
    vocab_size: int
    max_batch_size: int = 0  # 0 = the engine's
    max_num_tokens: int = 0  # 0 = the engine's
    kv_cache_max_tokens: int = 0  # 0 = TensorRT-LLM's default share of free GPU memory
    enable_block_reuse: bool = True

    @classmethod
    def from_params(cls, params: Any, version_dir: Path | None = None) -> "TrtLlmConfig":
        """Resolve from the ``tensorrt_llm`` model's EngineHostParams.

        ``version_dir`` is the model version directory being loaded; its
        ``engine.json`` (written by ``trillm build-engine --model-repository``)
        names that version's engine and wins over ``engine_dir``.
        """
        engine_dir = read_pointer(version_dir) if version_dir is not None else None
        if engine_dir is None:
            if not params.engine_dir:
                raise ConfigError(
                    "engine_kind 'tensorrt_llm' needs an engine: set parameter 'engine_dir' "
                    "(trillm serve --engine tensorrt_llm --engine-dir DIR), built by `trillm build-engine`"
                )
            engine_dir = Path(params.engine_dir)
        limits = EngineLimits.read(engine_dir)
        max_num_tokens = (
            _capped(params.max_num_batched_tokens, limits.max_num_tokens) if params.max_num_batched_tokens else 0
        )
        return cls(
            engine_dir=engine_dir,
            max_model_len=_capped(params.max_model_len, limits.max_seq_len),
            # Without chunked prefill a prompt is one engine step: it must fit max_num_tokens too.
            max_input_len=min(limits.max_input_len, max_num_tokens or limits.max_num_tokens),
            vocab_size=limits.vocab_size,
            max_batch_size=_capped(params.max_num_seqs, limits.max_batch_size) if params.max_num_seqs else 0,
            max_num_tokens=max_num_tokens,
            kv_cache_max_tokens=params.kv_cache_blocks * params.block_size,
            enable_block_reuse=params.enable_prefix_caching,
        )

    def llm_kwargs(self, kv_cache_config_cls: Any) -> dict[str, Any]:
        """Keyword arguments of ``tensorrt_llm._tensorrt_engine.LLM`` for this engine."""
        kv_cache: dict[str, Any] = {"enable_block_reuse": self.enable_block_reuse}
        if self.kv_cache_max_tokens:
            kv_cache["max_tokens"] = self.kv_cache_max_tokens
        kwargs: dict[str, Any] = {
            "model": str(self.engine_dir),
            # We send token ids and read token ids; the host owns the tokenizer.
            "skip_tokenizer_init": True,
            "kv_cache_config": kv_cache_config_cls(**kv_cache),
            # Needed for log-probs on TensorRT engines (they come from the generation logits).
            "gather_generation_logits": True,
        }
        if self.max_batch_size:
            kwargs["max_batch_size"] = self.max_batch_size
        if self.max_num_tokens:
            kwargs["max_num_tokens"] = self.max_num_tokens
        return kwargs


def _capped(requested: int, limit: int) -> int:
    return min(requested, limit) if requested > 0 else limit
