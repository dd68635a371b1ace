"""The OpenAI-compatible API (trillm.openai) in front of the session's real tritonserver,
driven by the official ``openai`` client; the reference is trillm_client on gRPC.

The demo model writes gibberish: the tests check structure and exactness, not content.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import openai
import pytest
from trillm_client import Client

from trillm.launcher import free_port
from trillm.openai.process import OpenAIOptions, OpenAIProcess

pytestmark = pytest.mark.server

MULTIBYTE = "Grüße, 世界 🙂 naïve café"
KEY = "test-key-0123456789"
# min_tokens suppresses end_id, so a long request is sure to still run when it is cut.
LONG = {"max_tokens": 400, "extra_body": {"min_tokens": 400}}


def start(tmp: Path, triton_url: str, **options) -> OpenAIProcess:
    log = tmp / f"openai-{time.time_ns()}.log"
    return OpenAIProcess(OpenAIOptions(triton_url, port=free_port(), log_file=log, **options)).start()


@pytest.fixture(scope="module")
def api(triton_server, tmp_path_factory):
    process = start(tmp_path_factory.mktemp("openai"), triton_server.grpc_url)
    try:
        process.wait_ready(120)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(api):
    # max_retries=0: a 503 must reach the test, not be retried away.
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def grpc(triton_server):
    with Client(triton_server.grpc_url, protocol="grpc", timeout=120) as c:
        yield c


def metric(server, name: str, **labels: str) -> float:
    """Sum of a trillm_* series on the metrics port, over series matching ``labels``."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    total = 0.0
    for line in lines:
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def idle(server) -> bool:
    return metric(server, "trillm_requests_active") == 0 and metric(server, "trillm_requests_queued") == 0


# --- models and health ------------------------------------------------------------

def test_models_list_the_served_model_and_each_loaded_version(client, served_version):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["ensemble", f"ensemble:{served_version}"]
    assert client.models.retrieve(f"ensemble:{served_version}").id == f"ensemble:{served_version}"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ensemble:99")


def test_health_is_ok_when_the_pipeline_is_ready(api):
    with urllib.request.urlopen(f"{api.url}/health", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read())["model"] == "ensemble"


# --- completions ------------------------------------------------------------------

def test_completion_matches_the_pipeline_with_exact_usage(client, grpc, served_version):
    expected = grpc.generate(MULTIBYTE, 12, temperature=0.0)
    done = client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.model == "ensemble"
    assert [c.index for c in done.choices] == [0]
    assert done.choices[0].text == expected.text and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == expected.num_input_tokens
    assert done.usage.completion_tokens == expected.num_output_tokens == 12
    assert done.usage.total_tokens == expected.num_input_tokens + 12
    assert done.system_fingerprint == f"ensemble:{served_version}"
    pinned = client.completions.create(model=f"ensemble:{served_version}", prompt=MULTIBYTE, max_tokens=12,
                                       temperature=0)
    assert pinned.choices[0].text == expected.text


def test_streamed_completion_concatenates_to_the_whole_text(client):
    whole = client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1
    assert "".join(texts).encode() == whole.choices[0].text.encode()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_a_batch_of_prompts_times_n_gives_every_choice_seeded_per_choice(client, grpc):
    prompts, n, seed = ["One", "Two two"], 2, 41
    done = client.completions.create(model="ensemble", prompt=prompts, n=n, max_tokens=8, temperature=1.0, seed=seed)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    expected = [grpc.generate(p, 8, temperature=1.0, seed=seed + i) for p in prompts for i in range(n)]
    assert [c.text for c in done.choices] == [e.text for e in expected]
    assert done.choices[0].text != done.choices[1].text  # seed + i: the samples differ
    assert done.usage.prompt_tokens == expected[0].num_input_tokens + expected[2].num_input_tokens
    assert done.usage.completion_tokens == sum(e.num_output_tokens for e in expected)


