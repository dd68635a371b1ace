"""Continuous batching: outputs do not depend on the batch, on chunking, on preemption or on the prefix cache."""

from __future__ import annotations

import pytest

from engine_helpers import greedy, make_engine, prompts, requests, run, run_alone, wait_until

pytestmark = pytest.mark.engine

VOCAB = 8192
# These tests check float32's invariances with float32's tolerance (1e-4 on a log-prob);
# dtype "auto" and its bfloat16 matmuls are covered by test_engine_dtype.py.
FP32 = "float32"
LENGTHS = [3, 200, 17, 64, 1, 130, 40, 90, 8, 256, 33, 120]
MAX_TOKENS = [20, 8, 32, 12, 25, 16, 30, 10, 22, 14, 28, 18]


@pytest.fixture(scope="module")
def mixed_requests():
    return requests(prompts(7, LENGTHS, VOCAB), [greedy(n) for n in MAX_TOKENS])


@pytest.fixture(scope="module")
def engine(demo_checkpoint):
    """Without prefix caching: a prefix-cache hit computes the prompt's tail on its
    own, which changes log-probs in the last bits (see the prefix cache test)."""
    engine = make_engine(demo_checkpoint, dtype=FP32, max_model_len=1024, enable_prefix_caching=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def alone(engine, mixed_requests):
    """Every request run on its own: the reference for the batching tests."""
    return run_alone(engine, mixed_requests)


def test_batch_invariance_is_bitwise(engine, mixed_requests, alone):
    """Twelve requests of mixed lengths arriving together: each one's tokens and
    log-probs are bit-for-bit those it gets alone (decodes share matmuls with
    prefill chunks and with each other), wherever the engine's probe at load
    says it is batch-invariant on this CPU; where it says it is not, the claim
    is visible in stats() and the tokens still agree on this clear-margin
    workload."""
    together = run(engine, mixed_requests)
    stats = engine.stats()
    assert stats["batch_invariant"] == engine.kernels["batch_invariant"]
    for request in mixed_requests:
        rid = request.request_id
        assert together[rid].tokens == alone[rid].tokens, rid
        if stats["batch_invariant"]:
            assert together[rid].log_probs == alone[rid].log_probs, rid
        assert together[rid].reason.value == "length"
        assert len(together[rid].tokens) == request.params.max_tokens


def test_staggered_arrivals_join_running_batch(engine, mixed_requests, alone):
    """Requests arriving while others decode join the batch (no request waits for
    another to finish) and still produce the same output."""
    results = run(engine, mixed_requests, gap_s=0.02)
    longest = results["r2"]  # 32 tokens, submitted third
    overtaking = [rid for rid in ("r3", "r7", "r8") if results[rid].times[-1] < longest.times[-1]]
    assert overtaking, "later, shorter requests should finish while r2 still decodes"
    assert all(len(r.outputs) >= 2 for r in results.values())  # streamed over several steps
    for request in mixed_requests:
        assert results[request.request_id].tokens == alone[request.request_id].tokens


def assert_same_as_alone(results, alone, requests) -> None:
    """Same tokens as each request run alone; log-probs equal to float tolerance."""
    for request in requests:
        rid = request.request_id
        assert results[rid].tokens == alone[rid].tokens, rid
        assert results[rid].log_probs == pytest.approx(alone[rid].log_probs, abs=1e-4)


def test_chunked_prefill_matches_unchunked(demo_checkpoint, mixed_requests, alone):
    """Prompts prefilled 32 tokens at a time, interleaved with decodes, give the
    same tokens as 256-token chunks (log-probs equal to float tolerance)."""
    engine = make_engine(demo_checkpoint, dtype=FP32, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=40)
    try:
        assert engine.limits.prefill_chunk == 32
        results = run(engine, mixed_requests)
    finally:
        engine.shutdown()
    assert_same_as_alone(results, alone, mixed_requests)


def test_preemption_under_tiny_kv_cache_keeps_outputs(demo_checkpoint, mixed_requests, alone):
    """A cache of 24 blocks (384 tokens) cannot hold the running requests: the
    newest are preempted and recomputed, and every output is unchanged."""
    engine = make_engine(demo_checkpoint, dtype=FP32, max_model_len=384, kv_cache_blocks=24, enable_prefix_caching=False)
    try:
        results = run(engine, mixed_requests)
        assert wait_until(lambda: engine.stats()["kv_blocks_used"] == 0)
        assert engine.stats()["preemptions"] > 0
    finally:
        engine.shutdown()
    assert_same_as_alone(results, alone, mixed_requests)


def test_prefix_cache_reuses_shared_system_prompt(demo_checkpoint):
    """Requests sharing a 70-token system prompt reuse its 4 full blocks (one
    after another, then all at once while the first is still running); the
    output equals an engine without prefix caching."""
    system = prompts(3, [70], VOCAB)[0]
    user_turns = prompts(4, [5, 20, 37, 9], VOCAB)
    reqs = requests([system + turn for turn in user_turns], greedy(12))
    outputs = {}
    for caching in (False, True):
        engine = make_engine(demo_checkpoint, dtype=FP32, max_model_len=512, enable_prefix_caching=caching)
        try:
            outputs[caching] = run_alone(engine, reqs)
            assert wait_until(lambda: engine.stats()["kv_blocks_used"] == 0)
            stats = engine.stats()
            if caching:  # concurrently: decodes read the shared blocks in place
                concurrent = run(engine, requests([system + turn for turn in user_turns], greedy(12), prefix="c"))
        finally:
            engine.shutdown()
        expected_hits = 4 * (len(reqs) - 1) if caching else 0
        assert stats["prefix_cache_hit_blocks"] == expected_hits
        assert stats["prompt_tokens_total"] == sum(len(r.prompt_ids) for r in reqs)
    for i, request in enumerate(reqs):
        rid = request.request_id
        assert outputs[True][rid].tokens == outputs[False][rid].tokens
        assert outputs[True][rid].log_probs == pytest.approx(outputs[False][rid].log_probs, abs=1e-4)
        assert concurrent[f"c{i}"].tokens == outputs[False][rid].tokens
