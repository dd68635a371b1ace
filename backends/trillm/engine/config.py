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

from trillm.options import DTYPES, ENGINE_OPTIONS, QUANT_GROUP_SIZES, QUANTIZATIONS, first_problem, option_fields

__all__ = ["DTYPES", "QUANTIZATIONS", "QUANT_GROUP_SIZES", "EngineConfig", "EngineLimits", "resolve_limits"]

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
@option_fields(ENGINE_OPTIONS)
class EngineConfig:
    """The checkpoint, then a field per engine option (``engine=True`` in trillm.options, whose
    entries say what each means, its default and its rule; zeros derive)."""

    checkpoint_dir: str

    def validate(self) -> None:
        """Raise ValueError naming the field and the rule it breaks."""
        if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir):
            raise ValueError("checkpoint_dir: must be a non-empty path")
        if not (Path(self.checkpoint_dir) / "config.json").is_file():
            raise ValueError(f"checkpoint_dir: no config.json in {self.checkpoint_dir}")
        broken = first_problem(self, ENGINE_OPTIONS)
        if broken:
            name, problem = broken
            raise ValueError(f"{name}: {problem}")
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
