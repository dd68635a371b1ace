"""The wire contract end to end through a real tritonserver (tests/conftest.py)."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from triton_calls import grpc_stream, http_generate, http_generate_stream

pytestmark = pytest.mark.server

MODELS = ["preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"]
PROMPTS = [
    "The quick brown fox",
    "Grüße aus Köln, café crème",
    "東京の天気は 🌸🙂 and emoji 👩‍👩‍👧",
]


def all_paths(server, model: str, payload: dict) -> dict[str, str]:
    """The same greedy request over every transport; returns each path's text."""
    texts = {}
    for name, result in {
        "http generate": http_generate(server.http_url, model, {**payload, "stream": False}),
        "http generate_stream": http_generate_stream(server.http_url, model, {**payload, "stream": True}),
        "grpc stream=false": grpc_stream(server.grpc_url, model, {**payload, "stream": False}),
        "grpc stream=true": grpc_stream(server.grpc_url, model, {**payload, "stream": True}),
    }.items():
        assert result.error is None, f"{name}: {result.error}"
        texts[name] = result.text
    return texts


def test_all_models_ready(triton_server):
    for model in MODELS:
        with urllib.request.urlopen(f"http://{triton_server.http_url}/v2/models/{model}/ready") as r:
            assert r.status == 200, model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_transport_gives_the_same_greedy_text(triton_server, prompt):
    texts = all_paths(triton_server, "ensemble", {"text_input": prompt, "max_tokens": 24})
    reference = texts["grpc stream=false"]
    assert reference, "the model generated no text"
    assert all(text == reference for text in texts.values()), texts


@pytest.mark.parametrize("prompt", PROMPTS[1:])
def test_bls_gives_the_ensembles_text(triton_server, prompt):
    payload = {"text_input": prompt, "max_tokens": 24}
    ensemble = all_paths(triton_server, "ensemble", payload)
    bls = all_paths(triton_server, "tensorrt_llm_bls", payload)
    assert set(bls.values()) == set(ensemble.values()) and len(set(bls.values())) == 1, (bls, ensemble)


def test_streamed_pieces_are_many_and_exact(triton_server):
    payload = {"text_input": PROMPTS[2], "max_tokens": 32}
    streamed = grpc_stream(triton_server.grpc_url, "ensemble", {**payload, "stream": True})
    whole = grpc_stream(triton_server.grpc_url, "ensemble", {**payload, "stream": False})
    assert len(streamed.pieces) > 3
    assert streamed.text.encode("utf-8") == whole.text.encode("utf-8")


def test_only_text_input_max_tokens_and_stream(triton_server):
    """The issue's "done when": a tritonclient gRPC streaming request with only three inputs."""
    result = grpc_stream(triton_server.grpc_url, "ensemble", {"text_input": "Hello", "max_tokens": 8, "stream": True})
    assert result.error is None and result.text


def test_prompt_is_echoed_only_when_asked(triton_server):
    prompt = "Once upon a time"
    plain = http_generate(triton_server.http_url, "ensemble", {"text_input": prompt, "max_tokens": 12})
    echo = http_generate(
        triton_server.http_url, "ensemble", {"text_input": prompt, "max_tokens": 12, "exclude_input_in_output": False}
    )
    assert not plain.text.startswith(prompt)
    assert echo.text == prompt + plain.text
    streamed = grpc_stream(
        triton_server.grpc_url, "ensemble",
        {"text_input": prompt, "max_tokens": 12, "stream": True, "exclude_input_in_output": True},
    )
    assert streamed.text == plain.text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_word_stops_and_is_not_returned(triton_server, stream):
    prompt = "The quick brown fox"
    full = http_generate(triton_server.http_url, "ensemble", {"text_input": prompt, "max_tokens": 40}).text
    assert len(full) > 20
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    payload = {"text_input": prompt, "max_tokens": 40, "stop_words": [stop], "stream": stream}
    result = grpc_stream(triton_server.grpc_url, "ensemble", payload)
    assert result.error is None
    assert result.text == expected
    assert stop not in result.text
    final = result.responses[-1]
    assert final["finish_reason"].reshape(-1)[0] == b"stop"


