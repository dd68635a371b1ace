"""SmolLM2-135M-Instruct served from its GGUF file: our engine against transformers, and
the conversion against transformers' own GGUF loader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# The engine tests' helpers hold the comparison rule (assert_matches_reference).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import assert_matches_reference, greedy, hf_greedy, load_hf, make_engine, requests, run  # noqa: E402

from trillm.smollm2 import GGUF_SHA256, WHEEL_SHA256  # noqa: E402
from trillm.tokenizer import load_tokenizer  # noqa: E402

MAX_TOKENS = 8
CHATS = ["Name the three primary colors.", "Write a haiku about the sea.", "What is 12 times 12?"]
PLAIN = ["The capital of France is"]


@pytest.mark.engine
def test_greedy_tokens_match_transformers(smollm2):
    """Our engine against transformers' LlamaForCausalLM, both on the converted directory in float32. The rule (engine_helpers.assert_matches_reference): the
    logit error bound comes from float32 accumulation over the model's depth; tokens must be
    identical at every step whose reference top-2 margin is over twice that bound, log-probs
    within twice it, and the comparison of a prompt stops at its first near tie (the first answer
    token of "What is the capital of France?" is one: 25.33 for "The" against 25.24 for "L")."""
    tok = load_tokenizer(smollm2[1])
    prompt_list = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}])) for c in CHATS]
    prompt_list += [tok.encode(p) for p in PLAIN]
    engine = make_engine(smollm2[1], dtype="float32", max_model_len=256)
    try:
        results = run(engine, requests(prompt_list, greedy(MAX_TOKENS)))
    finally:
        engine.shutdown()
    model = load_hf(smollm2[1])
    compared = 0
    for i, prompt in enumerate(prompt_list):
        got = results[f"r{i}"]
        compared += assert_matches_reference(got.tokens, got.log_probs, hf_greedy(model, prompt, MAX_TOKENS),
                                             engine.spec, f"prompt {i}")
    assert compared >= 0.5 * MAX_TOKENS * len(prompt_list)


@pytest.mark.unit
def test_conversion_equals_transformers_gguf_loader(smollm2_gguf, smollm2):
    """transformers' own GGUF reader (its tensor-name map and Q/K reverse permutation) gives
    tensors bit-identical to our converted checkpoint, so the GGUF-loaded and the HF-loaded
    model compute the same logits (same code, same weights)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only for transformers' name map: no weights allocated
        skeleton = LlamaForCausalLM(AutoConfig.from_pretrained(smollm2[1]))
    theirs = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(smollm2[1] / "model.safetensors")
    assert set(theirs) == set(ours)  # no lm_head.weight in either: tied to the embedding
    for name, value in theirs.items():
        assert torch.equal(torch.as_tensor(value).float(), ours[name]), name


@pytest.mark.unit
def test_build_is_checked_and_records_its_origin(smollm2):
    manifest = json.loads((smollm2[1] / "gguf_tensors.json").read_text())
    assert manifest["recipe"]["gguf_sha256"] == GGUF_SHA256 != WHEEL_SHA256
    types = {t["ggml_type"] for t in manifest["tensors"].values()}
    assert types == {"Q4_1", "Q8_0", "F32"}
    config = json.loads((smollm2[1] / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"], config["rope_theta"],
            config["tie_word_embeddings"]) == (30, 576, 3, 100000.0, True)
    assert manifest["recipe"]["weights_dtype"] == "float32"
    assert list(smollm2) == [1]  # version 2 is version 1's checkpoint, quantised at load (no copy built)
