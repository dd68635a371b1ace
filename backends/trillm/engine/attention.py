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

Decodes (and one-token chunks) go to the native kernel where it is built and
faster on this CPU (:func:`choose_decode_attention`, measured at load): all
of a step's decodes in one call per layer, reading K/V in place through the
block tables (``native.py``, ``csrc/paged_decode.cpp``). The loop below is
its fallback, and still serves every prompt chunk.

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

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trillm.engine.precision import best_cpu_ms

if TYPE_CHECKING:
    from trillm.engine import native

log = logging.getLogger("trillm.engine")

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
class DecodeBatch:
    """A step's one-token chunks, for the native kernel: row, block table and key count of each."""

    kernel: native.PagedDecode
    rows: torch.Tensor  # int32 [n]: the row of each in the step
    tables: torch.Tensor  # int32 [n, max_blocks]: block ids (a shorter table padded with 0)
    lens: torch.Tensor  # int32 [n]: keys attended

    def __post_init__(self) -> None:  # checked once per step, not once per layer
        if any(t.dtype != torch.int32 or not t.is_contiguous() for t in (self.rows, self.tables, self.lens)):
            raise ValueError("native decode attention: rows, tables and lens must be contiguous int32")

    @property
    def n(self) -> int:
        return self.rows.shape[0]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [rows] cache slot of each row (padding rows: the null block)
    sequences: list[SequenceAttention]  # what the SDPA loop serves
    num_padding_rows: int
    decode: DecodeBatch | None = None  # what the native kernel serves (DecodeAttention.kernel)


@dataclass
class DecodeAttention:
    """How this engine attends for decodes: the native kernel, or the SDPA loop (kernel None)."""

    kernel: native.PagedDecode | None
    reason: str  # with the probe's timings when it ran

    @property
    def name(self) -> str:
        return "native-paged" if self.kernel is not None else "sdpa-loop"


# The probe: PROBE_SEQS decodes over PROBE_TOKENS keys each, one thread, CPU time (as precision.py).
PROBE_SEQS, PROBE_TOKENS, PROBE_REPEATS = 8, 256, 5
TIE_MARGIN = 1.1


def choose_decode_attention(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                            dtype: torch.dtype) -> DecodeAttention:
    """The native kernel when it builds, takes ``dtype`` and beats the SDPA loop here, measured.

    ``TRILLM_DECODE_ATTENTION`` = ``native`` or ``sdpa`` skips the measurement
    (tests and benchmarks compare the two); unset or ``auto`` measures.
    """
    from trillm.engine import native  # not at import: `python -m trillm.engine.native` imports this package

    forced = os.environ.get("TRILLM_DECODE_ATTENTION", "auto")
    if forced not in ("auto", "native", "sdpa"):
        raise ValueError(f"TRILLM_DECODE_ATTENTION: must be auto, native or sdpa, got {forced!r}")
    if forced == "sdpa":
        return DecodeAttention(None, "TRILLM_DECODE_ATTENTION=sdpa")
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in native.DTYPE_CODES:
        return DecodeAttention(None, f"the native kernel does not take a {dtype_name} KV cache")
    kernel, why = native.load()
    if kernel is None:
        if forced == "native":
            log.warning("TRILLM_DECODE_ATTENTION=native, but the kernel is unavailable (%s): using the SDPA loop", why)
        return DecodeAttention(None, f"native kernel unavailable: {why}")
    if forced == "native":
        return DecodeAttention(kernel, "TRILLM_DECODE_ATTENTION=native")
    timings = _probe(kernel, num_heads, num_kv_heads, head_dim, block_size, dtype)
    # The probe leaves out what the loop also costs the engine per sequence (views of its
    # blocks built in Python every step), so the kernel wins ties.
    faster = timings["native"] <= timings["sdpa_loop"] * TIE_MARGIN
    reason = (f"measured at load: {PROBE_SEQS} decodes over {PROBE_TOKENS} keys, native "
              f"{timings['native']:.3f} ms vs SDPA loop {timings['sdpa_loop']:.3f} ms")
    return DecodeAttention(kernel if faster else None, reason)


