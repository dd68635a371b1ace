"""Greedy output and log-probs of our engine against transformers' generate().

Tokens are compared exactly and log-probs within a bound derived from float32
rounding over the model's depth (engine_helpers.assert_matches_reference
states the rule), so the tests hold on any CPU whatever kernels it picks.
"""

from __future__ import annotations

import pytest

from engine_helpers import assert_matches_reference, greedy, hf_greedy, load_hf, make_engine, prompts, requests, run

pytestmark = pytest.mark.engine


def _compare(checkpoint, lengths, max_tokens, vocab_size, seed=1, **engine_overrides):
    prompt_list = prompts(seed, lengths, vocab_size)
    engine = make_engine(checkpoint, dtype="float32", **engine_overrides)  # the rule is float32's
    try:
        results = run(engine, requests(prompt_list, greedy(max_tokens)))
    finally:
        engine.shutdown()
    model = load_hf(checkpoint)
    compared = 0
    for i, prompt in enumerate(prompt_list):
        got = results[f"r{i}"]
        assert got.reason.value == "length"
        compared += assert_matches_reference(got.tokens, got.log_probs, hf_greedy(model, prompt, max_tokens),
                                             engine.spec, f"prompt {i} ({len(prompt)} tokens)")
    # The rule skips only the steps after a near tie: at least half the output must have been checked.
    assert compared >= 0.5 * max_tokens * len(prompt_list)


def test_demo_model_matches_transformers(demo_checkpoint):
    # The 300-token prompt is prefilled in chunks of 128, 128 and 44 tokens.
    _compare(demo_checkpoint, [1, 9, 64, 300], 24, 8192, max_model_len=1024)


def test_random_llama_matches_transformers(random_llama):
    """Tied embeddings, MHA, head_dim 32 with hidden 96, llama3 rope scaling, biases."""
    _compare(random_llama, [1, 5, 40, 130], 40, 512, max_model_len=512)


def test_sharded_bf16_gqa_llama_matches_transformers(sharded_bf16_llama):
    """bfloat16 shards (model.safetensors.index.json) converted to float32; GQA; linear rope scaling."""
    _compare(sharded_bf16_llama, [3, 50], 30, 384, max_model_len=256)
