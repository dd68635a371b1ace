"""The TorchEngine contract: validation, cancellation, failure containment, shutdown, stats."""

from __future__ import annotations

import re
import threading

import pytest

from engine_helpers import Collector, greedy, make_engine, prompts, requests, run, wait_until
from trillm.engine import FinishReason, GenerationRequest, SamplingParams

pytestmark = pytest.mark.engine

VOCAB = 8192


@pytest.mark.parametrize(("prompt", "max_tokens", "message"), [
    ([], 4, "prompt_ids: must not be empty"),
    ([5, VOCAB], 4, f"prompt_ids: token {VOCAB} at index 1 is outside the vocabulary [0, {VOCAB})"),
    ([-1], 4, "prompt_ids: token -1 at index 0"),
    ([5], 0, "max_tokens: must be an integer > 0, got 0"),
    ([5] * 1000, 100, "prompt_ids: 1000 prompt tokens + max_tokens 100 exceed max_model_len 1024"),
])
def test_bad_requests_raise_before_enqueueing(demo_engine, prompt, max_tokens, message):
    before = demo_engine.stats()
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        demo_engine.submit(GenerationRequest("bad", prompt, SamplingParams(max_tokens=max_tokens)), print)
    assert demo_engine.stats()["waiting"] == before["waiting"]


def test_duplicate_request_id_is_refused_while_in_flight(demo_engine):
    collector = Collector()
    long = GenerationRequest("dup", [7, 8, 9], SamplingParams(max_tokens=200))
    demo_engine.submit(long, collector)
    with pytest.raises(ValueError, match="^request_id: 'dup' is already in flight"):
        demo_engine.submit(GenerationRequest("dup", [1], SamplingParams(max_tokens=1)), collector)
    demo_engine.cancel("dup")
    assert collector.wait(["dup"])["dup"].reason is FinishReason.CANCELLED
    again = Collector()
    demo_engine.submit(GenerationRequest("dup", [7, 8, 9], SamplingParams(max_tokens=2)), again)
    assert again.wait(["dup"])["dup"].reason is FinishReason.LENGTH


def test_cancel_ends_the_request_within_a_step_and_frees_its_blocks(demo_engine):
    collector = Collector()
    demo_engine.submit(GenerationRequest("c", prompts(5, [100], VOCAB)[0], SamplingParams(max_tokens=500)), collector)
    collector.wait_for_tokens("c", 2)
    assert demo_engine.stats()["kv_blocks_used"] > 0
    with collector._cond:  # no step can deliver while we hold the lock and cancel
        delivered = len(collector.results["c"].outputs)
        demo_engine.cancel("c")
    result = collector.wait(["c"])["c"]
    assert result.reason is FinishReason.CANCELLED
    assert len(result.outputs) <= delivered + 2  # at most the step in flight, then the final one
    assert len(result.tokens) < 500
    assert wait_until(lambda: demo_engine.stats()["kv_blocks_used"] == 0 and demo_engine.stats()["running"] == 0)
    demo_engine.cancel("c")  # finished: a no-op
    demo_engine.cancel("never-submitted")


def test_failing_request_finishes_with_error_while_others_complete(demo_engine):
    good = prompts(6, [10, 30], VOCAB)
    reqs = requests(good, greedy(12)) + [
        GenerationRequest("nan-temperature", [4, 5, 6], SamplingParams(max_tokens=12, temperature=float("nan"), seed=1)),
        GenerationRequest("bad-word-id", [4, 5, 6], SamplingParams(max_tokens=12, bad_token_seqs=[[VOCAB + 3]])),
    ]
    results = run(demo_engine, reqs)
    for rid in ("nan-temperature", "bad-word-id"):
        assert results[rid].reason is FinishReason.ERROR
        assert results[rid].final.error
    for rid in ("r0", "r1"):
        assert results[rid].reason is FinishReason.LENGTH
        assert len(results[rid].tokens) == 12


