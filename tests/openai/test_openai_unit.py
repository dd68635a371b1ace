"""trillm.openai without a server: request checks, response shapes, error mapping, the merge of choices."""

from __future__ import annotations

import asyncio

import pytest
from trillm_client import Completion
from trillm_client.errors import InvalidInputError, ModelNotFoundError, TrillmError, UnavailableError

from trillm.openai.pipeline import Finished, Piece, api_error, merge
from trillm.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse, resolve_model
from trillm.openai.render import ChatRenderer, CompletionRenderer, finish_reason

pytestmark = pytest.mark.unit

CHAT = {"model": "ensemble", "messages": [{"role": "user", "content": "hi"}]}


def chat(**fields):
    return parse(ChatCompletionRequest, {**CHAT, **fields}, default_max_tokens=100)


def refused(model, body, **settings) -> APIError:
    with pytest.raises(APIError) as err:
        parse(model, body, **settings)
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),  # strict: a string is not a number
    ({"max_tokens": 1.0}, "max_tokens"),  # nor a float an integer
    ({"top_p": 0}, "top_p"),
    ({"n": 17}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": 7}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"bogus": 1}, "bogus"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"top_logprobs": 1}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),  # the engine has no alternatives
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"max_tokens": 5, "min_tokens": 6}, "min_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_bad_chat_fields_are_named(fields, param):
    error = refused(ChatCompletionRequest, {**CHAT, **fields})
    body = error.body()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert body["message"].startswith(param + ":")


@pytest.mark.parametrize("fields,param", [
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a"] * 9, "n": 16}, "prompt"),
    ({"suffix": "tail"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": 0, "echo": True}, "logprobs"),
])
def test_bad_completion_fields_are_named(fields, param):
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", **fields}).param == param


def test_missing_model_and_non_object_body():
    assert refused(ChatCompletionRequest, {"messages": CHAT["messages"]}).code == "missing_required_parameter"
    assert refused(ChatCompletionRequest, [CHAT]).param is None


def test_chat_maps_onto_the_pipeline_inputs():
    req = chat(temperature=0, top_k=-1, stop="END", seed=7, n=2, max_completion_tokens=9, ignore_eos=True,
               messages=[{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.limit() == 9 and req.limit_field() == "max_completion_tokens"
    assert req.sampling() == {"temperature": 0, "stop_words": ["END"], "min_tokens": 9}  # top_k -1 is off
    assert [req.seed_of(i) for i in range(2)] == [7, 8]
    assert req.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert chat().limit() == 100 and chat().sampling() == {"temperature": 1.0}  # OpenAI's default temperature
    assert chat().seed_of(3) is None
    assert chat(seed=2**64 - 1).seed_of(1) == 0  # uint64 wraps rather than overflows


def test_completions_default_to_16_tokens():
    req = parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"], "echo": True})
    assert req.limit() == 16 and req.prompts() == ["a", "b"]


def test_model_names():
    assert resolve_model("ensemble", "ensemble").version == ""
    assert resolve_model("ensemble:2", "ensemble").id == "ensemble:2"
    for name in ("ensemble:0", "ensemble:x", "ensemble:", "gpt-4", "tensorrt_llm_bls"):
        with pytest.raises(APIError) as err:
            resolve_model(name, "ensemble")
        assert err.value.status == 404 and err.value.param == "model"


@pytest.mark.parametrize("exc,status,param", [
    (InvalidInputError("in ensemble 'ensemble', input 'max_tokens': prompt + max_tokens exceeds"), 400, "max_completion_tokens"),
    (InvalidInputError("input 'text_input': must not be empty"), 400, "messages"),
    (InvalidInputError("input 'stop_words': bad"), 400, "stop"),
    (ModelNotFoundError("Request for unknown model"), 404, "model"),
    (UnavailableError("connection refused"), 503, None),
    (TrillmError("internal error: boom"), 503, None),
])
def test_pipeline_errors_map_to_http(exc, status, param):
    error = api_error(exc, "messages", "max_completion_tokens")
    assert (error.status, error.param) == (status, param)
    assert error.body()["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def completion(text: str, reason: str, n_in: int = 3, n_out: int = 2) -> Completion:
    return Completion(text=text, num_input_tokens=n_in, num_output_tokens=n_out, finish_reason=reason,
                      cum_log_probs=None, output_log_probs=None, model_version="2", latency=0.1)


def test_finish_reasons():
    assert [finish_reason(completion("", r)) for r in ("length", "stop", "end")] == ["length", "stop", "stop"]


def test_shapes():
    chat_body = ChatRenderer("m").whole([ChatRenderer("m").choice(0, completion("hé", "end"), ["h", "é"], [-1.0, -2.0])],
                                        3, 2)
    assert chat_body["object"] == "chat.completion" and chat_body["id"].startswith("chatcmpl-")
    assert chat_body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    content = chat_body["choices"][0]["logprobs"]["content"]
    assert [c["bytes"] for c in content] == [[104], [195, 169]]
    logprobs = CompletionRenderer("m").delta(0, "ab", ["a", "b"], [-1.0, -2.0], offset=5)["logprobs"]
    assert logprobs["text_offset"] == [5, 6] and logprobs["top_logprobs"] is None
    chunk = CompletionRenderer("m").chunk([], with_usage=True)
    assert chunk.startswith(b"data: {") and chunk.endswith(b"\n\n") and b'"usage":null' in chunk


def test_merge_interleaves_and_a_failure_cancels_the_rest():
    cancelled = []

    async def run(index: int, fail: bool):
        try:
            yield Piece(index, "x")
            await asyncio.sleep(0.01)
            if fail:
                raise UnavailableError("gone")
            await asyncio.sleep(10)
            yield Finished(index, completion("x", "length"))
        except asyncio.CancelledError:
            cancelled.append(index)
            raise

    async def main():
        seen = []
        with pytest.raises(UnavailableError):
            async for event in merge([run(0, False), run(1, True)]):
                seen.append(event.index)
        return seen

    assert sorted(asyncio.run(main())) == [0, 1] and cancelled == [0]
