"""The user-facing inputs beyond a plain prompt, end to end through the session's
tritonserver (tests/conftest.py): chat ``messages`` rendered with the model's
own template, required inputs named when missing on every transport, and
``min_length`` (genai-perf's name for min_tokens)."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from triton_calls import grpc_stream, http_generate, http_generate_stream
from trillm.tokenizer import load_tokenizer

pytestmark = pytest.mark.server

MODELS = ["ensemble", "tensorrt_llm_bls"]
CHAT = json.dumps([
    {"role": "system", "content": "Réponds brièvement."},
    {"role": "user", "content": "東京の天気は? 🌸 Grüße"},
])


def grpc_inputs(payload: dict) -> dict:
    """``payload`` for triton_calls.grpc_stream, with our inputs as tensors of their declared types."""
    out = dict(payload)
    if "messages" in out:
        out["messages"] = tensor("messages", np.array([[out["messages"].encode()]], dtype=object))
    if "min_length" in out:
        out["min_length"] = tensor("min_length", np.array([[out["min_length"]]], dtype=np.int32))
    return out


def tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    kind = "BYTES" if array.dtype == object else {np.dtype(np.int32): "INT32"}[array.dtype]
    t = grpcclient.InferInput(name, list(array.shape), kind)
    t.set_data_from_numpy(array)
    return t


TRANSPORTS = {
    "http generate": lambda s, m, p: http_generate(s.http_url, m, {**p, "stream": False}),
    "http generate_stream": lambda s, m, p: http_generate_stream(s.http_url, m, {**p, "stream": True}),
    "grpc stream=false": lambda s, m, p: grpc_stream(s.grpc_url, m, grpc_inputs({**p, "stream": False})),
    "grpc stream=true": lambda s, m, p: grpc_stream(s.grpc_url, m, grpc_inputs({**p, "stream": True})),
}


def every_transport(server, model: str, payload: dict) -> dict:
    return {name: call(server, model, payload) for name, call in TRANSPORTS.items()}


# --- chat ------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_chat_is_rendered_with_the_models_template_on_every_transport(triton_server, demo_model_dir, model):
    results = every_transport(triton_server, model, {"messages": CHAT, "max_tokens": 16,
                                                     "return_num_input_tokens": True})
    for name, result in results.items():
        assert result.error is None, f"{name}: {result.error}"
    texts = {name: result.text for name, result in results.items()}
    assert texts["grpc stream=false"] and len(set(texts.values())) == 1, texts
    tok = load_tokenizer(demo_model_dir)  # version 2 has the same tokenizer
    prompt = tok.encode(tok.apply_chat_template(json.loads(CHAT), add_generation_prompt=True), add_special_tokens=False)
    counted = results["http generate"].responses[-1]["num_input_tokens"]
    assert counted == len(prompt), "the prompt is the rendered chat, its special tokens written by the template"


def test_chat_streams_exactly(triton_server):
    payload = {"messages": CHAT, "max_tokens": 32}
    streamed = grpc_stream(triton_server.grpc_url, "ensemble", grpc_inputs({**payload, "stream": True}))
    whole = grpc_stream(triton_server.grpc_url, "ensemble", grpc_inputs({**payload, "stream": False}))
    assert streamed.error is None and whole.error is None
    assert len(streamed.pieces) > 3
    assert streamed.text.encode("utf-8") == whole.text.encode("utf-8")


BAD_CHATS = [
    ({"messages": CHAT, "text_input": "hi"}, "not both"),
    ({"messages": "[{"}, "not valid JSON"),
    ({"messages": '{"role": "user", "content": "hi"}'}, "JSON list"),
    ({"messages": '[{"role": "user"}]'}, 'no "content"'),
    ({"messages": '[{"role": "user", "content": 7}]'}, '"content" must be a string'),
    # The demo template's own raise_exception().
    ({"messages": '[{"role": "tool", "content": "x"}]'}, "roles must be system, user or assistant"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("payload,rule", BAD_CHATS, ids=[r for _, r in BAD_CHATS])
def test_a_bad_chat_is_named(triton_server, model, payload, rule):
    result = grpc_stream(triton_server.grpc_url, model, grpc_inputs({**payload, "max_tokens": 8}))
    assert result.error is not None and "input 'messages'" in result.error and rule in result.error, result.error
    assert triton_server.is_ready()


# --- required inputs -----------------------------------------------------------

MISSING = [
    ({"text_input": "hi"}, "input 'max_tokens': is required"),
    ({"messages": CHAT}, "input 'max_tokens': is required"),
    ({"max_tokens": 8}, "input 'text_input': is required"),
    # Only inputs the engine takes: preprocessing still sees the request.
    ({"temperature": 0.5}, "input 'text_input': is required"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("payload,message", MISSING, ids=[str(sorted(p)) for p, _ in MISSING])
def test_a_missing_required_input_is_named_on_every_transport(triton_server, model, payload, message):
    for name, result in every_transport(triton_server, model, payload).items():
        assert result.error is not None, f"{name}: accepted {payload}"
        assert message in result.error, f"{name}: {result.error}"


# --- min_length --------------------------------------------------------------

def engine_ids(server, version: str, input_ids: list[int], max_tokens: int) -> list[int]:
    """The ids ``tensorrt_llm`` generates for ``input_ids`` (greedy, no end id)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tensorrt_llm", [
            tensor("input_ids", np.array([input_ids], dtype=np.int32)),
            tensor("input_lengths", np.array([[len(input_ids)]], dtype=np.int32)),
            tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32)),
        ], model_version=version, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=300)
            assert error is None, error
            if result.get_response().outputs:
                window = result.as_numpy("output_ids").reshape(-1).tolist()
                return window[int(result.as_numpy("prefix_length").reshape(-1)[0]):]
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("model", MODELS)
def test_min_length_is_min_tokens(triton_server, demo_model_dir, served_version, model):
    """genai-perf's fixed-length request (text_input, max_tokens, min_length, stream, INT32 [1, 1]) is
    served, and min_length holds the end id back as min_tokens does."""
    prompt, max_tokens = "The quick brown fox", 12
    generated = engine_ids(triton_server, served_version, load_tokenizer(demo_model_dir).encode(prompt), max_tokens)
    end_id = generated[3]
    stops_at = generated.index(end_id)
    base = {"text_input": prompt, "max_tokens": max_tokens, "end_id": end_id, "return_num_output_tokens": True}

    def run(**extra):
        result = grpc_stream(triton_server.grpc_url, model, grpc_inputs({**base, "stream": True, **extra}),
                             version=served_version)
        assert result.error is None, result.error
        last = result.responses[-1]
        return result.text, int(last["num_output_tokens"].reshape(-1)[0]), last["finish_reason"].reshape(-1)[0]

    assert run()[1:] == (stops_at, b"end")
    held = run(min_length=max_tokens)
    assert held[1:] == (max_tokens, b"length")
    assert run(min_tokens=max_tokens) == held
    assert run(min_tokens=max_tokens, min_length=max_tokens) == held


@pytest.mark.parametrize("model", MODELS)
def test_min_length_and_min_tokens_that_differ_are_named(triton_server, model):
    payload = {"text_input": "hi", "max_tokens": 8, "min_tokens": 2, "min_length": 3}
    for name, result in every_transport(triton_server, model, payload).items():
        assert result.error is not None and "input 'min_length'" in result.error and "min_tokens" in result.error, (
            f"{name}: {result.error}")