def test_failed_forward_fails_only_that_steps_requests(demo_engine, monkeypatch):
    original = demo_engine.runner.run
    failed = threading.Event()

    def run_once_failing(chunks):
        if not failed.is_set() and any(c.seq.request_id == "victim" for c in chunks):
            failed.set()
            raise RuntimeError("injected forward failure")
        return original(chunks)

    monkeypatch.setattr(demo_engine.runner, "run", run_once_failing)
    first = run(demo_engine, [GenerationRequest("victim", [9, 9, 9], SamplingParams(max_tokens=4))])["victim"]
    assert first.reason is FinishReason.ERROR and "injected forward failure" in first.final.error
    after = run(demo_engine, requests(prompts(8, [20], VOCAB), greedy(4)))["r0"]
    assert after.reason is FinishReason.LENGTH and len(after.tokens) == 4
    assert wait_until(lambda: demo_engine.stats()["kv_blocks_used"] == 0)


def test_raising_callback_ends_only_its_request(demo_engine):
    def explode(output):
        raise RuntimeError("host bug")

    demo_engine.submit(GenerationRequest("explodes", [3, 4], SamplingParams(max_tokens=50)), explode)
    result = run(demo_engine, requests(prompts(9, [15], VOCAB), greedy(6)))["r0"]
    assert result.reason is FinishReason.LENGTH
    assert wait_until(lambda: demo_engine.stats()["running"] == 0)
    again = run(demo_engine, [GenerationRequest("explodes", [3, 4], SamplingParams(max_tokens=1))])
    assert again["explodes"].reason is FinishReason.LENGTH  # the id was released


def test_stats_report_the_contract_keys(demo_engine):
    stats = demo_engine.stats()
    for key in ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "prefix_cache_hit_blocks",
                "prompt_tokens_total", "generation_tokens_total"):
        assert isinstance(stats[key], int), key
    assert stats["kv_blocks_total"] == demo_engine.limits.kv_cache_blocks
    before = stats["generation_tokens_total"]
    run(demo_engine, requests(prompts(10, [4], VOCAB), greedy(3), prefix="s"))
    assert demo_engine.stats()["generation_tokens_total"] == before + 3
    assert demo_engine.max_model_len == 1024 and demo_engine.vocab_size == VOCAB


def test_shutdown_cancels_requests_in_flight(demo_checkpoint):
    engine = make_engine(demo_checkpoint, max_model_len=256, max_num_seqs=2)
    collector = Collector()
    reqs = requests(prompts(12, [5, 6, 7, 8], VOCAB), SamplingParams(max_tokens=200))
    for request in reqs:
        engine.submit(request, collector)
    collector.wait_for_tokens("r0", 1)
    engine.shutdown()
    results = collector.wait([r.request_id for r in reqs], timeout=5)
    assert all(r.reason is FinishReason.CANCELLED for r in results.values())
    with pytest.raises(RuntimeError):
        engine.submit(GenerationRequest("late", [1], SamplingParams(max_tokens=1)), collector)


def test_the_loop_thread_computes_with_the_configured_threads(demo_checkpoint):
    """OpenMP's thread count is per thread: the loop thread must take the engine's (num_threads=1
    here, not the machine's), and the loading thread's OpenMP workers are released (on Linux,
    where /proc/self/maps names the runtime) so the loop thread's team is the only one."""
    import sys

    import torch

    seen: list[int] = []
    collector = Collector()

    def on_output(output):
        seen.append(torch.get_num_threads())  # called on the loop thread
        collector(output)

    before = torch.get_num_threads()
    engine = make_engine(demo_checkpoint, max_model_len=128, max_num_seqs=2, num_threads=1)
    try:
        engine.submit(GenerationRequest("t", [5, 6, 7], greedy(2)), on_output)
        assert collector.wait(["t"])["t"].finished
        assert seen and set(seen) == {1}
        openmp = engine.stats()["kernels"]["openmp"]
        if sys.platform.startswith("linux"):
            assert openmp.startswith("released the loading thread's workers") or "lacks" in openmp, openmp
    finally:
        engine.shutdown()
        torch.set_num_threads(before)
