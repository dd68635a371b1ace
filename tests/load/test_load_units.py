"""The load-test suite's pure parts: prompt lengths, shapes, arrivals,
summaries and thresholds, options. No server, no Locust process."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from load_tests.metrics import RequestRecord, Thresholds, summarize
from load_tests.options import OPTIONS, add_options, forward, host_port, is_loopback, parse_sampling
from load_tests.prompts import LengthDist, PromptFactory, build_prompts
from load_tests.run import parse_duration, parse_users_list, timespan
from load_tests.shapes import ArrivalSchedule, shape_target

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "spec, expected",
    [("7", ("fixed", 7, 0)), ("uniform:4:9", ("uniform", 4, 9)), ("normal:64:8", ("normal", 64.0, 8.0))],
)
def test_length_dist_parses(spec, expected):
    dist = LengthDist.parse(spec)
    assert (dist.kind, dist.a, dist.b) == expected
    assert str(dist) == spec


@pytest.mark.parametrize("spec", ["0", "uniform:9:4", "uniform:0:4", "normal:0:1", "gauss:1:2", "x", "uniform:4"])
def test_length_dist_rejects(spec):
    with pytest.raises(ValueError, match="token length"):
        LengthDist.parse(spec)


def test_length_dist_samples_stay_in_range():
    rng = np.random.default_rng(0)
    assert set(LengthDist.parse("uniform:4:6").sample(rng, 500)) == {4, 5, 6}
    assert LengthDist.parse("normal:2:50").sample(rng, 500).min() >= 1


def test_prompts_are_reproducible_and_sized():
    factory = PromptFactory(None)  # the word list, one word per token
    a = build_prompts(20, LengthDist.parse("uniform:5:40"), LengthDist.parse("uniform:1:9"), 3, factory)
    b = build_prompts(20, LengthDist.parse("uniform:5:40"), LengthDist.parse("uniform:1:9"), 3, factory)
    c = build_prompts(20, LengthDist.parse("uniform:5:40"), LengthDist.parse("uniform:1:9"), 4, factory)
    assert a == b
    assert a != c
    for prompt in a:
        assert len(prompt.text.split()) == prompt.input_tokens
        assert 5 <= prompt.input_tokens <= 40 and 1 <= prompt.max_tokens <= 9
        assert not prompt.exact


def test_constant_and_rate_shapes_hold_users_until_run_time():
    for shape in ("constant", "rate"):
        assert shape_target(shape, 0.0, users=5, spawn_rate=2, run_time=10) == (5, 2)
        assert shape_target(shape, 9.9, users=5, spawn_rate=2, run_time=10) == (5, 2)
        assert shape_target(shape, 10.0, users=5, spawn_rate=2, run_time=10) is None


def test_step_shape_ramps_then_holds_or_ends():
    def users_at(t, run_time):
        target = shape_target("step", t, users=5, spawn_rate=10, run_time=run_time, step_users=2, step_time=3)
        return None if target is None else target[0]

    assert [users_at(t, 100) for t in (0, 2.9, 3, 6, 9, 50)] == [2, 2, 4, 5, 5, 5]
    assert users_at(100, 100) is None
    # Without a run time the ramp ends one step after reaching the top (3 steps of 3 s).
    assert users_at(8.9, None) == 5 and users_at(9, None) is None


def test_shape_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shape_target("zigzag", 0, users=1, spawn_rate=1, run_time=1)
    with pytest.raises(ValueError):
        shape_target("step", 0, users=1, spawn_rate=1, run_time=1, step_users=0)


def test_uniform_arrivals_are_evenly_spaced():
    schedule = ArrivalSchedule(4.0, "uniform", clock=lambda: 100.0)
    assert [schedule.claim() for _ in range(4)] == [100.0, 100.25, 100.5, 100.75]


def test_poisson_arrivals_average_the_rate_and_are_seeded():
    def due(seed):
        schedule = ArrivalSchedule(10.0, "poisson", seed=seed, clock=lambda: 0.0)
        return [schedule.claim() for _ in range(2001)]

    times = due(1)
    assert times == due(1) != due(2)
    assert times[-1] / 2000 == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError):
        ArrivalSchedule(0.0)


def record(sent, e2e, token_times, ok=True, transport="grpc-stream"):
    return RequestRecord(
        transport=transport, sent=sent, ok=ok, e2e=e2e, prompt_tokens=10, max_tokens=len(token_times),
        ttft=token_times[0] if token_times and ok else None, token_times=token_times if ok else [],
        input_tokens=10 if ok else None, output_tokens=len(token_times) if ok else None,
        error="" if ok else "UnavailableError: gone",
    )


def test_summary_figures():
    records = [
        record(0.0, 1.0, [0.2, 0.4, 0.6, 1.0]),
        record(0.5, 1.5, [0.5, 1.0, 1.5]),
        record(1.0, 0.1, [], ok=False),
    ]
    s = summarize(records, elapsed=3.0)
    assert s["requests"] == {
        "total": 3, "completed": 2, "failed": 1, "error_ratio": pytest.approx(1 / 3, abs=1e-6),
        "errors": {"UnavailableError: gone": 1},
    }
    assert s["window_s"] == 2.0  # the last completion, 0.5 + 1.5 s after the start
    assert s["throughput"]["output_tokens"] == 7
    assert s["throughput"]["output_tokens_per_s"] == 3.5
    assert s["latency_ms"]["ttft"]["count"] == 2
    assert s["latency_ms"]["ttft"]["min"] == 200.0 and s["latency_ms"]["ttft"]["max"] == 500.0
    # ITL pools every gap: 200, 200, 400 and 500, 500 ms.
    assert s["latency_ms"]["itl"]["count"] == 5
    assert s["latency_ms"]["itl"]["p50"] == 400.0
    # TPOT per request: (1.0 - 0.2) / 3 and (1.5 - 0.5) / 2.
    assert s["latency_ms"]["tpot"]["min"] == pytest.approx(266.667, abs=1e-3)
    assert s["by_transport"]["grpc-stream"]["failed"] == 1


def test_thresholds():
    s = summarize([record(0.0, 1.0, [0.2, 0.4, 0.6, 1.0]), record(0.0, 0.1, [], ok=False)], elapsed=1.0)
    assert Thresholds(max_error_ratio=0.5).violations(s) == []
    crossed = Thresholds(max_error_ratio=0.1, max_ttft_p99_ms=100, max_itl_p99_ms=1000).violations(s)
    assert len(crossed) == 2
    assert crossed[0].startswith("error ratio 0.5000 > 0.1")
    assert crossed[1].startswith("TTFT p99 200.0 ms > 100 ms")
    verdict = Thresholds().verdict(summarize([], elapsed=1.0))
    assert not verdict["passed"] and verdict["violations"] == ["no request completed"]


def test_sampling_spec():
    assert parse_sampling("temperature=0.8, top_k=40,stop_words=END,return_log_probs=true") == {
        "temperature": 0.8, "top_k": 40, "stop_words": "END", "return_log_probs": True,
    }
    assert parse_sampling("") == {}
    with pytest.raises(ValueError, match="name=value"):
        parse_sampling("temperature")


def test_loopback_only():
    for url in ("127.0.0.1:8001", "http://127.0.0.1:8000/", "localhost:1", "[::1]:8001", "127.3.4.5:9"):
        assert is_loopback(url), url
    for url in ("10.0.0.1:8001", "http://example.com:8000", "0.0.0.0:8000"):
        assert not is_loopback(url), url
    assert host_port("http://127.0.0.1:8000/") == "127.0.0.1:8000"


def test_options_forward_round_trip():
    parser = argparse.ArgumentParser()
    add_options(parser, for_locust=False)
    args = parser.parse_args(["--allow-eos", "--max-ttft-p99-ms", "250", "--sampling", "temperature=0.5"])
    again = parser.parse_args(forward(args))
    assert vars(again) == vars(args)
    assert {o.dest for o in OPTIONS} <= set(vars(args))


def test_run_arguments():
    assert parse_duration("90") == 90 and parse_duration("1m30s") == 90 and parse_duration("2.5s") == 2.5
    assert timespan(2.5) == "3s"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")
    assert parse_users_list("64") == [1, 2, 4, 8, 16, 32, 64]
    assert parse_users_list("12") == [1, 2, 4, 8, 12]
    assert parse_users_list("3,1") == [3, 1]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_users_list("0")