def _probe(kernel: native.PagedDecode, heads: int, kv_heads: int, d: int, bs: int, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    blocks = -(-PROBE_TOKENS // bs)
    k_cache, v_cache = (torch.randn(PROBE_SEQS * blocks, bs, kv_heads, d, generator=generator).to(dtype)
                        for _ in range(2))
    q = torch.randn(PROBE_SEQS, heads, d, generator=generator).to(dtype)
    decode = DecodeBatch(kernel, torch.arange(PROBE_SEQS, dtype=torch.int32),
                         torch.arange(PROBE_SEQS * blocks, dtype=torch.int32).view(PROBE_SEQS, blocks),
                         torch.full((PROBE_SEQS,), PROBE_TOKENS, dtype=torch.int32))
    views = [(k_cache[i * blocks:(i + 1) * blocks].view(-1, kv_heads, d)[:PROBE_TOKENS].transpose(0, 1)[None],
              v_cache[i * blocks:(i + 1) * blocks].view(-1, kv_heads, d)[:PROBE_TOKENS].transpose(0, 1)[None])
             for i in range(PROBE_SEQS)]
    out = torch.empty(PROBE_SEQS, heads * d, dtype=dtype)
    q_first = q.transpose(0, 1)
    gqa = heads != kv_heads

    def loop():
        return torch.cat([F.scaled_dot_product_attention(q_first[None, :, i:i + 1], k, v, enable_gqa=gqa)
                          .view(1, heads * d) for i, (k, v) in enumerate(views)])

    def run_native():
        _native_decode(q, k_cache, v_cache, decode, out)

    with torch.inference_mode():
        timings = best_cpu_ms({"native": run_native, "sdpa_loop": loop}, calls=4, repeats=PROBE_REPEATS)
    return {name: round(ms, 4) for name, ms in timings.items()}


def _native_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   decode: DecodeBatch, out: torch.Tensor) -> None:
    """The kernel over ``decode``'s rows of ``q`` [rows, heads, d] (rows may be strided) into ``out`` [rows, heads * d]."""
    _, heads, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d or out.stride(1) != 1 or not (k_cache.is_contiguous()
                                                                        and v_cache.is_contiguous()):
        raise ValueError("native decode attention: q rows must hold contiguous heads, out and the caches contiguous")
    if not q.dtype == k_cache.dtype == v_cache.dtype == out.dtype:
        raise ValueError(f"native decode attention: q, caches and out must share a dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}, {out.dtype}")
    _, block_size, kv_heads, _ = k_cache.shape
    decode.kernel(decode.kernel.dtype_code(q), q, q.stride(0), k_cache, v_cache, decode.tables,
                  decode.tables.shape[1], decode.lens, decode.rows, decode.n, heads, kv_heads, d, block_size,
                  1.0 / math.sqrt(d), out, out.stride(0))


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, write_cache: bool = True) -> torch.Tensor:
    """Write ``k``/``v`` [rows, kv_heads, d] into the cache and attend: [rows, heads * d].

    ``q`` is [rows, heads, d]; ``k_cache``/``v_cache`` are this layer's
    ``[blocks, block_size, kv_heads, d]``. Padding rows come out as zeros.
    ``write_cache=False``: ``k``/``v`` are in the cache already (the fused RoPE wrote them).
    """
    rows, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if write_cache:
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    if meta.decode is not None:
        return _with_native_decodes(layer, q, k, v, k_cache, v_cache, meta)
    return _loop_attention(layer, q, k, v, k_cache, v_cache, meta)


def _loop_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """One SDPA call per sequence of ``meta.sequences`` (K/V already in the cache), then the padding rows."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    gqa = num_heads != k.shape[1]
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


def _with_native_decodes(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The step's decodes through the native kernel, its prompt chunks through the loop, in one output."""
    rows, num_heads, head_dim = q.shape
    out = q.new_empty(rows, num_heads * head_dim)
    _native_decode(q, k_cache, v_cache, meta.decode, out)
    if meta.sequences:
        rest = AttentionMetadata(meta.slot_mapping, meta.sequences, 0)
        done = _loop_attention(layer, q, k, v, k_cache, v_cache, rest)
        offset = 0
        for s in meta.sequences:
            out[s.row_start:s.row_end] = done[offset:offset + s.num_rows]
            offset += s.num_rows
    if meta.num_padding_rows:
        out[rows - meta.num_padding_rows:] = 0
    return out


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
