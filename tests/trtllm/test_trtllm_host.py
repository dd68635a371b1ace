"""The TensorRT-LLM engine (on the fake tensorrt_llm) behind the real GenerationHost and demo tokenizer."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading

import pytest
from trtllm_helpers import host_params

from trillm.host import GenerationHost, HostRequest, HostResponse
from trillm.tokenizer import load_tokenizer
from trillm.triton.errors import InputError
from trillm.triton.engine_host import EngineHostParams
from trillm.trtllm import create_trtllm_engine

pytestmark = pytest.mark.unit

PROMPT = [1, 300, 301]


def make_host(demo_model_dir, tmp_path) -> GenerationHost:
    """The real host on a TensorRT-LLM engine (the fake one installed) for the demo model."""
    vocab_size = json.loads((demo_model_dir / "config.json").read_text())["vocab_size"]
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "config.json").write_text(json.dumps({
        "pretrained_config": {"vocab_size": vocab_size},
        "build_config": {"max_batch_size": 8, "max_input_len": 256, "max_seq_len": 512, "max_num_tokens": 1024},
    }))
    params = EngineHostParams(checkpoint_dir=str(demo_model_dir), engine_kind="tensorrt_llm",
                              engine_dir=str(engine_dir), max_model_len=512)
    return GenerationHost(create_trtllm_engine(params), load_tokenizer(str(demo_model_dir)))


@pytest.fixture
def host(fake_trtllm, demo_model_dir, tmp_path):
    host = make_host(demo_model_dir, tmp_path)
    yield host
    host.shutdown()


def the_llm(fake_trtllm):
    (instance,) = fake_trtllm.LLM.instances
    return instance


def call(host, *rows: HostRequest, is_cancelled=lambda: False, timeout=10.0) -> list[HostResponse]:
    responses: queue.SimpleQueue = queue.SimpleQueue()
    host.start(list(rows), send=responses.put, is_cancelled=is_cancelled)
    out = []
    while not out or not out[-1].final:
        out.append(responses.get(timeout=timeout))
    return out


def test_the_test_params_are_engine_host_params():
    defaults = {f.name: f.default for f in dataclasses.fields(EngineHostParams)}
    assert vars(host_params()) == {k: defaults[k] for k in vars(host_params())}


def test_a_request_generates_the_engines_tokens(fake_trtllm, host):
    (response,) = call(host, HostRequest(input_ids=PROMPT, max_tokens=6))
    assert response.finish_reason == "length" and response.error is None
    assert response.num_output_tokens == 6 and response.num_input_tokens == 3
    assert response.output_ids[-6:] == list(range(302, 308))
    (request,) = the_llm(fake_trtllm).requests
    assert request.prompt_token_ids == PROMPT and request.sampling_params.max_tokens == 6


def test_streamed_text_concatenates_to_the_whole_text(fake_trtllm, host):
    the_llm(fake_trtllm).behaviour.tokens_per_step = 2
    (whole,) = call(host, HostRequest(input_ids=PROMPT, max_tokens=9))
    pieces = call(host, HostRequest(input_ids=PROMPT, max_tokens=9, streaming=True))
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].finish_reason == "length" and [p.final for p in pieces].count(True) == 1


def test_end_id_ends_the_sequence(fake_trtllm, host):
    (response,) = call(host, HostRequest(input_ids=PROMPT, max_tokens=20, end_id=305))
    assert response.finish_reason == "end"
    assert response.num_output_tokens == 3


def test_log_probs_reach_the_response(fake_trtllm, host):
    (response,) = call(host, HostRequest(input_ids=PROMPT, max_tokens=4, return_log_probs=True))
    assert response.output_log_probs == pytest.approx([-0.51, -0.52, -0.53, -0.54])
    assert response.cum_log_prob == pytest.approx(sum(response.output_log_probs))


def test_return_sequences_are_separate_engine_requests_with_consecutive_seeds(fake_trtllm, host):
    responses = call(host, HostRequest(input_ids=PROMPT, max_tokens=3, temperature=1.0, seed=40,
                                       num_return_sequences=2))
    assert sorted(r.sequence_index for r in responses) == [0, 1]
    assert sorted(r.sampling_params.seed for r in the_llm(fake_trtllm).requests) == [40, 41]


def test_a_client_cancel_aborts_the_tensorrt_llm_request(fake_trtllm, host):
    the_llm(fake_trtllm).behaviour.step_delay = 0.01
    cancelled = threading.Event()
    responses: queue.SimpleQueue = queue.SimpleQueue()
    host.start([HostRequest(input_ids=PROMPT, max_tokens=400, streaming=True)], send=responses.put,
               is_cancelled=cancelled.is_set)
    responses.get(timeout=10)
    cancelled.set()
    out = []
    while not out or not out[-1].final:
        out.append(responses.get(timeout=10))
    assert out[-1].finish_reason == "cancelled"
    assert the_llm(fake_trtllm).requests[0].aborted


def test_a_prompt_longer_than_the_engine_takes_is_an_input_error(fake_trtllm, host):
    with pytest.raises(InputError, match="257 tokens, more than this TensorRT-LLM engine takes"):
        call(host, HostRequest(input_ids=[300] * 257, max_tokens=4))
    assert call(host, HostRequest(input_ids=PROMPT, max_tokens=2))[0].finish_reason == "length"


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_before_1_2_a_penalty_counting_the_prompt_is_an_input_error_naming_it(monkeypatch, demo_model_dir, tmp_path,
                                                                              name):
    import fake_tensorrt_llm

    fake_tensorrt_llm.install(monkeypatch, version="1.1.0")
    host = make_host(demo_model_dir, tmp_path)
    try:
        with pytest.raises(InputError, match=f"'{name}': must be 0 on this server"):
            call(host, HostRequest(input_ids=PROMPT, max_tokens=4, temperature=1.0, **{name: 0.5}))
        (response,) = call(host, HostRequest(input_ids=PROMPT, max_tokens=4, temperature=1.0))
        assert response.finish_reason == "length"
    finally:
        host.shutdown()
