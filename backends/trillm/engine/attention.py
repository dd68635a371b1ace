"""Attention over the paged KV cache, for a step that mixes prefill chunks and decodes.

The step's tokens are rows of one flat batch. Per layer, their K/V are
written into the cache at their slots; then each sequence attends with its
own queries over its own keys (``scaled_dot_product_attention``, one call
per sequence). The keys a sequence sees depend only on that sequence, never
on what else is in the step, so its output does not change with the batch.

Where the keys come from, cheapest first:

* one **segment**: the sequence's blocks are consecutive (the block manager
  arranges that when it can), so its K/V are a view of the cache, built once
  per step for all layers;
* several segments, for a decode: each run of consecutive blocks is a view
  (typically a prefix shared through the prefix cache, then the sequence's
  own blocks); each is attended separately and the results are merged by
  their log-sum-exp, as flash-decoding does. No copy per step;
* **fresh**: a first prompt chunk attends to this step's own K/V rows;
* **gather**: a later prompt chunk over scattered blocks copies them.

Measured on 2 CPU cores: attention per decoding sequence is bound by reading
its K/V (SDPA streams them at memory speed), so batching sequences into one
padded call would add padding traffic and a gather copy without saving work.
Re-measured on a Sapphire Rapids Xeon (one thread, CPU time per layer,
SmolLM2's 9 heads / 3 KV heads / d 64, contexts of 100-250 tokens): this
loop takes 0.38 ms for 8 decodes and 1.4 ms (bf16) / 2.6 ms (fp32) for 32;
gathering each decode's blocks into a padded [seqs, kv_heads, len, d] buffer
with a mask for one SDPA call takes 0.34-0.70 ms for 8 and 2.7-8.4 ms for 32
(one call, or one per 64-token length bucket so that a sequence's padding
depends only on its own length). The gather copy costs more than the calls
it saves, so the loop stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# SDPA that also returns the log-sum-exp of the scores (needed to merge segments).
_sdpa_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SEGMENTED_DECODE = _sdpa_with_lse is not None


@dataclass
class SequenceAttention:
    """Where one sequence's rows are in the step, and where its keys are."""

    row_start: int
    row_end: int
    kv_len: int  # keys attended: every token of the sequence up to its last row
    # K, V views [layers, kv_heads, tokens, d] of consecutive runs of the cache,
    # covering the kv_len keys in order; None when gathered or fresh.
    segments: list[tuple[torch.Tensor, torch.Tensor]] | None
    block_ids: torch.Tensor | None  # blocks to gather (a later prompt chunk over scattered blocks)
    fresh: bool  # a first prompt chunk: causal, and its keys are exactly this step's rows
    mask: torch.Tensor | None  # [rows, kv_len] bool for a later prompt chunk; else None

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [rows] cache slot of each row (padding rows: the null block)
    sequences: list[SequenceAttention]
    num_padding_rows: int


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Write ``k``/``v`` [rows, kv_heads, d] into the cache and attend: [rows, heads * d].

    ``q`` is [rows, heads, d]; ``k_cache``/``v_cache`` are this layer's
    ``[blocks, block_size, kv_heads, d]``. Padding rows come out as zeros.
    """
    rows, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    gqa = num_heads != kv_heads
    q_heads_first = q.transpose(0, 1)
    outputs = []
    for s in meta.sequences:
        n = s.num_rows
        queries = q_heads_first[None, :, s.row_start:s.row_end]
        if s.segments is not None and len(s.segments) > 1:
            o = _merged_segments(queries, [(k_[layer:layer + 1], v_[layer:layer + 1]) for k_, v_ in s.segments])
        else:
            if s.segments is not None:
                keys, values = s.segments[0][0][layer:layer + 1], s.segments[0][1][layer:layer + 1]
            elif s.fresh:
                keys = k[s.row_start:s.row_end].transpose(0, 1)[None]
                values = v[s.row_start:s.row_end].transpose(0, 1)[None]
            else:
                keys = _gather(k_cache, s.block_ids, s.kv_len)
                values = _gather(v_cache, s.block_ids, s.kv_len)
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=s.mask,
                                               is_causal=s.fresh and n > 1, enable_gqa=gqa)
        # o: [1, heads, n, d]
        outputs.append(o.view(1, num_heads * head_dim) if n == 1 else o[0].transpose(0, 1).reshape(n, -1))
    if meta.num_padding_rows:
        outputs.append(q.new_zeros(meta.num_padding_rows, num_heads * head_dim))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[1, kv_heads, kv_len, d] copy of the first ``kv_len`` slots of ``block_ids``."""
    _, _, kv_heads, head_dim = cache.shape
    return cache.index_select(0, block_ids).view(-1, kv_heads, head_dim)[:kv_len].transpose(0, 1)[None]


def _merged_segments(queries: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Unmasked attention of ``queries`` [1, heads, n, d] over the concatenation of ``segments``.

    Each segment's softmax is normalised by its own log-sum-exp; weighting
    the partial outputs by ``softmax`` over those log-sum-exps renormalises
    them over all the keys.
    """
    outs, lses = zip(*(_sdpa_with_lse(queries, keys, values, 0.0, False) for keys, values in segments))
    weights = torch.softmax(torch.stack(lses), dim=0)  # [segments, 1, heads, n]
    return (torch.stack(outs) * weights.unsqueeze(-1)).sum(0).to(queries.dtype)