def test_counts_log_probs_and_finish_reason(triton_server):
    result = grpc_stream(
        triton_server.grpc_url, "ensemble",
        {"text_input": "Count me", "max_tokens": 10, "return_log_probs": True,
         "return_num_input_tokens": True, "return_num_output_tokens": True},
    )
    response = result.responses[-1]
    assert int(response["num_output_tokens"].reshape(-1)[0]) == 10
    assert int(response["num_input_tokens"].reshape(-1)[0]) >= 2
    log_probs = response["output_log_probs"].reshape(-1)
    assert log_probs.shape == (10,) and np.all(log_probs <= 0)
    assert float(response["cum_log_probs"].reshape(-1)[0]) == pytest.approx(float(log_probs.sum()), rel=1e-4)
    assert response["finish_reason"].reshape(-1)[0] == b"length"


def test_seeded_sampling_repeats(triton_server):
    payload = {"text_input": "Roll the dice", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first = http_generate(triton_server.http_url, "ensemble", payload)
    second = http_generate(triton_server.http_url, "ensemble", payload)
    assert first.error is None and first.text == second.text


# --- bad input -------------------------------------------------------------

def bad_http(server, payload, path="generate"):
    call = http_generate if path == "generate" else http_generate_stream
    return call(server.http_url, "ensemble", payload).error


BAD_INPUTS = [
    ({"max_tokens": 8}, "text_input"),
    ({"text_input": "hi"}, "max_tokens"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
    ({"text_input": "hi", "max_tokens": -5}, "max_tokens"),
    ({"text_input": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"text_input": "", "max_tokens": 8}, "text_input"),
    ({"text_input": "word " * 3000, "max_tokens": 8}, "text_input"),
    # Triton parses the JSON of /generate before any model runs, and its type
    # errors name the rule but not the input (gRPC ones name both: see below).
    ({"text_input": "hi", "max_tokens": "many"}, "non-signed-integer as signed-integer"),
    ({"text_input": "hi", "max_tokens": 8, "top_p": 2.0}, "top_p"),
    ({"text_input": "hi", "max_tokens": 8, "temperature": -1.0}, "temperature"),
    # The model cannot tell /generate from /generate_stream: Triton refuses the
    # second response of a streamed request with this rule.
    ({"text_input": "hi", "max_tokens": 8, "stream": True}, "use generate stream"),
]


@pytest.mark.parametrize("payload,name", BAD_INPUTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_INPUTS)])
def test_bad_input_is_named_and_the_server_carries_on(triton_server, payload, name):
    good: dict = {}

    def good_request():
        good["result"] = grpc_stream(
            triton_server.grpc_url, "ensemble", {"text_input": "Keep going", "max_tokens": 48, "stream": True}
        )

    worker = threading.Thread(target=good_request)
    worker.start()
    error = bad_http(triton_server, payload)
    worker.join(timeout=300)
    assert error is not None, f"{payload} was accepted"
    assert name in error, error
    assert good["result"].error is None and good["result"].text
    assert triton_server.is_ready()


def test_bad_input_on_bls_is_named(triton_server):
    error = http_generate(triton_server.http_url, "tensorrt_llm_bls", {"text_input": "", "max_tokens": 8}).error
    assert error is not None and "text_input" in error


def test_invalid_utf8_is_named(triton_server):
    tensor = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"ok \xff\xfe broken"]], dtype=object))
    result = grpc_stream(triton_server.grpc_url, "ensemble", {"text_input": tensor, "max_tokens": 8})
    assert result.error is not None and "text_input" in result.error and "UTF-8" in result.error


def test_wrong_dtype_over_grpc_is_named(triton_server):
    tensor = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[8.0]], dtype=np.float32))
    result = grpc_stream(triton_server.grpc_url, "ensemble", {"text_input": "hi", "max_tokens": tensor})
    assert result.error is not None and "max_tokens" in result.error
