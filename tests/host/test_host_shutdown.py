"""GenerationHost under shutdown and drain, on the real torch engine: no request is left
hanging, and a server fault is reported as one (unavailable), never as a bad input."""

from __future__ import annotations

import time

import pytest

from test_host import Collector
from trillm.host import SHUTTING_DOWN, GenerationHost, HostRequest
from trillm.tokenizer import load_tokenizer
from trillm.triton.errors import ServerUnavailable

pytestmark = pytest.mark.engine


@pytest.fixture()
def host(demo_model_dir):
    from trillm.engine import EngineConfig, TorchEngine

    engine = TorchEngine(EngineConfig(checkpoint_dir=str(demo_model_dir), max_model_len=512))
    h = GenerationHost(engine, load_tokenizer(demo_model_dir))
    yield h
    h.shutdown()


def start_long(host, tok, n: int, streaming: bool = True) -> list[Collector]:
    calls = []
    for i in range(n):
        c = Collector()
        host.start([HostRequest(input_ids=tok.encode(f"story {i}"), max_tokens=400, streaming=streaming)],
                   c.send, lambda: False)
        calls.append(c)
    return calls


def wait_first_tokens(calls: list[Collector], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(c.responses for c in calls) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_shutdown_ends_calls_in_flight_with_a_named_unavailable_error(host, demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    calls = start_long(host, tok, 2) + start_long(host, tok, 1, streaming=False)
    wait_first_tokens(calls[:2])
    host.shutdown()
    for c in calls:
        assert c.done.wait(30), "a request in flight was left hanging by shutdown"
        final = c.responses[-1]
        assert final.final and final.unavailable and SHUTTING_DOWN in final.error


def test_drain_refuses_new_calls_and_ends_the_rest_at_the_deadline(host, demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    short = Collector()
    host.start([HostRequest(input_ids=tok.encode("hi"), max_tokens=3)], short.send, lambda: False)
    long = start_long(host, tok, 2)
    wait_first_tokens(long)
    started = time.monotonic()
    host.drain(1.0)
    with pytest.raises(ServerUnavailable, match=SHUTTING_DOWN):
        host.start([HostRequest(input_ids=tok.encode("late"), max_tokens=3)], Collector().send, lambda: False)
    assert short.wait().responses[-1].error is None  # finished within the drain: a normal answer
    for c in long:
        assert c.done.wait(30)
        final = c.responses[-1]
        assert final.unavailable and "drain timeout" in final.error
    assert time.monotonic() - started >= 1.0  # not cut before the deadline
    assert host.num_calls == 0
