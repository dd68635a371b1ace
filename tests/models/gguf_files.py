"""Writing GGUF files in tests the way llama.cpp's convert_hf_to_gguf.py does.

:func:`write_llama_gguf` takes a Hugging Face Llama (config and state dict)
and a vocabulary and writes them with the ``gguf`` package's GGUFWriter: the
llama.cpp tensor names, the Q/K rows permuted for llama.cpp's RoPE
(``LlamaModel.permute`` in convert_hf_to_gguf.py, restated here so that the
reader's inverse is checked against an independent copy), each 2-D weight
quantised to the requested type with ``gguf.quants.quantize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@dataclass
class Vocab:
    """What convert_hf_to_gguf.py writes under tokenizer.ggml.*."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    add_bos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_TO_GGUF[rest]}"


def write_llama_gguf(path: Path, config: dict, state_dict: dict[str, np.ndarray], vocab: Vocab,
                     qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                     permute_qk: bool = True) -> Path:
    """Write a GGUF file; 2-D weights in ``qtype``, norms in F32 (as llama.cpp keeps them)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_name("test model")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(int(qtype))

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for add, value in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                       (writer.add_unk_token_id, vocab.unk_id), (writer.add_add_bos_token, vocab.add_bos),
                       (writer.add_add_space_prefix, vocab.add_space_prefix),
                       (writer.add_chat_template, vocab.chat_template)):
        if value is not None:
            add(value)
    for key, value in vocab.extra.items():
        writer.add_uint32(key, value)

    for name, value in state_dict.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if permute_qk and name.endswith("q_proj.weight"):
            value = permute(value, heads, heads)
        elif permute_qk and name.endswith("k_proj.weight"):
            value = permute(value, heads, kv_heads)
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(value, qtype)
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
