"""trillm_client without a tritonserver: validation, the exact tensors and JSON
it sends, response and SSE parsing, error mapping, streams, the CLI.

The transport tests run the real client against in-process fakes of Triton's
gRPC service and HTTP generate endpoints (client_fakes.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
from client_fakes import FakeGrpc, FakeHttp, grpc_response, sse
from trillm_client import (
    AsyncClient,
    Client,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestCancelledError,
    RequestTimeoutError,
    TrillmError,
    UnavailableError,
    cli,
)
from trillm_client.chat import Conversation
from trillm_client.client import TextStream, _run_all
from trillm_client.completion import CompletionBuilder
from trillm_client.errors import classify
from trillm_client.params import PARAMETERS, build_request
from trillm_client.transport import split_host_port
from trillm_client.wire import (
    Response,
    SSEParser,
    error_from_http,
    generate_path,
    grpc_request,
    infer_inputs,
    response_from_json,
)
from tritonclient.grpc import _utils as grpc_utils
from tritonclient.utils import deserialize_bytes_tensor

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_grpc():
    server = FakeGrpc().start()
    yield server
    server.stop()


@pytest.fixture
def fake_http():
    server = FakeHttp().start()
    yield server
    server.stop()


def free_port_nothing_listens() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- validation --------------------------------------------------------------

def test_unknown_parameter_lists_the_valid_names():
    with pytest.raises(InvalidInputError) as err:
        build_request("hi", 8, {"temprature": 0.5}, stream=False)
    message = str(err.value)
    assert "'temprature'" in message
    for name in ("temperature", "top_p", "stop_words", "seed", "return_log_probs"):
        assert name in message


@pytest.mark.parametrize(
    "name,value,rule",
    [
        ("top_p", 0.0, "in (0, 1]"),
        ("top_p", 1.5, "in (0, 1]"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), "finite"),
        ("top_k", -1, ">= 0"),
        ("seed", -1, "in [0,"),
        ("seed", 2**64, "in [0,"),
        ("min_tokens", -3, ">= 0"),
        ("beam_width", 0, ">= 1"),
        ("num_return_sequences", 0, ">= 1"),
        ("repetition_penalty", 0.0, "> 0"),
        ("end_id", -2, ">= 0"),
        ("stop_words", ["ok", ""], "empty"),
    ],
)
def test_out_of_range_values_are_named_with_their_rule(name, value, rule):
    with pytest.raises(InvalidInputError) as err:
        build_request("hi", 8, {name: value}, stream=False)
    assert f"parameter '{name}'" in str(err.value) and rule in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "name,value",
    [("top_k", "5"), ("top_k", 2.0), ("top_k", True), ("temperature", "hot"), ("temperature", False),
     ("stream", 1), ("return_log_probs", "yes"), ("stop_words", [b"x"]), ("stop_words", 3), ("seed", 1.5)],
)
def test_wrong_types_are_rejected(name, value):
    with pytest.raises(InvalidInputError, match=f"parameter '{name}': must be"):
        build_request("hi", 8, {name: value}, stream=False)


@pytest.mark.parametrize("max_tokens", [0, -1, 2**31])
def test_max_tokens_must_be_positive_int32(max_tokens):
    with pytest.raises(InvalidInputError, match="parameter 'max_tokens': must be > 0"):
        build_request("hi", max_tokens, {}, stream=False)


def test_max_tokens_and_prompt_types():
    with pytest.raises(InvalidInputError, match="max_tokens': must be an integer"):
        build_request("hi", 8.0, {}, stream=False)
    with pytest.raises(InvalidInputError, match="prompt': must be a string"):
        build_request(b"hi", 8, {}, stream=False)


@pytest.mark.parametrize(
    "prompt", [[], [{"role": "user"}], [{"role": "user", "content": 5}], ["hi"], {"role": "user", "content": "x"}]
)
def test_a_chat_must_be_messages_with_role_and_content(prompt):
    with pytest.raises(InvalidInputError, match="prompt': must be a string .* or a non-empty list of"):
        build_request(prompt, 8, {}, stream=False)


def test_a_chat_is_sent_as_the_messages_input():
    chat = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "東京 🙂?"}]
    request = build_request(chat, 8, {}, stream=False)
    arrays = request.arrays()
    assert "text_input" not in arrays and arrays["messages"].shape == (1, 1)
    assert json.loads(arrays["messages"][0, 0].decode("utf-8")) == chat
    payload = request.json_payload()
    assert "text_input" not in payload and json.loads(payload["messages"]) == chat
    assert "東京" in payload["messages"], "sent as UTF-8, not as JSON escapes"


def test_edges_that_are_valid():
    request = build_request("hi", 1, {"top_p": 1.0, "temperature": 0, "seed": 2**64 - 1, "top_k": 0}, stream=False)
    assert request.inputs["seed"] == 2**64 - 1 and request.inputs["temperature"] == 0.0


def test_validate_false_skips_range_checks_but_not_types():
    request = build_request("hi", 0, {"top_p": 7.0, "top_k": -1}, stream=False, validate=False)
    assert request.max_tokens == 0 and request.inputs["top_p"] == 7.0
    with pytest.raises(InvalidInputError):
        build_request("hi", 0, {"top_k": "many"}, stream=False, validate=False)
    with pytest.raises(InvalidInputError):
        build_request("hi", 0, {"nope": 1}, stream=False, validate=False)


def test_none_means_not_sent_and_counts_are_always_asked_for():
    request = build_request("hi", 4, {"temperature": None, "top_k": 3}, stream=False)
    assert "temperature" not in request.inputs
    assert request.inputs["return_num_input_tokens"] is True
    assert request.inputs["return_num_output_tokens"] is True
    assert build_request("hi", 4, {"return_num_input_tokens": False}, stream=False).inputs[
        "return_num_input_tokens"] is False


def test_stream_default_follows_the_method_and_can_be_overridden():
    assert build_request("hi", 4, {}, stream=False).inputs["stream"] is False
    assert build_request("hi", 4, {}, stream=True).inputs["stream"] is True
    assert build_request("hi", 4, {"stream": True}, stream=False).stream is True


def test_stream_refuses_several_sequences():
    client = Client("127.0.0.1:1", protocol="http")
    with pytest.raises(InvalidInputError, match="num_return_sequences"):
        client.stream("hi", 4, num_return_sequences=2)


@pytest.mark.parametrize("kwargs", [{"protocol": "ftp"}, {"version": "latest"}, {"model": ""}])
def test_client_arguments_are_checked(kwargs):
    with pytest.raises(ValueError):
        Client(**kwargs)


def test_default_urls_and_url_parsing():
    assert Client().url == "127.0.0.1:8001"
    assert Client(protocol="http").url == "127.0.0.1:8000"
    assert Client(version=2).version == "2"
    assert split_host_port("http://localhost:9000/", 8000) == ("localhost", 9000)
    assert split_host_port("myhost", 8000) == ("myhost", 8000)
    assert split_host_port("[::1]:8000", 1) == ("::1", 8000)


# --- request construction -----------------------------------------------------

def full_request():
    return build_request(
        "Grüße 🙂", 16,
        {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 2**63 + 5, "stop_words": ["\n\n", "END"],
         "bad_words": "bad", "return_log_probs": True, "exclude_input_in_output": True},
        stream=True,
    )


def test_arrays_are_the_interface_tensors():
    arrays = full_request().arrays()
    expected = {
        "text_input": (np.object_, (1, 1)), "max_tokens": (np.int32, (1, 1)), "stream": (np.bool_, (1, 1)),
        "exclude_input_in_output": (np.bool_, (1, 1)), "bad_words": (np.object_, (1, 1)),
        "stop_words": (np.object_, (1, 2)), "top_k": (np.int32, (1, 1)), "top_p": (np.float32, (1, 1)),
        "temperature": (np.float32, (1, 1)), "seed": (np.uint64, (1, 1)), "return_log_probs": (np.bool_, (1, 1)),
        "return_num_input_tokens": (np.bool_, (1, 1)), "return_num_output_tokens": (np.bool_, (1, 1)),
    }
    assert {n: (a.dtype.type, a.shape) for n, a in arrays.items()} == expected
    assert arrays["text_input"][0, 0] == "Grüße 🙂".encode()
    assert arrays["stop_words"].tolist() == [[b"\n\n", b"END"]]
    assert arrays["seed"][0, 0] == 2**63 + 5 and arrays["max_tokens"][0, 0] == 16
    assert arrays["top_p"][0, 0] == np.float32(0.9)
    assert list(arrays)[:2] == ["text_input", "max_tokens"]


def test_every_parameter_has_the_interface_dtype():
    interface = {
        "stream": "BOOL", "exclude_input_in_output": "BOOL", "bad_words": "BYTES", "stop_words": "BYTES",
        "end_id": "INT32", "pad_id": "INT32", "top_k": "INT32", "top_p": "FP32", "temperature": "FP32",
        "length_penalty": "FP32", "repetition_penalty": "FP32", "presence_penalty": "FP32",
        "frequency_penalty": "FP32", "min_tokens": "INT32", "seed": "UINT64", "beam_width": "INT32",
        "num_return_sequences": "INT32", "return_log_probs": "BOOL", "return_num_input_tokens": "BOOL",
        "return_num_output_tokens": "BOOL", "min_length": "INT32",
    }
    assert list(PARAMETERS) == list(interface)
    values = {"BOOL": True, "BYTES": ["w"], "INT32": 1, "FP32": 0.5, "UINT64": 1}
    request = build_request("p", 1, {n: values[t] for n, t in interface.items()}, stream=False)
    datatypes = {t.name(): t.datatype() for t in infer_inputs(request.arrays())}
    assert datatypes == {"text_input": "BYTES", "max_tokens": "INT32", **interface}


def test_json_payload_is_inputs_as_top_level_fields():
    payload = full_request().json_payload()
    assert payload == {
        "text_input": "Grüße 🙂", "max_tokens": 16, "stream": True, "exclude_input_in_output": True,
        "bad_words": ["bad"], "stop_words": ["\n\n", "END"], "top_k": 40, "top_p": 0.9, "temperature": 0.7,
        "seed": 2**63 + 5, "return_log_probs": True, "return_num_input_tokens": True,
        "return_num_output_tokens": True,
    }
    json.dumps(payload)


def test_grpc_request_equals_what_tritonclient_builds_for_async_stream_infer():
    request = full_request()
    ours = grpc_request("ensemble", "2", request.arrays(), "req-1")
    theirs = grpc_utils._get_inference_request(
        model_name="ensemble", inputs=infer_inputs(request.arrays()), model_version="2", request_id="req-1",
        outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None,
        parameters=None,
    )
    theirs.parameters["triton_enable_empty_final_response"].bool_param = True  # what async_stream_infer adds
    assert ours == theirs
    index = [i.name for i in ours.inputs].index("stop_words")
    assert deserialize_bytes_tensor(ours.raw_input_contents[index]).tolist() == [b"\n\n", b"END"]


def test_generate_paths():
    assert generate_path("ensemble", "", False) == "/v2/models/ensemble/generate"
    assert generate_path("tensorrt_llm_bls", "2", True) == "/v2/models/tensorrt_llm_bls/versions/2/generate_stream"


# --- responses, SSE ----------------------------------------------------------

def test_sse_parser():
    parser = SSEParser()
    lines = [b": comment\n", b"event: message\n", b"data: {\"a\": 1}\r\n", b"\r\n", b"data:{\"b\":\n",
             b"data: 2}\n", b"\n", b"\n", b"data: tail"]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == ['{"a": 1}', '{"b":\n2}']
    assert parser.end() == "tail" and parser.end() is None


def test_response_from_json_handles_triton_scalars_and_lists():
    one = response_from_json({"text_output": "Hi", "output_log_probs": -0.5, "cum_log_probs": -0.5,
                              "num_output_tokens": 1, "finish_reason": "", "model_version": "3", "batch_index": 0})
    assert (one.text, one.output_log_probs, one.num_output_tokens, one.model_version) == ("Hi", [-0.5], 1, "3")
    many = response_from_json({"text_output": "x", "output_log_probs": [-0.5, -1.0], "sequence_index": 1,
                               "finish_reason": "stop"})
    assert many.output_log_probs == [-0.5, -1.0] and many.sequence_index == 1 and many.finish_reason == "stop"
    with pytest.raises(InvalidInputError, match="input 'top_p'"):
        response_from_json({"error": "input 'top_p': must be in (0, 1], got 2.0"})


def request_for(max_tokens=8, **sampling):
    return build_request("p", max_tokens, sampling, stream=True)


def test_builder_joins_utf8_split_across_responses():
    builder = CompletionBuilder(request_for())
    raw = "a🙂é".encode()
    deltas = [builder.add(Response(text=raw[i : i + 1])) for i in range(len(raw))]
    assert "".join(deltas) == "a🙂é" and deltas[1] == ""
    assert builder.build(0.1).text == "a🙂é"


@pytest.mark.parametrize(
    "reason,count,stop,expected",
    [("stop", 3, None, "stop"), ("", 8, None, "length"), ("", 3, None, "end"), ("", 3, ["x"], "stop"),
     ("", None, None, None)],
)
def test_finish_reason_from_server_or_inferred(reason, count, stop, expected):
    builder = CompletionBuilder(request_for(max_tokens=8, stop_words=stop))
    builder.add(Response(text="t", num_output_tokens=count, finish_reason=reason))
    assert builder.build(0.0).finish_reason == expected


def test_builder_keeps_latest_cumulative_values_and_log_probs_only_when_asked():
    builder = CompletionBuilder(request_for(return_log_probs=True))
    builder.add(Response(text="a", num_input_tokens=4, num_output_tokens=1, cum_log_probs=-1.0,
                         output_log_probs=[-1.0], model_version="2"))
    builder.add(Response(text="b", num_output_tokens=2, cum_log_probs=-3.0, output_log_probs=[-1.0, -2.0]))
    builder.add(Response(text="", num_output_tokens=2, cum_log_probs=-3.0, output_log_probs=[], finish_reason="end"))
    done = builder.build(0.5)
    assert (done.text, done.num_input_tokens, done.num_output_tokens) == ("ab", 4, 2)
    assert done.cum_log_probs == -3.0 and done.output_log_probs == [-1.0, -2.0]
    assert done.model_version == "2" and done.latency == 0.5 and done.finish_reason == "end"
    plain = CompletionBuilder(request_for())
    plain.add(Response(text="a", cum_log_probs=-1.0, output_log_probs=[-1.0]))
    assert plain.build(0).cum_log_probs is None and plain.build(0).output_log_probs is None


def test_builder_orders_sequences():
    builder = CompletionBuilder(request_for(num_return_sequences=2))
    builder.add(Response(text="second", sequence_index=1, num_output_tokens=8))
    builder.add(Response(text="first", sequence_index=0, num_output_tokens=2, finish_reason="end"))
    done = builder.build(0)
    assert done.text == "first" and [s.text for s in done.sequences] == ["first", "second"]
    assert [s.finish_reason for s in done.sequences] == ["end", "length"]


class ListCall:
    def __init__(self, responses, delay=0.0):
        self.responses, self.delay, self.closed = list(responses), delay, False

    def __next__(self):
        if not self.responses:
            raise StopIteration
        time.sleep(self.delay)
        return self.responses.pop(0)

    def close(self):
        self.closed = True


def test_text_stream_yields_non_empty_deltas_and_times_them():
    call = ListCall([Response(text=b""), Response(text=b"He"), Response(text=b"llo"), Response(text=None,
                     num_output_tokens=2, finish_reason="end")], delay=0.01)
    with TextStream(call, CompletionBuilder(request_for()), time.perf_counter()) as stream:
        assert list(stream) == ["He", "llo"]
    assert call.closed
    assert stream.completion.text == "Hello" and stream.completion.finish_reason == "end"
    assert len(stream.token_times) == 2 and stream.ttft == stream.token_times[0] > 0
    assert len(stream.itl) == 1 and stream.itl[0] > 0
    assert list(stream) == []


# --- errors ------------------------------------------------------------------

@pytest.mark.parametrize(
    "message,http,grpc,kind",
    [
        ("Request for unknown model: 'ensemble' version 9 is not found", 404, None, ModelNotFoundError),
        ("Request for unknown model: 'nope' is not found", None, None, ModelNotFoundError),
        ("Request for unknown model: 'broken' has no available versions", 404, None, ModelNotReadyError),
        ("input 'max_tokens': must be > 0, got 0", 400, None, InvalidInputError),
        ("input 'max_tokens': must be > 0, got 0", None, None, InvalidInputError),
        ("[request id: <id_unknown>] expected number of inputs between 2 and 22 but got 1 inputs", None, None,
         InvalidInputError),
        ("Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer", 500, None,
         InvalidInputError),
        ("whatever", None, "StatusCode.INVALID_ARGUMENT", InvalidInputError),
        ("failed to connect to all addresses", None, "StatusCode.UNAVAILABLE", UnavailableError),
        ("Deadline Exceeded", None, "DEADLINE_EXCEEDED", RequestTimeoutError),
        ("Locally cancelled by application!", None, "StatusCode.CANCELLED", RequestCancelledError),
        ("Request was cancelled", None, None, RequestCancelledError),
        ("internal error: RuntimeError('shape mismatch in input')", None, None, TrillmError),
        # Server faults that arrive as stream text: a fault, never a bad input.
        ("in ensemble 'ensemble', server shutting down: the request did not finish within the drain timeout",
         None, None, UnavailableError),
        ("Stub process 'tensorrt_llm_0_0' is not healthy.", 400, None, UnavailableError),
        ("Stream removed (Socket closed (GOAWAY received; Error code: 0; Debug Text: ))", None, None,
         UnavailableError),
    ],
)
def test_classify(message, http, grpc, kind):
    error = classify(message, http_status=http, grpc_code=grpc)
    assert type(error) is kind and error.message == message and str(error) == message


def test_errors_are_also_builtin_kinds():
    assert isinstance(UnavailableError("x"), ConnectionError)
    assert isinstance(RequestTimeoutError("x"), TimeoutError)
    assert isinstance(InvalidInputError("x"), ValueError)
    assert isinstance(ModelNotFoundError("x"), LookupError)


def test_error_from_http_reads_json_and_sse_bodies():
    error = error_from_http(400, b'data: {"error":"input \'max_tokens\': must be > 0, got 0"}\n\n')
    assert isinstance(error, InvalidInputError) and error.status == 400
    assert error.message == "input 'max_tokens': must be > 0, got 0"
    error = error_from_http(404, b'{"error":"Request for unknown model: \'x\' is not found"}')
    assert isinstance(error, ModelNotFoundError)
    assert error_from_http(502, b"").message == "HTTP 502"


# --- gRPC transport against a fake Triton -------------------------------------

def test_grpc_generate_sends_the_stream_request_and_reads_until_final(fake_grpc):
    fake_grpc.script = [
        grpc_response("Hello wor", num_input_tokens=3, num_output_tokens=4, finish_reason="", version="2"),
        grpc_response("ld", num_output_tokens=5, finish_reason="length", version="2"),
        grpc_response(final=True),
    ]
    with Client(fake_grpc.url, version="2") as client:
        done = client.generate("Hi", 5, temperature=0.0)
    assert (done.text, done.num_input_tokens, done.num_output_tokens, done.finish_reason) == (
        "Hello world", 3, 5, "length")
    assert done.model_version == "2" and done.latency > 0
    sent = fake_grpc.requests[0]
    assert sent.model_name == "ensemble" and sent.model_version == "2" and sent.id
    assert sent.parameters["triton_enable_empty_final_response"].bool_param
    names = [i.name for i in sent.inputs]
    assert names == ["text_input", "max_tokens", "stream", "temperature", "return_num_input_tokens",
                     "return_num_output_tokens"]
    stream_flag = sent.raw_input_contents[names.index("stream")]
    assert np.frombuffer(stream_flag, dtype=np.bool_).tolist() == [False]


def test_grpc_stream_yields_pieces_as_they_arrive(fake_grpc):
    pieces = ["Grü", "ße, ", "世界", " 🙂"]
    fake_grpc.script = [x for p in pieces for x in (("sleep", 0.02), grpc_response(p))] + [
        grpc_response("", num_output_tokens=4, finish_reason="end", final=True)]
    with Client(fake_grpc.url) as client:
        stream = client.stream("x", 10)
        assert list(stream) == pieces
    assert stream.completion.text == "".join(pieces) and stream.completion.finish_reason == "end"
    assert len(stream.token_times) == 4 and all(gap > 0.01 for gap in stream.itl)


def test_grpc_server_error_is_typed(fake_grpc):
    fake_grpc.script = [grpc_response(error="input 'top_p': must be in (0, 1], got 2.0")]
    with Client(fake_grpc.url) as client, pytest.raises(InvalidInputError) as err:
        client.generate("x", 4)
    assert err.value.message == "input 'top_p': must be in (0, 1], got 2.0"


def test_grpc_close_cancels_the_request(fake_grpc):
    fake_grpc.script = [grpc_response("a"), "hang"]
    with Client(fake_grpc.url) as client:
        stream = client.stream("x", 100)
        assert next(stream) == "a"
        stream.close()
        assert fake_grpc.client_gone.wait(5)
        fake_grpc.script = [grpc_response("again", final=True)]
        assert client.generate("x", 4).text == "again"  # the client is still usable


def test_grpc_timeout_cancels_and_raises(fake_grpc):
    fake_grpc.script = ["hang"]
    with Client(fake_grpc.url, timeout=0.3) as client, pytest.raises(RequestTimeoutError):
        client.generate("x", 4)
    assert fake_grpc.client_gone.wait(5)


def test_grpc_unreachable_is_unavailable():
    client = Client(f"127.0.0.1:{free_port_nothing_listens()}", timeout=5)
    with pytest.raises(UnavailableError):
        client.generate("x", 4)
    with pytest.raises(UnavailableError):
        client.health()


def test_grpc_health_models_and_wait_ready(fake_grpc):
    fake_grpc.models[("broken", "1")] = False
    with Client(fake_grpc.url) as client:
        assert client.health() == {"live": True, "ready": False, "model": "ensemble", "model_ready": True}
        assert [(m.name, m.version, m.state) for m in client.models()] == [
            ("ensemble", "1", "READY"), ("broken", "1", "UNAVAILABLE")]
        client.wait_ready(timeout=2)
    with pytest.raises(ModelNotReadyError, match="failed to load"):
        Client(fake_grpc.url, model="broken", version="1").wait_ready(timeout=0.3)
    with pytest.raises(ModelNotFoundError):
        Client(fake_grpc.url, model="nope").wait_ready(timeout=0.3)


def test_async_grpc_generate_and_stream(fake_grpc):
    async def main():
        async with AsyncClient(fake_grpc.url, version="2") as client:
            fake_grpc.script = [grpc_response("Hel"), grpc_response("lo", num_output_tokens=2, final=True)]
            done = await client.generate("x", 2)
            fake_grpc.script = [grpc_response("A"), grpc_response("B"), grpc_response(final=True)]
            stream = client.stream("x", 8)
            deltas = [d async for d in stream]
            return done, deltas, stream.completion, await client.health()

    done, deltas, completion, health = asyncio.run(main())
    assert done.text == "Hello" and done.finish_reason == "length"
    assert deltas == ["A", "B"] and completion.text == "AB"
    assert health["model_ready"] is False  # the fake has no version 2
    sent = fake_grpc.requests[0]
    assert sent.model_version == "2" and sent.parameters["triton_enable_empty_final_response"].bool_param


def test_async_grpc_task_cancellation_cancels_the_request(fake_grpc):
    fake_grpc.script = [grpc_response("a"), "hang"]

    async def main():
        async with AsyncClient(fake_grpc.url) as client:
            started = asyncio.Event()

            async def consume():
                async for _ in client.stream("x", 100):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert fake_grpc.client_gone.wait(5)


def test_async_grpc_errors(fake_grpc):
    fake_grpc.script = [grpc_response(error="Request for unknown model: 'ensemble' version 9 is not found")]

    async def main():
        async with AsyncClient(fake_grpc.url, version="9") as client:
            await client.generate("x", 4)

    with pytest.raises(ModelNotFoundError):
        asyncio.run(main())


# --- HTTP transport against a fake Triton --------------------------------------

def test_http_generate_posts_json_and_reads_one_object(fake_http):
    fake_http.script = (200, "application/json", [json.dumps(
        {"text_output": "Bonjour 🙂", "num_input_tokens": 2, "num_output_tokens": 3, "finish_reason": "stop",
         "model_name": "ensemble", "model_version": "1", "cum_log_probs": -1.5, "output_log_probs": [-0.5, -1.0]},
        ensure_ascii=False).encode()])
    with Client(fake_http.url, protocol="http", model="tensorrt_llm_bls", version="1") as client:
        done = client.generate("Grüße", 3, stop_words=["\n"], return_log_probs=True)
    assert (done.text, done.finish_reason, done.model_version) == ("Bonjour 🙂", "stop", "1")
    assert done.output_log_probs == [-0.5, -1.0]
    path, body = fake_http.requests[0]
    assert path == "/v2/models/tensorrt_llm_bls/versions/1/generate"
    assert body == {"text_input": "Grüße", "max_tokens": 3, "stream": False, "stop_words": ["\n"],
                    "return_log_probs": True, "return_num_input_tokens": True, "return_num_output_tokens": True}


def test_http_stream_reads_server_sent_events(fake_http):
    events = [{"text_output": p, "model_version": "1"} for p in ["Grü", "ße", " 世界"]]
    events[-1].update(finish_reason="end", num_output_tokens=3)
    fake_http.script = (200, "text/event-stream", sse(*events))
    with Client(fake_http.url, protocol="http") as client:
        stream = client.stream("x", 10)
        assert list(stream) == ["Grü", "ße", " 世界"]
    assert stream.completion.finish_reason == "end"
    assert fake_http.requests[0][0] == "/v2/models/ensemble/generate_stream"
    assert fake_http.requests[0][1]["stream"] is True


def test_http_several_sequences_use_generate_stream(fake_http):
    fake_http.script = (200, "text/event-stream", sse({"text_output": "b", "sequence_index": 1},
                                                       {"text_output": "a", "sequence_index": 0}))
    with Client(fake_http.url, protocol="http") as client:
        done = client.generate("x", 4, num_return_sequences=2)
    assert [s.text for s in done.sequences] == ["a", "b"]
    assert fake_http.requests[0][0] == "/v2/models/ensemble/generate_stream"
    assert fake_http.requests[0][1]["stream"] is False


@pytest.mark.parametrize(
    "status,body,kind",
    [
        (400, b'{"error":"input \'max_tokens\': must be > 0, got 0"}', InvalidInputError),
        (404, b'{"error":"Request for unknown model: \'ensemble\' version 9 is not found"}', ModelNotFoundError),
        (400, b'data: {"error":"input \'top_p\': must be in (0, 1]"}\n\n', InvalidInputError),
        (200, b'{"error":"generate expects model to produce exactly 1 response"}', TrillmError),
    ],
)
def test_http_errors_are_typed_and_carry_the_message(fake_http, status, body, kind):
    fake_http.script = (status, "application/json", [body])
    with Client(fake_http.url, protocol="http", validate=False) as client, pytest.raises(kind) as err:
        client.generate("x", 0)
    assert err.value.message in body.decode()


def test_http_error_event_mid_stream(fake_http):
    fake_http.script = (200, "text/event-stream", sse({"text_output": "a"}, {"error": "internal error: boom"}))
    with Client(fake_http.url, protocol="http") as client:
        stream = client.stream("x", 4)
        assert next(stream) == "a"
        with pytest.raises(TrillmError, match="internal error: boom"):
            next(stream)


def test_http_close_drops_the_connection(fake_http):
    fake_http.script = (200, "text/event-stream", sse({"text_output": "a"}) + ["hang"])
    with Client(fake_http.url, protocol="http") as client:
        with client.stream("x", 100) as stream:
            for _ in stream:
                break
    assert fake_http.client_gone.wait(5)


def test_http_timeout_and_unreachable(fake_http):
    fake_http.script = (200, "text/event-stream", [("sleep", 1.0)] + sse({"text_output": "late"}))
    with Client(fake_http.url, protocol="http", timeout=0.2) as client, pytest.raises(RequestTimeoutError):
        list(client.stream("x", 4))
    with pytest.raises(UnavailableError):
        Client(f"127.0.0.1:{free_port_nothing_listens()}", protocol="http").generate("x", 4)


def test_http_health_and_models(fake_http):
    with Client(fake_http.url, protocol="http") as client:
        assert client.health() == {"live": True, "ready": True, "model": "ensemble", "model_ready": True}
        assert [(m.name, m.version, m.state) for m in client.models()] == [("ensemble", "1", "READY"),
                                                                           ("broken", "", "")]
        fake_http.ready = False
        assert client.health()["ready"] is False


def test_async_http_generate_stream_and_cancel(fake_http):
    async def main():
        async with AsyncClient(fake_http.url, protocol="http") as client:
            fake_http.script = (200, "application/json", [b'{"text_output": "one", "num_output_tokens": 1}'])
            done = await client.generate("x", 1)
            fake_http.script = (200, "text/event-stream", sse({"text_output": "A"}, {"text_output": "B"}))
            deltas = [d async for d in client.stream("x", 4)]
            fake_http.script = (200, "text/event-stream", sse({"text_output": "a"}) + ["hang"])
            async with client.stream("x", 100) as stream:
                async for _ in stream:
                    break
            return done, deltas

    done, deltas = asyncio.run(main())
    assert done.text == "one" and done.finish_reason == "length" and deltas == ["A", "B"]
    assert fake_http.client_gone.wait(5)


# --- generate_many ---------------------------------------------------------------

def test_run_all_keeps_input_order_and_collects_or_raises_errors():
    def task(i):
        def run():
            time.sleep(0.05 * (3 - i))
            if i == 1:
                raise InvalidInputError("bad one")
            return i
        return run

    results = _run_all([task(i) for i in range(3)], concurrency=3, progress=False, return_exceptions=True)
    assert results[0] == 0 and results[2] == 2 and isinstance(results[1], InvalidInputError)
    with pytest.raises(InvalidInputError, match="bad one"):
        _run_all([task(i) for i in range(3)], concurrency=3, progress=False, return_exceptions=False)


def test_generate_many_over_http(fake_http):
    fake_http.script = (200, "application/json", [b'{"text_output": "ok"}'])
    with Client(fake_http.url, protocol="http") as client:
        results = client.generate_many(["a", "b", "c", "d"], 2, concurrency=2, temperature=0.0)
        assert [r.text for r in results] == ["ok"] * 4
        with pytest.raises(InvalidInputError, match="top_p"):
            client.generate_many(["a"], 2, top_p=5.0)
    assert sorted(body["text_input"] for _, body in fake_http.requests) == ["a", "b", "c", "d"]


def test_generate_many_is_concurrent(fake_http):
    fake_http.script = (200, "application/json", [("sleep", 0.3), b'{"text_output": "ok"}'])
    started = time.perf_counter()
    with Client(fake_http.url, protocol="http") as client:
        client.generate_many(["a"] * 4, 2, concurrency=4)
    assert time.perf_counter() - started < 1.0


# --- chat and CLI ----------------------------------------------------------------

def test_conversation_messages():
    chat = Conversation(system="Be brief.")
    chat.add("user", "Hi")
    chat.add("assistant", "Hello.")
    chat.add("user", "2+2?")
    assert chat.messages() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
    ]
    with pytest.raises(ValueError):
        chat.add("robot", "x")
    chat.reset()
    assert chat.messages() == [{"role": "system", "content": "Be brief."}]


def test_cli_parses_generate_flags():
    args = cli.build_parser().parse_args(
        ["generate", "Hello", "--max-tokens", "12", "--stream", "--temperature", "0.5", "--top-k", "3",
         "--top-p", "0.8", "--seed", "7", "--stop", "a", "--stop", "b", "--url", "h:1", "--protocol", "http",
         "--model", "tensorrt_llm_bls", "--version", "2", "--json"]
    )
    assert (args.prompt, args.max_tokens, args.stream, args.json) == ("Hello", 12, True, True)
    assert (args.url, args.protocol, args.model, args.version) == ("h:1", "http", "tensorrt_llm_bls", "2")
    assert cli.sampling_kwargs(args) == {"temperature": 0.5, "top_k": 3, "top_p": 0.8, "seed": 7,
                                         "stop_words": ["a", "b"]}
    assert cli.sampling_kwargs(cli.build_parser().parse_args(["generate", "x"])) == {}


@pytest.mark.parametrize("argv", [[], ["generate"], ["bogus"], ["generate", "x", "--protocol", "ftp"],
                                  ["generate", "x", "--max-tokens", "many"]])
def test_cli_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "error,code",
    [(InvalidInputError("x"), 2), (UnavailableError("x"), 3), (ModelNotReadyError("x"), 3),
     (ModelNotFoundError("x"), 4), (RequestTimeoutError("x"), 1), (TrillmError("x"), 1)],
)
def test_cli_exit_codes(error, code):
    assert cli.exit_code(error) == code


def test_cli_invalid_input_exits_2_before_sending(capsys):
    assert cli.main(["generate", "x", "--max-tokens", "0", "--url", "127.0.0.1:1"]) == 2
    assert "max_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_unreachable_exits_3(protocol, capsys):
    url = f"127.0.0.1:{free_port_nothing_listens()}"
    assert cli.main(["health", "--url", url, "--protocol", protocol, "--timeout", "5"]) == 3
    assert cli.main(["generate", "x", "--url", url, "--protocol", protocol, "--timeout", "5"]) == 3
    assert "error" in capsys.readouterr().err


def test_cli_generate_text_stream_and_json(fake_http, capsys):
    fake_http.script = (200, "application/json", [b'{"text_output": "Paris.", "num_output_tokens": 2}'])
    assert cli.main(["generate", "Capital?", "--protocol", "http", "--url", fake_http.url]) == 0
    assert capsys.readouterr().out == "Paris.\n"
    assert cli.main(["generate", "Capital?", "--protocol", "http", "--url", fake_http.url, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["text"] == "Paris." and printed["finish_reason"] == "end"
    fake_http.script = (200, "text/event-stream", sse({"text_output": "Pa"}, {"text_output": "ris"}))
    assert cli.main(["generate", "Capital?", "--protocol", "http", "--url", fake_http.url, "--stream",
                     "--stop", "."]) == 0
    assert capsys.readouterr().out == "Paris\n"
    assert fake_http.requests[-1][1]["stop_words"] == ["."]


def test_cli_models_and_health(fake_grpc, capsys):
    assert cli.main(["models", "--url", fake_grpc.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert lines[1].split() == ["ensemble", "1", "READY"]
    assert cli.main(["health", "--url", fake_grpc.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_ready"] is True
    assert cli.main(["health", "--url", fake_grpc.url, "--model", "nope"]) == 3


def test_cli_chat_keeps_the_conversation(fake_http, monkeypatch, capsys):
    lines = iter(["Hi", "/reset", "Again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    fake_http.script = (200, "text/event-stream", sse({"text_output": " Hello!"}))
    assert cli.main(["chat", "--protocol", "http", "--url", fake_http.url, "--system", "S"]) == 0
    chats = [json.loads(body["messages"]) for _, body in fake_http.requests]
    assert chats == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Again"}],
    ]
    assert not any("text_input" in body or "stop_words" in body for _, body in fake_http.requests)
    assert "assistant>  Hello!" in capsys.readouterr().out


def test_cli_chat_second_turn_includes_the_first(fake_http, monkeypatch):
    lines = iter(["Hi", "More"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    fake_http.script = (200, "text/event-stream", sse({"text_output": "Yes."}))
    assert cli.main(["chat", "--protocol", "http", "--url", fake_http.url]) == 0
    second = json.loads(fake_http.requests[1][1]["messages"])
    assert second == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."},
                      {"role": "user", "content": "More"}]


def test_client_is_thread_safe_over_grpc(fake_grpc):
    fake_grpc.script = [("sleep", 0.05), grpc_response("x", final=True)]
    with Client(fake_grpc.url) as client:
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(client.generate("p", 1).text)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert results == ["x"] * 6 and len(fake_grpc.requests) == 6


def test_cli_ab_pins_each_request_and_reports_per_version(fake_grpc, capsys):
    fake_grpc.script = [grpc_response("Paris.", num_output_tokens=2, finish_reason="end"), grpc_response(final=True)]
    code = cli.main(["ab", "Capital?", "--split", "1=1,2=3", "--requests", "12", "--concurrency", "3",
                     "--split-seed", "5", "--url", fake_grpc.url, "--json"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)
    pinned = Counter(r.model_version for r in fake_grpc.requests)
    assert {r.model_name for r in fake_grpc.requests} == {"tensorrt_llm_bls"}
    assert {v: s["requests"] for v, s in stats.items()} == dict(pinned) and sum(pinned.values()) == 12
    assert all(s["errors"] == {} and s["p50_s"] > 0 for s in stats.values())
