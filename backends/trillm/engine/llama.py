"""The Llama forward pass over a flat batch of tokens, with the paged KV cache.

Weights are kept fused where one matmul can replace several (q/k/v, and
gate/up), so that a step runs few, large matmuls (``linear.py``). Every op
works on rows independently, with results that do not depend on the other
rows, except attention, which is per sequence (``attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trillm.engine.attention import AttentionMetadata, paged_attention
from trillm.engine.checkpoint import LlamaSpec
from trillm.engine.kv_cache import KVCache
from trillm.engine.linear import Linear, row_variant_counts, smallest_row_multiple
from trillm.engine.rope import apply_rope, cos_sin_tables


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # hidden -> q + 2 * kv
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # hidden -> 2 * intermediate
    down: Linear


class LlamaModel:
    def __init__(self, spec: LlamaSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 max_positions: int, make_linear: Callable | None = None) -> None:
        """``make_linear(name, weight, bias)`` builds each matmul (float Linear by default;
        trillm.engine.quant.LinearBuilder for quantised ones)."""
        make = make_linear or (lambda name, weight, bias=None: Linear(weight, bias))
        self.spec = spec
        self.dtype = dtype
        take = _Taker(tensors)
        self.embed = take("model.embed_tokens.weight", (spec.vocab_size, spec.hidden_size))
        q_out = spec.num_heads * spec.head_dim
        kv_out = spec.num_kv_heads * spec.head_dim
        h, inter = spec.hidden_size, spec.intermediate_size
        self.layers: list[LayerWeights] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            shapes = {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h), "o_proj": (h, q_out)}
            qkv = [take(f"{attn}{n}.weight", shapes[n]) for n in ("q_proj", "k_proj", "v_proj")]
            gate_up = [take(f"{mlp}{n}.weight", (inter, h)) for n in ("gate_proj", "up_proj")]
            attn_bias, mlp_bias = spec.attention_bias, spec.mlp_bias
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=make(f"layers.{i}.qkv", torch.cat(qkv), torch.cat([take(f"{attn}{n}.bias", (shapes[n][0],))
                                                      for n in ("q_proj", "k_proj", "v_proj")]) if attn_bias else None),
                o=make(f"layers.{i}.o", take(attn + "o_proj.weight", (h, q_out)),
                         take(attn + "o_proj.bias", (h,)) if attn_bias else None),
                post_norm=take(p + "post_attention_layernorm.weight", (h,)),
                gate_up=make(f"layers.{i}.gate_up", torch.cat(gate_up), torch.cat([take(f"{mlp}{n}.bias", (inter,))
                                                              for n in ("gate_proj", "up_proj")]) if mlp_bias else None),
                down=make(f"layers.{i}.down", take(mlp + "down_proj.weight", (h, inter)),
                            take(mlp + "down_proj.bias", (h,)) if mlp_bias else None),
            ))
            del qkv, gate_up
        self.norm = take("model.norm.weight", (h,))
        if spec.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
            self.lm_head = make("lm_head", self.embed)  # the embedding lookup keeps the float table
        else:
            self.lm_head = make("lm_head", take("lm_head.weight", (spec.vocab_size, h)))
        self.cos, self.sin_signed = cos_sin_tables(spec, max_positions, dtype)
        linears = [self.lm_head] + [m for w in self.layers for m in (w.qkv, w.o, w.gate_up, w.down)]
        # Rows per step, and sample rows per LM-head call, are padded to these
        # multiples so that no row changes with the batch (probe_batch_invariance).
        self.row_multiple = 1
        self.head_row_multiple = 1
        self.batch_invariant = False  # until probed
        self.fused = None  # native.Fused once use_fused() takes it
        norms = [self.norm] + [n for w in self.layers for n in (w.input_norm, w.post_norm)]
        # Bytes every decode step reads: all matrices (the embedding table only by row).
        self.weight_bytes = sum(m.nbytes for m in linears) + sum(n.numel() * n.element_size() for n in norms)

    def probe_batch_invariance(self, max_step_rows: int, max_sample_rows: int) -> dict:
        """Probe each distinct matmul on this CPU (linear.py) and set the row paddings.

        Every other op of the forward pass is row-wise (embedding, norms, RoPE,
        SiLU, residuals: each row's arithmetic is the same whatever the row
        count) or per sequence (attention: one call per sequence over its own
        keys), so the matmuls are what can break invariance. Returns the
        report the engine logs and shows in ``stats()``.
        """
        layer = self.layers[0]  # every layer has the same shapes, so the same kernels
        step = {"qkv": layer.qkv, "o": layer.o, "gate_up": layer.gate_up, "down": layer.down}
        variants = {name: row_variant_counts(lin, max_step_rows) for name, lin in step.items()}
        head_variants = row_variant_counts(self.lm_head, max_sample_rows)
        step_multiple = smallest_row_multiple(list(variants.values()), max_step_rows)
        head_multiple = smallest_row_multiple([head_variants], max_sample_rows)
        self.batch_invariant = step_multiple is not None and head_multiple is not None
        self.row_multiple = step_multiple or 1
        self.head_row_multiple = head_multiple or 1
        per_matmul = {name: smallest_row_multiple([v], max_step_rows) for name, v in variants.items()}
        per_matmul["lm_head"] = head_multiple
        return {
            "batch_invariant": self.batch_invariant,
            "linear_kernel": layer.qkv.kernel,
            "row_multiples": per_matmul,  # None: no padding of ROW_MULTIPLES makes that matmul row-invariant here
            "step_row_multiple": self.row_multiple,
            "head_row_multiple": self.head_row_multiple,
        }

    def use_fused(self, kv_dtype: torch.dtype) -> str:
        """Take the native fused row-wise ops (``csrc/fused.cpp``) when they apply; returns why not, or ""."""
        from trillm.engine import native  # not at import (see attention.choose_decode_attention)

        self.fused = None
        dtypes = {self.dtype, kv_dtype} | {m.input_dtype for w in self.layers for m in (w.qkv, w.gate_up, w.down)}
        if self.dtype != torch.float32:
            return f"the fused ops keep a float32 residual stream, this model computes in {self.dtype}"
        if not dtypes <= {torch.float32, torch.bfloat16}:
            return f"the fused ops take float32 and bfloat16, not {sorted(map(str, dtypes))}"
        fused, why = native.load_fused()
        if fused is None:
            return why
        self.fused = fused
        return ""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [rows, hidden] (before the final norm) for a flat batch of tokens."""
        if self.fused is not None:
            return self._forward_fused(input_ids, positions, meta, kv_cache)
        spec = self.spec
        rows = input_ids.shape[0]
        heads, kv_heads, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = heads * d, kv_heads * d
        inter = spec.intermediate_size
        eps = spec.rms_norm_eps
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin_signed.index_select(0, positions).unsqueeze(1)
        kv_dtype = kv_cache.k.dtype  # attention runs in the cache's dtype (precision.py)
        hidden = F.embedding(input_ids, self.embed)
        for i, w in enumerate(self.layers):
            x = rms_norm(hidden, w.input_norm, eps)
            qkv = w.qkv(x)
            qk = apply_rope(qkv[:, :q_size + kv_size].view(rows, heads + kv_heads, d), cos, sin).to(kv_dtype)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, q_size + kv_size:].view(rows, kv_heads, d).to(kv_dtype)
            attn = paged_attention(i, q, k, v, kv_cache.k[i], kv_cache.v[i], meta)
            hidden = hidden + w.o(attn)
            x = rms_norm(hidden, w.post_norm, eps)
            gate_up = w.gate_up(x)
            hidden = hidden + w.down(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        return hidden

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_cache: KVCache) -> torch.Tensor:
        """:meth:`forward` with the row-wise work of each layer in three native calls (same arithmetic,
        in float32, rounded once into the dtype each matmul reads)."""
        spec, fused = self.spec, self.fused
        rows = input_ids.shape[0]
        heads, kv_heads, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        eps = spec.rms_norm_eps
        kv_dtype = kv_cache.k.dtype
        hidden = F.embedding(input_ids, self.embed).float().contiguous()
        layers = self.layers
        x = torch.empty(rows, spec.hidden_size, dtype=layers[0].qkv.input_dtype)
        fused.add_rms_norm(hidden, None, layers[0].input_norm, eps, x)
        q = torch.empty(rows, heads, d, dtype=kv_dtype)
        k = torch.empty(rows, kv_heads, d, dtype=kv_dtype)
        v = torch.empty(rows, kv_heads, d, dtype=kv_dtype)
        for i, w in enumerate(layers):
            k_cache, v_cache = kv_cache.k[i], kv_cache.v[i]
            fused.rope_split(w.qkv(x).contiguous(), self.cos, self.sin_signed, positions, meta.slot_mapping, q, k, v,
                             k_cache, v_cache)
            attn = paged_attention(i, q, k, v, k_cache, v_cache, meta, write_cache=False)
            x = torch.empty(rows, spec.hidden_size, dtype=w.gate_up.input_dtype)
            fused.add_rms_norm(hidden, w.o(attn).contiguous(), w.post_norm, eps, x)
            m = torch.empty(rows, spec.intermediate_size, dtype=w.down.input_dtype)
            fused.silu_mul(w.gate_up(x).contiguous(), m)
            down = w.down(m).contiguous()
            if i + 1 < len(layers):
                x = torch.empty(rows, spec.hidden_size, dtype=layers[i + 1].qkv.input_dtype)
                fused.add_rms_norm(hidden, down, layers[i + 1].input_norm, eps, x)
            else:
                hidden += down
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] for hidden states [rows, hidden]."""
        return self.lm_head(rms_norm(hidden, self.norm, self.spec.rms_norm_eps)).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, bit for bit as transformers computes it (in float32).

    ``sum / n`` is what ``mean`` computes, minus its per-call dtype handling,
    which costs more than the arithmetic at decode sizes.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    normed = xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True).div_(x.shape[-1]).add_(eps))
    return normed * weight if x.dtype == torch.float32 else weight * normed.to(x.dtype)


class _Taker:
    """Pops named tensors out of the checkpoint dict, checking their shapes."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.tensors.pop(name, None)
        if tensor is None:
            raise ValueError(f"checkpoint: weight {name!r} is missing")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint: weight {name!r} has shape {tuple(tensor.shape)}, config implies {shape}")
        return tensor.contiguous()
