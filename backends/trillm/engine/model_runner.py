"""Turns one step's scheduled chunks into model inputs, runs the model, returns the logits to sample from."""

from __future__ import annotations

import torch

from trillm.engine.attention import (SEGMENTED_DECODE, AttentionMetadata, DecodeAttention, DecodeBatch,
                                     SequenceAttention)
from trillm.engine.kv_cache import KVCache
from trillm.engine.llama import LlamaModel
from trillm.engine.scheduler import ScheduledChunk


def consecutive_runs(blocks: list[int]) -> list[tuple[int, int]]:
    """``blocks`` as (first block, count) runs of consecutive block ids."""
    if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
        return [(blocks[0], len(blocks))]
    runs = [(blocks[0], 1)]
    for block in blocks[1:]:
        first, count = runs[-1]
        if block == first + count:
            runs[-1] = (first, count + 1)
        else:
            runs.append((block, 1))
    return runs


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, decode_attention: DecodeAttention | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        # One-token chunks go to the native kernel when the engine chose it (attention.choose_decode_attention).
        self.decode_kernel = decode_attention.kernel if decode_attention is not None else None

    @staticmethod
    def _pad(n: int, multiple: int) -> int:
        """Rows are padded to the model's probed multiples so that no row's result
        depends on the row count (LlamaModel.probe_batch_invariance)."""
        return -(-n // multiple) * multiple

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input ids, positions, attention metadata, rows whose logits are sampled), rows padded."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences: list[SequenceAttention] = []
        sample_rows: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            table = seq.block_table
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if self.decode_kernel is not None and chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(table[:-(-end // bs)])
                decode_lens.append(end)
                if chunk.samples:
                    sample_rows.append(row)
                continue
            fresh = start == 0
            segments = block_ids = mask = None
            blocks = table[:-(-end // bs)]
            runs = consecutive_runs(blocks)
            if len(runs) == 1 or (chunk.num_tokens == 1 and SEGMENTED_DECODE):
                segments = self._segments(runs, end)
            elif not fresh:
                block_ids = torch.tensor(blocks)
            if not fresh and chunk.num_tokens > 1:
                mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            sequences.append(SequenceAttention(row, len(ids), end, segments, block_ids, fresh, mask))
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
        padding = self._pad(len(ids), self.model.row_multiple) - len(ids)
        ids.extend([0] * padding)
        positions.extend([0] * padding)
        slots.extend([self.kv_cache.null_slot] * padding)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), sequences=sequences, num_padding_rows=padding,
                                 decode=self._decode_batch(decode_rows, decode_tables, decode_lens) if decode_rows else None)
        return torch.tensor(ids), torch.tensor(positions), meta, sample_rows

    def _decode_batch(self, rows: list[int], tables: list[list[int]], lens: list[int]) -> DecodeBatch:
        """The kernel's view of the step's one-token chunks (tables padded to the longest; the kernel
        reads only the first ceil(len / block_size) entries of each)."""
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return DecodeBatch(self.decode_kernel, torch.tensor(rows, dtype=torch.int32),
                           torch.tensor(padded, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))

    def _segments(self, runs: list[tuple[int, int]], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V views [layers, kv_heads, tokens, d] of each run, together covering ``num_tokens`` slots."""
        segments = []
        for first, count in runs:
            tokens = min(count * self.block_size, num_tokens)
            segments.append((self._view(self.kv_cache.k, first, tokens), self._view(self.kv_cache.v, first, tokens)))
            num_tokens -= tokens
        return segments

    def _view(self, cache: torch.Tensor, first_block: int, num_tokens: int) -> torch.Tensor:
        """[layers, kv_heads, num_tokens, d] view of ``num_tokens`` slots from ``first_block`` on."""
        layers, _, bs, kv_heads, head_dim = cache.shape
        blocks = -(-num_tokens // bs)
        run = cache[:, first_block:first_block + blocks].view(layers, blocks * bs, kv_heads, head_dim)
        return run[:, :num_tokens].transpose(1, 2)

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """float32 logits [chunks that sample, vocab], in the order of ``chunks``."""
        input_ids, positions, meta, sample_rows = self.prepare(chunks)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_cache)
        if not sample_rows:
            return torch.empty(0, self.model.spec.vocab_size)
        rows = sample_rows + [sample_rows[-1]] * (self._pad(len(sample_rows), self.model.head_row_multiple) - len(sample_rows))
        return self.model.logits(hidden.index_select(0, torch.tensor(rows)))[:len(sample_rows)]
