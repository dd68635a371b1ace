"""Turns one step's scheduled chunks into model inputs, runs the model, returns the logits to sample from."""

from __future__ import annotations

import torch

from trillm.engine.attention import AttentionMetadata, SequenceAttention
from trillm.engine.kv_cache import KVCache
from trillm.engine.llama import LlamaModel
from trillm.engine.scheduler import ScheduledChunk

# Matmuls are given a multiple of this many rows (padding rows are dropped).
# Measured with torch's CPU BLAS (MKL): an output row's bits then do not
# depend on how many rows share the matmul, whereas 1-3 rows (and, with two
# threads, other counts below 12) take kernels that round differently. This
# is what keeps a request's output the same alone and in any batch.
ROW_MULTIPLE = 4


def _pad(n: int) -> int:
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input ids, positions, attention metadata, rows whose logits are sampled), rows padded."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences: list[SequenceAttention] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            table = seq.block_table
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            fresh = start == 0
            first_slot = block_ids = mask = None
            if not fresh:
                blocks = table[:-(-end // bs)]
                if blocks[-1] - blocks[0] == len(blocks) - 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
                    first_slot = blocks[0] * bs
                else:
                    block_ids = torch.tensor(blocks)
                if chunk.num_tokens > 1:
                    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            sequences.append(SequenceAttention(row, len(ids), end, first_slot, block_ids, fresh, mask))
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
        padding = _pad(len(ids)) - len(ids)
        ids.extend([0] * padding)
        positions.extend([0] * padding)
        slots.extend([self.kv_cache.null_slot] * padding)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), sequences=sequences)
        return torch.tensor(ids), torch.tensor(positions), meta, sample_rows

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """float32 logits [chunks that sample, vocab], in the order of ``chunks``."""
        input_ids, positions, meta, sample_rows = self.prepare(chunks)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_cache)
        if not sample_rows:
            return torch.empty(0, self.model.spec.vocab_size)
        rows = sample_rows + [sample_rows[-1]] * (_pad(len(sample_rows)) - len(sample_rows))
        return self.model.logits(hidden.index_select(0, torch.tensor(rows)))[:len(sample_rows)]
