"""The Llama forward pass over a flat batch of tokens, with the paged KV cache.

Weights are kept fused where one matmul can replace several (q/k/v, and
gate/up), so that a step runs few, large matmuls. Every op works on rows
independently except attention, which is per sequence (``attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trillm.engine.attention import AttentionMetadata, paged_attention
from trillm.engine.checkpoint import LlamaSpec
from trillm.engine.kv_cache import KVCache
from trillm.engine.rope import apply_rope, cos_sin_tables


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 * kv, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class LlamaModel:
    def __init__(self, spec: LlamaSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 max_positions: int) -> None:
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
            bias = spec.attention_bias
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=torch.cat(qkv),
                qkv_bias=torch.cat([take(f"{attn}{n}.bias", (shapes[n][0],)) for n in ("q_proj", "k_proj", "v_proj")])
                if bias else None,
                o=take(attn + "o_proj.weight", (h, q_out)),
                o_bias=take(attn + "o_proj.bias", (h,)) if bias else None,
                post_norm=take(p + "post_attention_layernorm.weight", (h,)),
                gate_up=torch.cat(gate_up),
                gate_up_bias=torch.cat([take(f"{mlp}{n}.bias", (inter,)) for n in ("gate_proj", "up_proj")])
                if spec.mlp_bias else None,
                down=take(mlp + "down_proj.weight", (h, inter)),
                down_bias=take(mlp + "down_proj.bias", (h,)) if spec.mlp_bias else None,
            ))
            del qkv, gate_up
        self.norm = take("model.norm.weight", (h,))
        if spec.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight", (spec.vocab_size, h))
        self.cos, self.sin = cos_sin_tables(spec, max_positions, dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes read from memory by one forward step (every weight once)."""
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [rows, hidden] (before the final norm) for a flat batch of tokens."""
        spec = self.spec
        rows = input_ids.shape[0]
        heads, kv_heads, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = heads * d, kv_heads * d
        inter = spec.intermediate_size
        eps = spec.rms_norm_eps
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        attn_out = torch.zeros(rows, q_size, dtype=self.dtype)
        hidden = F.embedding(input_ids, self.embed)
        for i, w in enumerate(self.layers):
            x = F.rms_norm(hidden, (spec.hidden_size,), w.input_norm, eps)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q = apply_rope(qkv[:, :q_size].view(rows, heads, d), cos, sin)
            k = apply_rope(qkv[:, q_size:q_size + kv_size].view(rows, kv_heads, d), cos, sin)
            v = qkv[:, q_size + kv_size:].view(rows, kv_heads, d)
            paged_attention(q, k, v, kv_cache.k[i], kv_cache.v[i], meta, attn_out)
            hidden = hidden + F.linear(attn_out, w.o, w.o_bias)
            x = F.rms_norm(hidden, (spec.hidden_size,), w.post_norm, eps)
            gate_up = F.linear(x, w.gate_up, w.gate_up_bias)
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            hidden = hidden + F.linear(act, w.down, w.down_bias)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] for hidden states [rows, hidden]."""
        x = F.rms_norm(hidden, (self.spec.hidden_size,), self.norm, self.spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()


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
