"""The paged KV cache tensors: per layer, ``[num_blocks + 1, block_size, kv_heads, head_dim]`` for K and for V.

Block ``num_blocks`` is the null block: never handed out by the block
manager, it absorbs the writes of padding rows. Attention only ever reads
slots that hold a computed token, so the cache is left uninitialised: its
memory is committed by the OS as blocks are first written, not up front.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype) -> None:
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype)
        self.v = torch.empty(shape, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_block = num_blocks

    @property
    def null_slot(self) -> int:
        return self.null_block * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
