"""TrtLlmEngine against the fake tensorrt_llm: streaming, finish reasons, cancellation, errors, config."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from trtllm_helpers import ENGINE_MAX_SEQ_LEN, VOCAB_SIZE, Collector, host_params

from trillm.engine.types import FinishReason, GenerationRequest, SamplingParams
from trillm.triton.errors import ConfigError, InputError
from trillm.trtllm import create_trtllm_engine
from trillm.trtllm.outputs import new_log_probs
from trillm.trtllm.runtime import TrtLlmUnavailable

pytestmark = pytest.mark.unit


@pytest.fixture
def engine(fake_trtllm, engine_dir):
    engine = create_trtllm_engine(host_params(engine_dir))
    yield engine
    engine.shutdown()


def llm(fake_trtllm):
    (instance,) = fake_trtllm.LLM.instances
    return instance


def run(engine, prompt=(10,), request_id="r1", **sampling) -> Collector:
    collector = Collector()
    params = SamplingParams(**{"max_tokens": 5, **sampling})
    engine.submit(GenerationRequest(request_id, list(prompt), params), collector)
    collector.wait()
    return collector


def assert_one_final(collector: Collector) -> None:
    assert [out.finished for out in collector.outputs].count(True) == 1
    assert collector.outputs[-1].finished


# -- loading -----------------------------------------------------------------
def test_llm_is_created_from_the_engine_dir_and_parameters(fake_trtllm, engine_dir):
    engine = create_trtllm_engine(host_params(
        engine_dir, max_model_len=4096, max_num_seqs=100, max_num_batched_tokens=128,
        kv_cache_blocks=10, block_size=16, enable_prefix_caching=False,
    ))
    try:
        kwargs = llm(fake_trtllm).kwargs
        assert llm(fake_trtllm).model == engine_dir
        assert kwargs["skip_tokenizer_init"] is True
        assert kwargs["gather_generation_logits"] is True
        assert kwargs["max_batch_size"] == 8  # capped at the engine's build limit
        assert kwargs["max_num_tokens"] == 128
        assert kwargs["kv_cache_config"] == fake_trtllm.KvCacheConfig(enable_block_reuse=False, max_tokens=160)
        assert engine.max_model_len == ENGINE_MAX_SEQ_LEN  # capped at the engine's max_seq_len
        assert engine.vocab_size == VOCAB_SIZE
    finally:
        engine.shutdown()


def test_runtime_limits_above_the_engines_are_capped_where_tensorrt_llm_would_refuse_them(fake_trtllm, engine_dir):
    engine = create_trtllm_engine(host_params(engine_dir, max_num_seqs=1000, max_num_batched_tokens=100000))
    try:
        kwargs = llm(fake_trtllm).kwargs
        assert (kwargs["max_batch_size"], kwargs["max_num_tokens"]) == (8, 512)
        assert engine.max_input_len == 200  # the engine's max_input_len, below its max_num_tokens
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="max_batch_size \\[9\\] is greater than build_config.max_batch_size"):
        fake_trtllm.LLM(model=str(engine_dir), max_batch_size=9)


def test_zero_parameters_leave_the_engine_limits(fake_trtllm, engine_dir):
    engine = create_trtllm_engine(host_params(engine_dir, max_model_len=100))
    try:
        kwargs = llm(fake_trtllm).kwargs
        assert "max_batch_size" not in kwargs and "max_num_tokens" not in kwargs
        assert kwargs["kv_cache_config"] == fake_trtllm.KvCacheConfig(enable_block_reuse=True)
        assert engine.max_model_len == 100
    finally:
        engine.shutdown()


def test_a_version_pointer_wins_over_engine_dir(fake_trtllm, engine_dir, tmp_path):
    version_dir = tmp_path / "3"
    version_dir.mkdir()
    (version_dir / "engine.json").write_text(json.dumps({"engine_dir": str(engine_dir)}))
    engine = create_trtllm_engine(host_params("/nonexistent/engine"), version_dir=version_dir)
    try:
        assert llm(fake_trtllm).model == engine_dir
    finally:
        engine.shutdown()


def test_no_engine_dir_is_a_config_error_naming_build_engine(fake_trtllm):
    with pytest.raises(ConfigError, match="engine_dir.*trillm build-engine"):
        create_trtllm_engine(host_params(""))


def test_a_dir_that_is_no_engine_is_a_config_error(fake_trtllm, tmp_path):
    with pytest.raises(ConfigError, match="not a TensorRT-LLM engine directory"):
        create_trtllm_engine(host_params(tmp_path))


def test_missing_tensorrt_llm_names_what_to_install(monkeypatch, engine_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # `import tensorrt_llm` raises ImportError
    with pytest.raises(TrtLlmUnavailable) as info:
        create_trtllm_engine(host_params(engine_dir))
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "import tensorrt_llm" in message and 'pip install "tensorrt_llm>=1.0,<1.3"' in message
    assert "nvcr.io/nvidia/tritonserver" in message and "engine_kind 'torch'" in message


@pytest.mark.parametrize("version", ["1.0.0", "1.0.1rc2", "1.1.0rc5", "1.2.0", "1.2.1+cu128", "1.2.0.post1"])
def test_versions_in_the_supported_range_load(monkeypatch, engine_dir, version):
    import fake_tensorrt_llm

    fake_tensorrt_llm.install(monkeypatch, version=version)
    create_trtllm_engine(host_params(engine_dir)).shutdown()


@pytest.mark.parametrize("version", ["0.21.0", "1.0.0rc3", "1.3.0rc1", "1.3.0", "2.0.0", "unknown"])
def test_a_version_outside_the_supported_range_is_refused_naming_the_range(monkeypatch, engine_dir, version):
    import fake_tensorrt_llm

    fake = fake_tensorrt_llm.install(monkeypatch, version=version)
    with pytest.raises(TrtLlmUnavailable) as info:
        create_trtllm_engine(host_params(engine_dir))
    assert f"tensorrt_llm {version} is installed" in str(info.value)
    assert "tensorrt_llm>=1.0,<1.3" in str(info.value)
    assert fake.LLM.instances == []


def test_a_supported_version_without_the_engine_llm_names_what_is_missing(fake_trtllm, monkeypatch, engine_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", None)
    with pytest.raises(TrtLlmUnavailable, match="1.2.0 lacks the LLM API.*_tensorrt_engine.LLM"):
        create_trtllm_engine(host_params(engine_dir))


def test_importing_the_package_never_imports_tensorrt_llm():
    code = (
        "import sys, trillm.trtllm, trillm.trtllm.engine, trillm.trtllm.build, trillm.trtllm.config; "
        "assert 'tensorrt_llm' not in sys.modules, 'tensorrt_llm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- streaming and finish reasons --------------------------------------------
def test_streaming_passes_new_tokens_in_order_then_one_final(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.tokens_per_step = 2
    llm(fake_trtllm).behaviour.empty_first_step = True
    c = run(engine, prompt=[10, 20], max_tokens=5)
    assert [out.token_ids for out in c.outputs] == [[21, 22], [23, 24], [25]]
    assert c.outputs[-1].finish_reason is FinishReason.LENGTH
    assert_one_final(c)
    assert all(out.token_ids for out in c.outputs[:-1])  # no empty increments
    (request,) = llm(fake_trtllm).requests
    assert request.prompt_token_ids == [10, 20] and request.streaming is True


@pytest.mark.parametrize("include_end_id", [False, True])
def test_end_id_finishes_with_end_and_is_not_returned(fake_trtllm, engine, include_end_id):
    llm(fake_trtllm).behaviour.include_end_id = include_end_id
    c = run(engine, prompt=[10], max_tokens=50, end_id=14, return_log_probs=True)
    assert c.tokens == [11, 12, 13]
    assert len(c.log_probs) == 3
    assert c.outputs[-1].finish_reason is FinishReason.END
    assert_one_final(c)


def test_an_extra_end_id_finishes_like_end_id(fake_trtllm, engine):
    c = run(engine, prompt=[10], max_tokens=50, end_id=40, extra_end_ids=(14,))
    assert c.outputs[-1].finish_reason is FinishReason.END
    assert c.tokens == [11, 12, 13]


def test_without_end_id_generation_runs_to_max_tokens(fake_trtllm, engine):
    c = run(engine, prompt=[10], max_tokens=8, end_id=None)
    assert c.tokens == list(range(11, 19))
    assert c.outputs[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("as_floats", [False, True])
@pytest.mark.parametrize("per_response", [False, True])
def test_log_probs_of_the_chosen_tokens_pass_through(fake_trtllm, engine, as_floats, per_response):
    llm(fake_trtllm).behaviour.logprobs_as_floats = as_floats
    llm(fake_trtllm).behaviour.logprobs_per_response = per_response
    llm(fake_trtllm).behaviour.tokens_per_step = 3
    c = run(engine, max_tokens=4, return_log_probs=True)
    assert c.log_probs == pytest.approx([-0.51, -0.52, -0.53, -0.54])
    for out in c.outputs:
        assert len(out.log_probs or []) == len(out.token_ids)


def test_new_log_probs_take_cumulative_or_per_response_lists_and_refuse_others():
    assert new_log_probs([-0.1, -0.2, -0.3], 3, [7, 8]) == [-0.2, -0.3]  # every token's so far
    assert new_log_probs([{7: -0.2}, {8: -0.3}], 3, [7, 8]) == [-0.2, -0.3]  # this response's only
    with pytest.raises(ValueError, match="1 log-probs for 2 new tokens of 3"):
        new_log_probs([-0.3], 3, [7, 8])


def test_no_log_probs_unless_asked(fake_trtllm, engine):
    c = run(engine, max_tokens=3)
    assert all(out.log_probs is None for out in c.outputs)
    assert llm(fake_trtllm).requests[0].sampling_params.logprobs is None


def test_the_sampling_params_reach_generate_async(fake_trtllm, engine):
    run(engine, max_tokens=3, temperature=0.5, top_p=0.8, seed=7, end_id=99, bad_token_seqs=[[1], [2, 3]])
    params = llm(fake_trtllm).requests[0].sampling_params
    assert (params.temperature, params.top_p, params.seed, params.end_id) == (0.5, 0.8, 7, 99)
    assert params._get_bad_words() == [[1], [2, 3]]


# -- min_tokens: every end id is held back, none before it -----------------------------------------------------
@pytest.mark.parametrize("end_ids", [dict(end_id=12), dict(end_id=40, extra_end_ids=(12,))])
def test_min_tokens_holds_back_end_id_and_the_extra_end_ids_alike(fake_trtllm, engine, end_ids):
    # The fake prefers 11, 12, 13...: the end token 12 is ruled out at the second step, so 13 comes.
    held = run(engine, prompt=[10], max_tokens=5, min_tokens=3, **end_ids)
    assert held.tokens == [11, 13, 14, 15, 16] and held.outputs[-1].finish_reason is FinishReason.LENGTH
    ends = run(engine, prompt=[10], request_id="r2", max_tokens=5, min_tokens=1, **end_ids)
    assert ends.tokens == [11] and ends.outputs[-1].finish_reason is FinishReason.END


def test_without_min_tokens_the_end_token_may_come_first(fake_trtllm, engine):
    c = run(engine, prompt=[10], max_tokens=5, end_id=11)
    assert c.tokens == [] and c.outputs[-1].finish_reason is FinishReason.END


def test_a_penalty_this_tensorrt_llm_would_apply_to_the_prompt_is_an_input_error(monkeypatch, engine_dir):
    import fake_tensorrt_llm

    fake_tensorrt_llm.install(monkeypatch, version="1.1.0")
    engine = create_trtllm_engine(host_params(engine_dir))
    try:
        with pytest.raises(InputError) as info:
            engine.submit(GenerationRequest("r1", [10], SamplingParams(max_tokens=5, presence_penalty=0.5)),
                          Collector())
        assert info.value.input_name == "presence_penalty"
        assert run(engine, request_id="r2", max_tokens=2, repetition_penalty=1.2).tokens == [11, 12]
    finally:
        engine.shutdown()


def test_unseeded_requests_get_different_seeds(fake_trtllm, engine):
    run(engine, request_id="a", temperature=1.0)
    run(engine, request_id="b", temperature=1.0)
    seeds = {r.sampling_params.seed for r in llm(fake_trtllm).requests}
    assert len(seeds) == 2 and None not in seeds


def test_concurrent_requests_each_get_their_own_stream(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.step_delay = 0.001
    collectors = {}
    for i in range(8):
        collectors[i] = Collector()
        engine.submit(GenerationRequest(f"r{i}", [10 * i], SamplingParams(max_tokens=4 + i)), collectors[i])
    for i, c in collectors.items():
        c.wait()
        assert c.tokens == [(10 * i + k) % VOCAB_SIZE for k in range(1, 5 + i)]
        assert_one_final(c)
    assert engine.stats()["running"] == 0


def test_stats_count_tokens(fake_trtllm, engine):
    run(engine, prompt=[1, 2, 3], max_tokens=4)
    stats = engine.stats()
    assert (stats["prompt_tokens_total"], stats["generation_tokens_total"], stats["running"]) == (3, 4, 0)


# -- cancellation and errors -------------------------------------------------
def test_cancel_aborts_the_request_and_finishes_it_cancelled(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.step_delay = 0.01
    c = Collector()
    engine.submit(GenerationRequest("r1", [10], SamplingParams(max_tokens=200)), c)
    assert c.first.wait(5)
    engine.cancel("r1")
    final = c.wait()
    assert final.finish_reason is FinishReason.CANCELLED
    assert llm(fake_trtllm).requests[0].aborted
    count = len(c.outputs)
    time.sleep(0.1)
    assert len(c.outputs) == count  # nothing after the final output
    assert_one_final(c)
    assert len(c.tokens) < 200


def test_cancel_does_not_wait_for_tensorrt_llms_own_cancelled_output(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.step_delay = 0.01
    llm(fake_trtllm).behaviour.cancel_after_steps = 10**6  # the runtime's CANCELLED would come much later
    c = Collector()
    engine.submit(GenerationRequest("r1", [10], SamplingParams(max_tokens=200)), c)
    assert c.first.wait(5)
    engine.cancel("r1")
    assert c.wait().finish_reason is FinishReason.CANCELLED
    assert_one_final(c)
    assert run(engine, request_id="r2", max_tokens=2).tokens == [11, 12]


def test_cancel_of_an_unknown_or_finished_request_is_a_no_op(fake_trtllm, engine):
    c = run(engine, max_tokens=2)
    engine.cancel("r1")
    engine.cancel("never-submitted")
    time.sleep(0.05)
    assert_one_final(c)
    assert not llm(fake_trtllm).requests[0].aborted


def test_a_request_error_in_the_stream_finishes_that_request_and_the_engine_carries_on(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.fail_after_steps = 2
    c = run(engine, max_tokens=10)
    assert c.outputs[-1].finish_reason is FinishReason.ERROR
    assert "fake per-request failure" in c.outputs[-1].error
    assert c.tokens == [11, 12]
    assert_one_final(c)
    llm(fake_trtllm).behaviour.fail_after_steps = None
    assert run(engine, request_id="r2", max_tokens=3).tokens == [11, 12, 13]


def test_a_request_the_runtime_refuses_at_submission_finishes_with_error(fake_trtllm, engine):
    # top_p 0 passes nowhere in the host; sent to the engine directly, the runtime's own check refuses it.
    c = run(engine, max_tokens=3, temperature=1.0, top_p=0.0)
    assert c.outputs[-1].finish_reason is FinishReason.ERROR and "topP" in c.outputs[-1].error
    assert llm(fake_trtllm).requests == []
    assert run(engine, request_id="r2", max_tokens=2).tokens == [11, 12]


def test_an_executor_failure_ends_every_request_in_flight_and_every_later_one(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.step_delay = 0.01
    llm(fake_trtllm).behaviour.fatal_after_steps = 3
    collectors = [Collector(), Collector()]
    for i, c in enumerate(collectors):
        engine.submit(GenerationRequest(f"r{i}", [10], SamplingParams(max_tokens=200)), c)
    for c in collectors:
        assert c.wait().finish_reason is FinishReason.ERROR
        assert "TensorRT-LLM stopped" in c.outputs[-1].error and "fake executor failure" in c.outputs[-1].error
        assert_one_final(c)
    later = run(engine, request_id="r3", max_tokens=2)
    assert later.outputs[-1].finish_reason is FinishReason.ERROR and "TensorRT-LLM stopped" in later.outputs[-1].error
    assert engine.stats()["running"] == 0


def test_a_prompt_longer_than_the_engine_takes_is_refused_with_value_error(fake_trtllm, engine):
    # The engine dir's max_input_len is 200; the runtime would fail the request only from inside its stream.
    c = Collector()
    with pytest.raises(ValueError, match="201 tokens, more than this TensorRT-LLM engine takes \\(200"):
        engine.submit(GenerationRequest("r1", [1] * 201, SamplingParams(max_tokens=10)), c)
    assert c.outputs == [] and llm(fake_trtllm).requests == []


def test_a_prompt_over_the_runtime_max_num_tokens_is_refused_too(fake_trtllm, engine_dir):
    engine = create_trtllm_engine(host_params(engine_dir, max_num_batched_tokens=128))
    try:
        assert engine.max_input_len == 128
        with pytest.raises(ValueError, match="129 tokens"):
            engine.submit(GenerationRequest("r1", [1] * 129, SamplingParams(max_tokens=10)), Collector())
        assert run(engine, prompt=[1] * 128, max_tokens=2).outputs[-1].finish_reason is FinishReason.LENGTH
    finally:
        engine.shutdown()


def test_a_request_too_long_for_the_engine_is_refused_with_value_error(fake_trtllm, engine):
    c = Collector()
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit(GenerationRequest("r1", [1] * 200, SamplingParams(max_tokens=ENGINE_MAX_SEQ_LEN - 199)), c)
    assert c.outputs == [] and engine.stats()["running"] == 0


def test_a_duplicate_request_id_is_refused(fake_trtllm, engine):
    llm(fake_trtllm).behaviour.step_delay = 0.01
    c = Collector()
    engine.submit(GenerationRequest("r1", [10], SamplingParams(max_tokens=100)), c)
    with pytest.raises(ValueError, match="already running"):
        engine.submit(GenerationRequest("r1", [10], SamplingParams(max_tokens=5)), Collector())
    engine.cancel("r1")
    c.wait()


def test_shutdown_cancels_requests_in_flight_and_shuts_the_llm_down(fake_trtllm, engine_dir):
    engine = create_trtllm_engine(host_params(engine_dir))
    llm(fake_trtllm).behaviour.step_delay = 0.01
    c = Collector()
    engine.submit(GenerationRequest("r1", [10], SamplingParams(max_tokens=200)), c)
    assert c.first.wait(5)
    engine.shutdown()
    assert c.outputs[-1].finish_reason is FinishReason.CANCELLED
    assert_one_final(c)
    assert llm(fake_trtllm).shut_down
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(GenerationRequest("r2", [10], SamplingParams(max_tokens=2)), Collector())
    engine.shutdown()  # idempotent
