"""trillm_client against the real tritonserver of tests/conftest.py (demo model,
models ensemble, tensorrt_llm_bls, preprocessing, tensorrt_llm, postprocessing,
serving the default policy's version: ``served_version``)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from trillm_client import AsyncClient, Client, InvalidInputError, ModelNotFoundError, UnavailableError

pytestmark = pytest.mark.server

PROTOCOLS = ["grpc", "http"]
MULTIBYTE = "Grüße, 世界 🙂"
MODELS = {"ensemble", "tensorrt_llm_bls", "preprocessing", "tensorrt_llm", "postprocessing"}


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(params=PROTOCOLS)
def client(request, triton_server):
    with Client(url_of(triton_server, request.param), protocol=request.param, timeout=120) as c:
        yield c


def requests_active(server) -> float | None:
    """Sum of the ``trillm_requests_active`` gauge, or None when the server does not export it."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("trillm_requests_active")]
    return sum(values) if values else None


def wait_until_busy(server, timeout: float = 10.0) -> float | None:
    """Polls the gauge (published every 0.25 s) until a request shows as running."""
    deadline = time.monotonic() + timeout
    value = requests_active(server)
    while value == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        value = requests_active(server)
    return value


def wait_until_idle(server, timeout: float = 10.0) -> float | None:
    """Polls the gauge until it reads 0; returns its last value (None: no such metric)."""
    deadline = time.monotonic() + timeout
    value = requests_active(server)
    while value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = requests_active(server)
    return value


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("trillm-client")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trillm_client.cli"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- generation --------------------------------------------------------------

@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_http_and_grpc_give_the_same_greedy_text(triton_server, served_version, model):
    texts = {}
    for protocol in PROTOCOLS:
        with Client(url_of(triton_server, protocol), protocol=protocol, model=model, timeout=120) as c:
            done = c.generate("The quick brown fox", 16)
            assert done.num_input_tokens and done.num_input_tokens > 0
            assert done.num_output_tokens and 0 < done.num_output_tokens <= 16
            assert done.finish_reason in ("length", "stop", "end") and done.model_version == served_version
            texts[f"{protocol} generate"] = done.text
            texts[f"{protocol} stream"] = c.stream("The quick brown fox", 16).text()
    assert texts["grpc generate"], "the model generated no text"
    assert len(set(texts.values())) == 1, texts


def test_stream_deltas_concatenate_to_the_whole_text(client):
    whole = client.generate(MULTIBYTE, 32)
    stream = client.stream(MULTIBYTE, 32)
    deltas = list(stream)
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas).encode("utf-8") == whole.text.encode("utf-8")
    assert stream.completion is not None and stream.completion.text == whole.text
    assert stream.completion.num_output_tokens == whole.num_output_tokens
    assert stream.ttft is not None and 0 < stream.ttft <= stream.completion.latency
    assert len(stream.token_times) == len(deltas) and len(stream.itl) == len(deltas) - 1


def test_max_tokens_reached_is_length(client):
    done = client.generate("Once upon a time", 5, return_log_probs=True)
    assert done.finish_reason == "length" and done.num_output_tokens == 5
    assert done.output_log_probs is not None and len(done.output_log_probs) == done.num_output_tokens
    assert done.cum_log_probs == pytest.approx(sum(done.output_log_probs), rel=1e-4, abs=1e-4)


def test_stop_word_ends_the_text_before_it(client):
    full = client.generate("The quick brown fox", 40).text
    assert len(full) > 10
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    done = client.generate("The quick brown fox", 40, stop_words=[stop])
    assert done.text == full[: full.index(stop)] and done.finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    first = client.generate("Roll the dice", 12, temperature=1.0, top_p=0.9, seed=1234)
    second = client.generate("Roll the dice", 12, temperature=1.0, top_p=0.9, seed=1234)
    assert first.text == second.text


def test_generate_many_keeps_the_order(client):
    prompts = ["One", "Two two", "Three three three", "Four"]
    many = client.generate_many(prompts, 8, concurrency=3)
    assert [c.text for c in many] == [client.generate(p, 8).text for p in prompts]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client_matches_the_blocking_one(triton_server, protocol):
    url = url_of(triton_server, protocol)
    with Client(url, protocol=protocol) as c:
        expected = c.generate(MULTIBYTE, 16).text

    async def main():
        async with AsyncClient(url, protocol=protocol, timeout=120) as ac:
            await ac.wait_ready(timeout=30)
            done = await ac.generate(MULTIBYTE, 16)
            deltas = [d async for d in ac.stream(MULTIBYTE, 16)]
            return done.text, "".join(deltas)

    assert asyncio.run(main()) == (expected, expected)


CHAT = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": MULTIBYTE}]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_a_chat_whole_and_streamed_on_both_protocols(triton_server, model):
    texts = {}
    for protocol in PROTOCOLS:
        with Client(url_of(triton_server, protocol), protocol=protocol, model=model, timeout=120) as c:
            texts[f"{protocol} generate"] = c.generate(CHAT, 16).text
            texts[f"{protocol} stream"] = c.stream(CHAT, 16).text()
    assert texts["grpc generate"] and len(set(texts.values())) == 1, texts
    with Client(triton_server.grpc_url) as c:
        assert c.generate(CHAT[1:], 16).text != texts["grpc generate"], "the system message reaches the model"


def test_a_chat_the_template_refuses_is_invalid_input(client):
    with pytest.raises(InvalidInputError) as err:
        client.generate([{"role": "tool", "content": "42"}], 4)
    assert "input 'messages'" in err.value.message and "roles must be" in err.value.message


