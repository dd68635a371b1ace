"""Attention over the paged KV cache, for a step that mixes prefill chunks and decodes.

The step's tokens are rows of one flat batch. Per layer, their K/V are
written into the cache at their slots; then each sequence attends with its
own queries over its own keys. A sequence whose blocks are consecutive (the
block manager arranges that when it can) reads its K/V as a view of the
cache, with no copy; otherwise its blocks are gathered. The keys a sequence
sees depend only on that sequence, never on what else is in the step, so
its output does not change with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceAttention:
    """Where one sequence's rows are in the step and where its keys are in the cache."""

    row_start: int
    row_end: int
    kv_len: int  # keys attended: every token of the sequence up to its last row
    first_slot: int | None  # K/V are slots [first_slot, first_slot + kv_len) when its blocks are consecutive
    block_ids: torch.Tensor | None  # else, its blocks, gathered
    fresh: bool  # the chunk starts at position 0: its keys are exactly this step's rows
    mask: torch.Tensor | None  # [rows, kv_len] bool for a later prompt chunk; None when not needed


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [rows] cache slot of each row (padding rows: the null block)
    sequences: list[SequenceAttention]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:
    """Write ``k``/``v`` [rows, kv_heads, d] into the cache, attend, and fill ``out`` [rows, heads * d].

    ``q`` is [rows, heads, d]; rows not covered by ``meta.sequences`` (padding) are left untouched.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, k)
    flat_v.index_copy_(0, meta.slot_mapping, v)
    gqa = num_heads != kv_heads
    for s in meta.sequences:
        rows = s.row_end - s.row_start
        if s.fresh:
            keys, values = k[s.row_start:s.row_end], v[s.row_start:s.row_end]
        elif s.first_slot is not None:
            keys = flat_k[s.first_slot:s.first_slot + s.kv_len]
            values = flat_v[s.first_slot:s.first_slot + s.kv_len]
        else:
            keys = k_cache.index_select(0, s.block_ids).view(-1, kv_heads, head_dim)[:s.kv_len]
            values = v_cache.index_select(0, s.block_ids).view(-1, kv_heads, head_dim)[:s.kv_len]
        o = F.scaled_dot_product_attention(
            q[s.row_start:s.row_end].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=s.mask,
            is_causal=s.fresh and rows > 1,
            enable_gqa=gqa,
        )  # [1, heads, rows, d]
        out[s.row_start:s.row_end].view(rows, num_heads, head_dim).copy_(o[0].transpose(0, 1))
