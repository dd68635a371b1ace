"""Rotary position embeddings: frequencies (default, linear, llama3) and their application.

The arithmetic follows ``transformers``' Llama step for step (frequencies in
float32, cos/sin cast to the model dtype, rotate-half layout), so positions
embed exactly as in the reference.
"""

from __future__ import annotations

import math

import torch

from trillm.engine.checkpoint import LlamaSpec


def inverse_frequencies(spec: LlamaSpec) -> torch.Tensor:
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    params = spec.rope_params
    if spec.rope_type == "linear":
        return inv_freq / params["factor"]
    if spec.rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def cos_sin_tables(spec: LlamaSpec, max_positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin for positions [0, max_positions), each [max_positions, head_dim].

    The first half of the sin table is negated, so that rotating is
    ``x * cos + swap_halves(x) * sin_signed`` (see :func:`apply_rope`).
    """
    inv_freq = inverse_frequencies(spec)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin().to(dtype)
    sin[:, : spec.head_dim // 2].neg_()
    return emb.cos().to(dtype), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] by per-token ``cos``/``sin_signed`` [tokens, 1, head_dim].

    Equal, bit for bit, to transformers' ``x * cos + rotate_half(x) * sin``:
    ``rotate_half(x) * sin`` is ``[-x2 * s1, x1 * s2]``, and ``x2 * -s1`` is the
    same float as ``-x2 * s1``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed
