"""GGUF weights: the Q/K un-permutation against transformers, and each dequantiser within its format's bound.

A tiny random Hugging Face Llama is written as GGUF the way convert_hf_to_gguf.py
writes one (gguf_files.write_llama_gguf: Q/K rows permuted for llama.cpp's
RoPE, weights quantised by the gguf package), converted back by
trillm.gguf_checkpoint, and loaded with transformers.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_files import Vocab, permute, write_llama_gguf
from trillm.gguf_checkpoint import GGUFFile, convert_gguf

pytestmark = pytest.mark.unit

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 261, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def byte_vocab() -> Vocab:
    """256 byte-level tokens, a few merges, and BOS/EOS: enough for a valid 'gpt2' tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet, "he", "ll", "llo"]
    return Vocab(model="gpt2", tokens=tokens, token_types=[3, 3] + [1] * (len(tokens) - 2),
                 merges=["h e", "l l", "ll o"], pre="default", bos_id=0, eos_id=1)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random transformers Llama whose attention is sharp enough that RoPE's layout matters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                gain = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(torch.randn_like(p) * gain / p.shape[1] ** 0.5)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [0, 5, 77, 200, 13, 9, 250, 31, 64, 128, 3, 17, 99, 140, 2, 45]


def test_unpermuted_gguf_gives_transformers_logits(hf_llama, tmp_path):
    """The Q/K rows come back in Hugging Face order: identical weights, identical logits. The same
    weights with the rows left in llama.cpp's order give other logits, so this can fail."""
    from transformers import LlamaForCausalLM

    path = write_llama_gguf(tmp_path / "tiny.gguf", CONFIG, state_dict(hf_llama), byte_vocab())
    converted = LlamaForCausalLM.from_pretrained(convert_gguf(path, tmp_path / "hf"), dtype=torch.float32).eval()
    for name, value in hf_llama.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value), name
    expected = logits(hf_llama, IDS)
    assert torch.equal(logits(converted, IDS), expected)

    heads, kv_heads = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    left_permuted = {
        name: torch.from_numpy(permute(value.numpy(), heads, kv_heads if "k_proj" in name else heads))
        if name.endswith(("q_proj.weight", "k_proj.weight")) else value
        for name, value in hf_llama.state_dict().items()
    }
    naive = LlamaForCausalLM(hf_llama.config).eval()
    naive.load_state_dict(left_permuted)
    assert (logits(naive, IDS) - expected).abs().max() > 0.1


def test_gguf_tensors_json_records_each_tensors_origin(hf_llama, tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", CONFIG, state_dict(hf_llama), byte_vocab(), qtype=Q.Q4_1)
    out = convert_gguf(path, tmp_path / "hf")
    tensors = json.loads((out / "gguf_tensors.json").read_text())["tensors"]
    assert set(tensors) == set(hf_llama.state_dict())
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert (q["gguf_name"], q["ggml_type"], q["shape"], q["rows_unpermuted_heads"]) == (
        "blk.1.attn_q.weight", "Q4_1", [64, 64], 4)
    assert tensors["model.layers.1.self_attn.k_proj.weight"]["rows_unpermuted_heads"] == 2
    assert tensors["model.norm.weight"]["ggml_type"] == "F32"
    # The raw Q4_1 blocks, rows in HF order, dequantise to exactly the converted weight.
    f = GGUFFile(path)
    kind, blocks = f.raw_tensor("model.layers.1.self_attn.k_proj.weight")
    assert kind == "Q4_1" and blocks.dtype == np.uint8
    assert np.array_equal(gguf.quants.dequantize(blocks, Q.Q4_1), f.tensor("model.layers.1.self_attn.k_proj.weight"))


def quantisation_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """The largest error the format allows for each element of ``x`` (rows of 32-value blocks).

    Block formats store a float16 scale d (and Q4_1/Q5_1 a float16 minimum m)
    and integer levels q: x ~ d*q (+ m). Rounding to the nearest level costs d/2;
    storing d and m in float16 costs |q| * d * 2^-11 and |m| * 2^-11. Q4_0/Q5_0
    put the block's largest-magnitude value at level -L (d = max/-L), so values of
    the other sign beyond (L - 1/2)|d| are clipped to level L-1."""
    eps16 = 2.0 ** -11
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype == Q.F16:
        return np.abs(x) * eps16 + 2.0 ** -24
    if qtype == Q.BF16:
        return np.abs(x) * 2.0 ** -8
    blocks = x.reshape(-1, 32).astype(np.float64)
    if qtype == Q.Q8_0:
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = d * (0.5 + 127 * eps16)
    elif qtype in (Q.Q4_0, Q.Q5_0):
        levels = 8 if qtype == Q.Q4_0 else 16
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
        d = peak / -levels
        t = blocks / d
        bound = np.abs(d) * (np.maximum(0.5, t - (levels - 1)) + levels * eps16)
    else:  # Q4_1, Q5_1
        levels = 15 if qtype == Q.Q4_1 else 31
        low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (high - low) / levels
        bound = d * (0.5 + levels * eps16) + np.abs(low) * eps16
    return (np.broadcast_to(bound, blocks.shape) * (1 + 1e-6) + 1e-7).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda q: q.name)
def test_dequantised_weights_are_within_the_formats_bound(hf_llama, tmp_path, qtype):
    """Every 2-D weight, written in ``qtype`` and read back, is within the bound of
    :func:`quantisation_bound` of the original, element by element, and (for the
    lossy formats) not identical to it: the read really went through the format."""
    original = state_dict(hf_llama)
    f = GGUFFile(write_llama_gguf(tmp_path / f"{qtype.name}.gguf", CONFIG, original, byte_vocab(), qtype=qtype))
    for name, value in original.items():
        if value.ndim != 2:
            continue
        assert f.tensor_sources[name].ggml_type == qtype.name
        error = np.abs(f.tensor(name).astype(np.float64) - value)
        bound = quantisation_bound(value, qtype)
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        assert (error <= bound).all(), (name, worst, error[worst], bound[worst])
        assert (error.max() == 0) == (qtype == Q.F32), name