def test_stop_ends_the_text_before_it(client):
    full = client.completions.create(model="ensemble", prompt="The quick brown fox", max_tokens=40,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for given in (stop, [stop, "never-generated-\u2603"]):
        done = client.completions.create(model="ensemble", prompt="The quick brown fox", max_tokens=40,
                                         temperature=0, stop=given)
        assert done.choices[0].text == full[: full.index(stop)]
        assert done.choices[0].finish_reason == "stop"
        assert done.usage.completion_tokens < 40


def test_echo_returns_the_prompt_first(client):
    plain = client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=6, temperature=0)
    echoed = client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == MULTIBYTE + plain.choices[0].text
    assert echoed.usage == plain.usage
    streamed = client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=6, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_completion_logprobs_are_the_engines(client, grpc):
    expected = grpc.generate(MULTIBYTE, 10, temperature=0.0, return_log_probs=True)
    done = client.completions.create(model="ensemble", prompt=MULTIBYTE, max_tokens=10, temperature=0, logprobs=0)
    logprobs = done.choices[0].logprobs
    assert "".join(logprobs.tokens) == done.choices[0].text == expected.text
    assert logprobs.token_logprobs == pytest.approx(expected.output_log_probs, abs=1e-5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_vllm_extensions(client, grpc):
    greedy = grpc.generate("Hello there", 8, temperature=0.0).text
    top_k_1 = client.completions.create(model="ensemble", prompt="Hello there", max_tokens=8, temperature=1.0,
                                        extra_body={"top_k": 1})
    assert top_k_1.choices[0].text == greedy
    penalised = grpc.generate("Hello there", 8, temperature=0.0, repetition_penalty=1.5).text
    done = client.completions.create(model="ensemble", prompt="Hello there", max_tokens=8, temperature=0,
                                     extra_body={"repetition_penalty": 1.5, "ignore_eos": True})
    assert done.choices[0].text == penalised and done.usage.completion_tokens == 8


def test_same_seed_same_text(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="ensemble", prompt="Roll the dice", max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text
    assert sample(1234) == sample(1234)


# --- chat ---------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": MULTIBYTE}]


def test_chat_completion_streams_exactly_with_usage(client):
    whole = client.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=24, temperature=0)
    message = whole.choices[0].message
    assert whole.object == "chat.completion" and message.role == "assistant" and message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).encode() == message.content.encode()
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_usage_counts_the_rendered_template(client, triton_server):
    done = client.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=4, temperature=0)
    body = json.dumps({"messages": json.dumps(CHAT), "max_tokens": 4, "return_num_input_tokens": True}).encode()
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/ensemble/generate", data=body)
    with urllib.request.urlopen(request, timeout=120) as response:
        pipeline = json.loads(response.read())
    assert done.usage.prompt_tokens == pipeline["num_input_tokens"]
    assert done.choices[0].message.content == pipeline["text_output"]


def test_chat_logprobs_and_n(client):
    done = client.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=8, temperature=1.0, seed=5,
                                          n=3, logprobs=True, top_logprobs=0)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert len({c.message.content for c in done.choices}) > 1
    for choice in done.choices:
        content = choice.logprobs.content
        assert len(content) == 8 and all(t.logprob <= 0 and t.top_logprobs == [] for t in content)
        assert "".join(t.token for t in content) == choice.message.content
    assert done.usage.completion_tokens == 24


def test_async_client_streams_and_matches_the_sync_one(api, client):
    expected = [client.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=10, temperature=1.0,
                                               seed=s).choices[0].message.content for s in range(3)]

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0) as ac:
            async def one(seed: int) -> str:
                stream = await ac.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=10,
                                                          temperature=1.0, seed=seed, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            whole = await ac.chat.completions.create(model="ensemble", messages=CHAT, max_tokens=10,
                                                     temperature=1.0, seed=0)
            return [whole.choices[0].message.content] + list(await asyncio.gather(*(one(s) for s in range(3))))

    got = asyncio.run(main())
    assert got == [expected[0]] + expected


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("call,param", [
    (lambda c: c.completions.create(model="ensemble", prompt="hi", max_tokens=4, temperature=5), "temperature"),
    (lambda c: c.completions.create(model="ensemble", prompt="hi", max_tokens=0), "max_tokens"),
    (lambda c: c.completions.create(model="ensemble", prompt="hi", max_tokens=4, logprobs=2), "logprobs"),
    (lambda c: c.completions.create(model="ensemble", prompt="hi", max_tokens=4, extra_body={"nope": 1}), "nope"),
    # the pipeline's own rule (the context window), mapped back to the OpenAI field
    (lambda c: c.completions.create(model="ensemble", prompt="hi", max_tokens=100000), "max_tokens"),
    (lambda c: c.chat.completions.create(model="ensemble", messages=CHAT, max_completion_tokens=100000),
     "max_completion_tokens"),
    (lambda c: c.chat.completions.create(model="ensemble", messages=[{"role": "robot", "content": "x"}]),
     "messages[0].role"),
    (lambda c: c.chat.completions.create(model="ensemble", messages=CHAT, logprobs=True, top_logprobs=3),
     "top_logprobs"),
    (lambda c: c.chat.completions.create(model="ensemble", messages=CHAT, stop=[""]), "stop"),
])
def test_bad_input_is_a_400_naming_the_field(client, call, param):
    with pytest.raises(openai.BadRequestError) as err:
        call(client)
    assert err.value.param == param and err.value.type == "invalid_request_error"
    assert param.split("[")[0] in err.value.message
    assert client.completions.create(model="ensemble", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_a_bad_streamed_request_is_still_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="ensemble", prompt="hi", max_tokens=100000, stream=True)
    assert err.value.param == "max_tokens"


@pytest.mark.parametrize("model", ["gpt-4o", "ensemble:99", "tensorrt_llm_bls"])
def test_unknown_model_is_a_404(client, model):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=4)
    assert err.value.param == "model" and err.value.code == "model_not_found" and model in err.value.message


def test_api_key(triton_server, tmp_path):
    process = start(tmp_path, triton_server.grpc_url, env={"TRILLM_API_KEY": KEY})
    try:
        process.wait_ready(120)
        url = f"{process.url}/v1"
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as err:
                wrong.completions.create(model="ensemble", prompt="hi", max_tokens=2)
            assert err.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0) as right:
            assert right.completions.create(model="ensemble", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        process.stop()


def test_the_bls_model_behind_the_api(triton_server, tmp_path, client, served_version):
    process = start(tmp_path, triton_server.grpc_url, model="tensorrt_llm_bls")
    try:
        process.wait_ready(120)
        with openai.OpenAI(base_url=f"{process.url}/v1", api_key="x", max_retries=0, timeout=120) as bls:
            assert [m.id for m in bls.models.list().data] == ["tensorrt_llm_bls", f"tensorrt_llm_bls:{served_version}"]
            done = bls.chat.completions.create(model="tensorrt_llm_bls", messages=CHAT, max_tokens=8, temperature=0)
        # the same pipeline version, driven from Python instead of by the ensemble
        assert done.choices[0].message.content == client.chat.completions.create(
            model="ensemble", messages=CHAT, max_tokens=8, temperature=0).choices[0].message.content
    finally:
        process.stop()


def test_triton_down_is_a_503(tmp_path):
    process = start(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        assert wait_for(lambda: _status(f"{process.url}/health") == 503)
        with openai.OpenAI(base_url=f"{process.url}/v1", api_key="x", max_retries=0) as c:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as err:
                    c.completions.create(model="ensemble", prompt="hi", max_tokens=2, stream=stream)
                assert err.value.status_code == 503 and "unavailable" in err.value.message
    finally:
        process.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# --- cancellation and shutdown ------------------------------------------------------------

def test_a_client_leaving_mid_stream_cancels_its_request(client, triton_server):
    assert wait_for(lambda: idle(triton_server), timeout=60)
    cancelled = metric(triton_server, "trillm_requests_finished_total", reason="cancelled")
    stream = client.completions.create(model="ensemble", prompt="Tell me a story", stream=True, **LONG)
    for _, _ in zip(range(3), stream):
        pass
    assert wait_for(lambda: metric(triton_server, "trillm_requests_active") >= 1, timeout=10)
    stream.close()
    assert wait_for(lambda: idle(triton_server)), "the request still runs after its client left"
    assert wait_for(lambda: metric(triton_server, "trillm_requests_finished_total", reason="cancelled") > cancelled)
    assert metric(triton_server, "trillm_kv_blocks_used") <= metric(triton_server, "trillm_kv_blocks_total")


def test_a_client_timing_out_cancels_its_unstreamed_request(api, triton_server):
    assert wait_for(lambda: idle(triton_server), timeout=60)
    cancelled = metric(triton_server, "trillm_requests_finished_total", reason="cancelled")
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=0, timeout=1.0) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model="ensemble", prompt="Tell me a story", **LONG)
    # Finishing on its own, it would end as "length" after its 400 tokens.
    assert wait_for(lambda: metric(triton_server, "trillm_requests_finished_total", reason="cancelled") > cancelled)
    assert wait_for(lambda: idle(triton_server)), "the request still runs after its client left"


def test_sigterm_drains_then_exits(triton_server, tmp_path):
    process = start(tmp_path, triton_server.grpc_url, drain_timeout=300)
    process.wait_ready(120)
    try:
        with openai.OpenAI(base_url=f"{process.url}/v1", api_key="x", max_retries=0, timeout=300) as c:
            stream = iter(c.completions.create(model="ensemble", prompt="Tell me a story", stream=True,
                                               stream_options={"include_usage": True}, **LONG))
            next(stream)
            os.kill(process.process.pid, signal.SIGTERM)
            # A request of 400 tokens is still running while the gate closes.
            assert wait_for(lambda: _status(f"{process.url}/health") == 503, timeout=10)
            with pytest.raises(openai.InternalServerError) as err:
                c.completions.create(model="ensemble", prompt="hi", max_tokens=2)
            assert err.value.status_code == 503 and "shutting down" in err.value.message
            rest = list(stream)  # the request in flight runs to its end
        assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 400
        assert process.process.wait(timeout=30) == 0
    finally:
        process.stop()


def test_raw_http_errors_are_openai_shaped(api):
    response = httpx2.post(f"{api.url}/v1/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "JSON" in error["message"]
    missing = httpx2.get(f"{api.url}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