# --- versions and errors ---------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pinned_version(triton_server, served_version, protocol):
    url = url_of(triton_server, protocol)
    with Client(url, protocol=protocol, version=served_version) as c:
        done = c.generate("Hello", 4)
        assert done.model_version == served_version
        assert c.stream("Hello", 4).text() == done.text
    with Client(url, protocol=protocol, version="9") as c, pytest.raises(ModelNotFoundError) as err:
        c.generate("Hello", 4)
    assert "9" in err.value.message


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("max_tokens,sampling,name", [(0, {}, "max_tokens"), (4, {"top_p": 2.0}, "top_p")])
def test_server_side_invalid_input_is_typed(triton_server, protocol, max_tokens, sampling, name):
    with Client(url_of(triton_server, protocol), protocol=protocol, validate=False) as c:
        with pytest.raises(InvalidInputError) as err:
            c.generate("hi", max_tokens, **sampling)
        assert name in err.value.message
        with pytest.raises(InvalidInputError):
            list(c.stream("hi", max_tokens, **sampling))
        assert c.generate("hi", 4).text is not None  # the server carries on


def test_unknown_model(client):
    with Client(client.url, protocol=client.protocol, model="no_such_model") as c, pytest.raises(ModelNotFoundError):
        c.generate("hi", 4)


# --- cancellation ------------------------------------------------------------------

LONG = "Tell me a very long story about"
# min_tokens suppresses end_id, so the request is sure to be running when it is cancelled.
LONG_REQUEST = {"max_tokens": 400, "min_tokens": 400}


def test_closing_a_stream_cancels_it(client, triton_server):
    wait_until_idle(triton_server, timeout=60)  # not measuring an earlier test's requests
    stream = client.stream(LONG, **LONG_REQUEST)
    for _ in range(2):
        next(stream)
    assert wait_until_busy(triton_server) in (1, None)
    stream.close()
    assert stream.completion is None
    assert wait_until_idle(triton_server) in (0, None), "the cancelled request is still running"
    assert client.generate("And now something short", 4).num_output_tokens


def test_cancelling_an_async_stream_task_cancels_it(triton_server):
    wait_until_idle(triton_server, timeout=60)

    async def main():
        async with AsyncClient(triton_server.grpc_url, timeout=120) as ac:
            first = asyncio.Event()

            async def consume():
                async for _ in ac.stream(LONG, **LONG_REQUEST):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 120)
            assert wait_until_busy(triton_server) in (1, None)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert wait_until_idle(triton_server) in (0, None), "the cancelled request is still running"
            return await ac.generate("Short", 4)

    assert asyncio.run(main()).num_output_tokens


# --- server state ------------------------------------------------------------------

def test_health_models_wait_ready(client, served_version):
    client.wait_ready(timeout=30)
    assert client.health() == {"live": True, "ready": True, "model": "ensemble", "model_ready": True}
    served = {(m.name, m.version, m.state) for m in client.models()}
    assert {(name, served_version, "READY") for name in MODELS} <= served


# --- CLI -------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_generate(triton_server, served_version, protocol):
    url = url_of(triton_server, protocol)
    with Client(url, protocol=protocol) as c:
        expected = c.generate(MULTIBYTE, 8).text
    plain = cli("generate", MULTIBYTE, "--max-tokens", "8", "--url", url, "--protocol", protocol)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n"
    streamed = cli("generate", MULTIBYTE, "--max-tokens", "8", "--url", url, "--protocol", protocol, "--stream")
    assert streamed.returncode == 0 and streamed.stdout == expected + "\n"
    as_json = cli("generate", MULTIBYTE, "--max-tokens", "8", "--url", url, "--protocol", protocol, "--json")
    assert as_json.returncode == 0, as_json.stderr
    printed = json.loads(as_json.stdout)
    assert printed["text"] == expected and printed["model_version"] == served_version and printed["num_output_tokens"] <= 8


def test_cli_chat_holds_a_conversation(triton_server):
    script = "Bonjour\nEt ensuite ?\n"
    run = subprocess.run([*cli_command(), "chat", "--max-tokens", "8", "--url", triton_server.grpc_url, "--system", "S"],
                         input=script, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with Client(triton_server.grpc_url) as c:
        first = c.generate([{"role": "system", "content": "S"}, {"role": "user", "content": "Bonjour"}], 8).text
        second = c.generate([{"role": "system", "content": "S"}, {"role": "user", "content": "Bonjour"},
                             {"role": "assistant", "content": first.strip()},
                             {"role": "user", "content": "Et ensuite ?"}], 8).text
    # The second turn's answer is the one to the whole conversation so far.
    assert run.stdout == f"you> assistant> {first}\nyou> assistant> {second}\nyou> \n"


def test_cli_models_and_health(triton_server):
    models = cli("models", "--url", triton_server.grpc_url, "--json")
    assert models.returncode == 0, models.stderr
    assert MODELS <= {m["name"] for m in json.loads(models.stdout) if m["state"] == "READY"}
    health = cli("health", "--url", triton_server.http_url, "--protocol", "http")
    assert health.returncode == 0 and "ready: true" in health.stdout


def test_cli_errors_exit_codes(triton_server):
    assert cli("generate", "hi", "--max-tokens", "0", "--url", triton_server.grpc_url).returncode == 2
    assert cli("generate", "hi", "--url", triton_server.grpc_url, "--version", "9").returncode == 4
    unreachable = f"127.0.0.1:{free_port()}"
    for protocol in PROTOCOLS:
        result = cli("health", "--url", unreachable, "--protocol", protocol, "--timeout", "5")
        assert result.returncode == 3 and "error" in result.stderr
    result = cli("generate", "hi", "--url", unreachable, "--timeout", "5")
    assert result.returncode == 3


def test_unreachable_server_raises_unavailable():
    with Client(f"127.0.0.1:{free_port()}", protocol="http", timeout=5) as c, pytest.raises(UnavailableError):
        c.generate("hi", 4)
