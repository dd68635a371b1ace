"""The engine's one configuration dataclass, and the limits derived from it.

:class:`EngineConfig` is what a user (or ``config.pbtxt``) sets; zeros mean
"derive". :func:`resolve_limits` turns it, the checkpoint's shape and the
machine into :class:`EngineLimits`, the concrete numbers the engine runs
with, so that every derivation lives in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# "auto": the fastest correct precision on this CPU, per matmul, measured at load (precision.py).
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Weight-only quantisation of every linear and the LM head (trillm.engine.quant).
QUANTIZATIONS = ("none", "int8", "int4")
QUANT_GROUP_SIZES = (32, 64, 128)
DEFAULT_MAX_MODEL_LEN = 4096
KV_CACHE_MEMORY_FRACTION = 0.25  # of MemAvailable after the weights are loaded
KV_CACHE_MAX_BYTES = 16 << 30
# Prompt tokens per sequence per step. On 2 cores a 128-token chunk of the
# demo model runs at ~97% of the throughput of a 256-token one, and stalls
# the decodes sharing its step half as long (~0.2 s instead of ~0.45 s).
DEFAULT_PREFILL_CHUNK = 128
# Prompt chunks (of different sequences) per step, when the budget is derived. With one,
# a burst of 32 prompts queued behind each other a step apart (TTFT p99 10x p50 at 32
# streams); several per step drain the burst in a quarter of the steps, each step reading
# the weights once for all of them, while every running sequence still decodes each step.
DEFAULT_PREFILL_CHUNKS_PER_STEP = 4


@dataclass
class EngineConfig:
    checkpoint_dir: str
    dtype: str = "auto"  # one of DTYPES
    max_num_seqs: int = 0  # max concurrent sequences; 0 = derive from machine
    max_model_len: int = 0  # prompt+output limit; 0 = min(config.max_position_embeddings, 4096)
    max_num_batched_tokens: int = 0  # tokens per step (prefill chunk budget); 0 = derive
    kv_cache_blocks: int = 0  # 0 = derive from memory (a fraction of free RAM, capped)
    block_size: int = 16
    num_threads: int = 0  # torch intra-op threads; 0 = torch default
    enable_prefix_caching: bool = True
    quantization: str = "none"  # one of QUANTIZATIONS
    # int4: inputs per scale and zero, one of QUANT_GROUP_SIZES. 32: llama.cpp's Q4_0/Q4_1
    # block, and the one size that divides every Llama hidden size (SmolLM2's 576 is not a
    # multiple of 128); 64 is a little faster and less exact (docs/benchmarks.md "Quantisation").
    quant_group_size: int = 32

    def validate(self) -> None:
        """Raise ValueError naming the field and the rule it breaks."""
        if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir):
            raise ValueError("checkpoint_dir: must be a non-empty path")
        if not (Path(self.checkpoint_dir) / "config.json").is_file():
            raise ValueError(f"checkpoint_dir: no config.json in {self.checkpoint_dir}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "kv_cache_blocks", "num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0 (0 = derive), got {value!r}")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size: must be an integer in [1, 1024], got {self.block_size!r}")
        if self.max_num_seqs and self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens: must be >= max_num_seqs ({self.max_num_seqs}) so that every running "
                f"sequence can decode in one step, got {self.max_num_batched_tokens}"
            )
        if self.kv_cache_blocks and self.max_model_len and self.kv_cache_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"kv_cache_blocks: {self.kv_cache_blocks} blocks of {self.block_size} tokens cannot hold one "
                f"sequence of max_model_len {self.max_model_len}"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching: must be a bool, got {self.enable_prefix_caching!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quant_group_size not in QUANT_GROUP_SIZES or isinstance(self.quant_group_size, bool):
            raise ValueError(f"quant_group_size: must be one of {QUANT_GROUP_SIZES}, got {self.quant_group_size!r}")


@dataclass(frozen=True)
class EngineLimits:
    """The concrete numbers an engine runs with (no zeros)."""

    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    kv_cache_blocks: int
    block_size: int
    prefill_chunk: int  # prompt tokens per sequence per step; chunks end at multiples of this


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def resolve_limits(config: EngineConfig, max_position_embeddings: int, kv_bytes_per_token: int) -> EngineLimits:
    """Fill in every derived (zero) field of ``config``.

    ``kv_bytes_per_token`` is the K and V bytes one token takes over all layers.
    """
    config.validate()
    block_size = config.block_size
    if config.max_model_len > max_position_embeddings:
        raise ValueError(
            f"max_model_len: {config.max_model_len} exceeds the checkpoint's "
            f"max_position_embeddings {max_position_embeddings}"
        )
    max_model_len = config.max_model_len or min(max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    # A CPU decode step turns compute-bound at a few rows per core; beyond
    # ~16 sequences per core, more concurrency only stretches latency.
    max_num_seqs = config.max_num_seqs or min(256, 16 * (os.cpu_count() or 1))
    blocks_per_seq = -(-max_model_len // block_size)

    kv_cache_blocks = config.kv_cache_blocks
    if not kv_cache_blocks:
        block_bytes = kv_bytes_per_token * block_size
        budget = min(int(available_memory_bytes() * KV_CACHE_MEMORY_FRACTION), KV_CACHE_MAX_BYTES)
        useful = max_num_seqs * blocks_per_seq  # more blocks than this can never be used at once
        kv_cache_blocks = min(useful, budget // block_bytes)
        if kv_cache_blocks < blocks_per_seq:
            raise ValueError(
                f"kv_cache_blocks: free memory allows only {kv_cache_blocks} blocks, fewer than the "
                f"{blocks_per_seq} one sequence of max_model_len {max_model_len} needs; lower max_model_len"
            )
    elif kv_cache_blocks * block_size < max_model_len:
        if config.max_model_len:
            raise ValueError(
                f"kv_cache_blocks: {kv_cache_blocks} blocks of {block_size} tokens cannot hold one sequence "
                f"of max_model_len {max_model_len}"
            )
        max_model_len = kv_cache_blocks * block_size  # derived length shrinks to what the cache holds

    # Prefill chunks are cut at fixed positions (multiples of prefill_chunk),
    # so a prompt is computed the same way whatever else is running; the token
    # budget must then fit every decode plus one whole chunk (derived: several).
    if config.max_num_batched_tokens:
        max_num_batched_tokens = config.max_num_batched_tokens
        prefill_chunk = max(min(block_size, max_num_batched_tokens), max_num_batched_tokens - max_num_seqs)
    else:
        prefill_chunk = DEFAULT_PREFILL_CHUNK
        max_num_batched_tokens = DEFAULT_PREFILL_CHUNKS_PER_STEP * prefill_chunk + max_num_seqs
    return EngineLimits(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_blocks=kv_cache_blocks,
        block_size=block_size,
        prefill_chunk=prefill_chunk,
    )
