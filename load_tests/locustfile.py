"""Locust users for trillm, on trillm_client.

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --grpc-url 127.0.0.1:8001

User classes (one per transport; pick them by name, or with --class-picker in the UI):

- ``GrpcStreamUser``: the gRPC stream API with ``stream=true`` (request type ``grpc-stream``).
- ``HttpStreamUser``: HTTP ``generate_stream``, server-sent events (``http-sse``).
- ``HttpGenerateUser``: HTTP ``generate``, one JSON answer (``http-generate``; no TTFT/ITL).
- ``OpenAIStreamUser``: the OpenAI-compatible API (trillm.openai, ``--openai-url``), streamed
  ``/v1/completions`` with the official ``openai`` client (``openai-sse``); token counts from its usage.

Each request fires one Locust event per measure, so each is its own row in
Locust's stats, CSV and UI, under the request type of its transport:
``e2e`` (the request: failures are counted here), ``ttft``, ``itl`` (one
event per gap between text responses), ``tpot`` and ``output_tokens`` (whose
"response time" columns are token counts, not ms). ``summary.json`` holds
the exact figures (metrics.py). The suite's options are in options.py.

gevent: Locust runs every user as a greenlet on monkey-patched sockets,
which suits the HTTP users. tritonclient's gRPC runs on grpcio, whose
blocking waits would stall the whole event loop (a stream under Locust hangs
outright): ``grpc.experimental.gevent.init_gevent()`` below makes grpcio
cooperate, and must run before any channel exists.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import grpc.experimental.gevent as grpc_gevent
from locust import LoadTestShape, User, constant, events, task
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

grpc_gevent.init_gevent()

# `locust -f .../load_tests/locustfile.py` from any directory: load_tests is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trillm_client import Client, Completion, TrillmError  # noqa: E402

from load_tests.metrics import RequestRecord, Thresholds, distribution, summarize, write_records  # noqa: E402
from load_tests.options import OPTIONS, add_options, check_options, is_loopback, parse_sampling  # noqa: E402
from load_tests.prompts import LengthDist, Prompt, PromptFactory, build_prompts, load_prompt_tokenizer  # noqa: E402
from load_tests.shapes import ArrivalSchedule, shape_target  # noqa: E402

log = logging.getLogger("trillm.load")
LOOP_PROBE_S = 0.05


class RequestFailed(Exception):
    """A failed request as Locust's failure table shows it."""


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    add_options(parser, for_locust=True)


@functools.lru_cache(maxsize=4)
def prompt_factory(tokenizer_dir: str) -> PromptFactory:
    tokenizer = load_prompt_tokenizer(tokenizer_dir) if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
    if tokenizer is None:
        log.warning("no tokenizer (%r): prompt lengths are approximate (one word per token)", tokenizer_dir)
    return PromptFactory(tokenizer)


class Run:
    """One test, from test_start to test_stop: its prompts, arrivals and records."""

    def __init__(self, environment: Environment) -> None:
        o = environment.parsed_options
        self.environment = environment
        self.options = o
        for url in (environment.host or "", o.grpc_url, o.openai_url):
            if url and not o.allow_remote and not is_loopback(url):
                raise ValueError(f"{url} is not a loopback address; pass --allow-remote to load another machine")
        check_options(o)  # again: the web UI's form may have changed them since start-up
        self.sampling = parse_sampling(o.sampling)
        self.ignore_eos = not o.allow_eos and "min_tokens" not in self.sampling
        self.factory = prompt_factory(o.tokenizer)
        self.prompts = build_prompts(
            o.num_prompts,
            LengthDist.parse(o.input_tokens),
            LengthDist.parse(o.output_tokens),
            o.prompt_seed,
            self.factory,
        )
        self.schedule = ArrivalSchedule(o.request_rate, o.arrival, o.prompt_seed) if o.shape == "rate" else None
        self.records: list[RequestRecord] = []
        self.loop_lags: list[float] = []
        self.peak_users = 0
        self.stopping = False
        self._next_prompt = 0
        self.started = time.perf_counter()
        self._cpu_started = _cpu_seconds()
        self._monitor = gevent.spawn(self._watch)

    def next_prompt(self) -> tuple[Prompt, dict[str, Any]]:
        """The next prompt of the pool (in order, wrapping) and its sampling inputs."""
        prompt = self.prompts[self._next_prompt % len(self.prompts)]
        self._next_prompt += 1
        sampling = {**self.sampling, "min_tokens": prompt.max_tokens} if self.ignore_eos else self.sampling
        return prompt, sampling

    def wait_turn(self) -> float | None:
        """Rate shape: sleeps until this request is due; returns how late it leaves. None otherwise."""
        if self.schedule is None:
            return None
        delay = self.schedule.claim() - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        return max(0.0, -delay)

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        fire = functools.partial(self.environment.events.request.fire, request_type=record.transport, context={})
        if not record.ok:
            fire(name="e2e", response_time=record.e2e * 1000, response_length=0, exception=RequestFailed(record.error))
            return
        fire(name="e2e", response_time=record.e2e * 1000, response_length=record.output_tokens or 0)
        if record.ttft is not None:
            fire(name="ttft", response_time=record.ttft * 1000, response_length=0)
        for gap in record.itl:
            fire(name="itl", response_time=gap * 1000, response_length=0)
        if (tpot := record.tpot) is not None:
            fire(name="tpot", response_time=tpot * 1000, response_length=0)
        if record.output_tokens is not None:
            fire(name="output_tokens", response_time=record.output_tokens, response_length=record.output_tokens)

    def _watch(self) -> None:
        """How late the event loop wakes a sleeping greenlet: the client's own share of measured latency."""
        runner = self.environment.runner
        while True:
            before = time.perf_counter()
            gevent.sleep(LOOP_PROBE_S)
            self.loop_lags.append(time.perf_counter() - before - LOOP_PROBE_S)
            if runner is not None:
                self.peak_users = max(self.peak_users, runner.user_count)

    def finish(self) -> dict[str, Any]:
        """Stops the monitor; returns the summary and writes the report files when asked."""
        self._monitor.kill()
        elapsed = time.perf_counter() - self.started
        o = self.options
        config = {
            "host": self.environment.host,
            **{option.dest: getattr(o, option.dest) for option in OPTIONS if option.dest != "report_dir"},
            "users": o.num_users,
            "spawn_rate": o.spawn_rate,
            "run_time_s": o.run_time,
            "user_classes": sorted(cls.__name__ for cls in self.environment.user_classes),
            "prompt_tokens_exact": self.factory.tokenizer is not None,
        }
        client = {
            "peak_users": self.peak_users,
            "cpu_percent": round(100 * (_cpu_seconds() - self._cpu_started) / max(elapsed, 1e-9), 1),
            "loop_lag_ms": distribution(self.loop_lags, 1000.0),
        }
        summary = summarize(self.records, elapsed, config, client)
        summary["thresholds"] = Thresholds(o.max_error_ratio, o.max_ttft_p99_ms, o.max_itl_p99_ms).verdict(summary)
        if o.report_dir:
            out = Path(o.report_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_records(self.records, out / "requests.jsonl")
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


RUN: Run | None = None
LAST_SUMMARY: dict[str, Any] | None = None


@events.init.add_listener
def _check_options(environment: Environment, **_: Any) -> None:
    """Bad options end the process at start-up (exit code 2), not under load."""
    if environment.parsed_options is None:
        return
    try:
        check_options(environment.parsed_options)
    except (ValueError, TrillmError) as exc:
        log.error("invalid load-test option: %s", exc)
        sys.exit(2)


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    global RUN
    try:
        RUN = Run(environment)
    except (ValueError, TrillmError, OSError) as exc:
        log.error("cannot start the load test: %s", exc)
        environment.process_exit_code = 2
        RUN = None
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit if environment.parsed_options.headless else environment.runner.stop)


@events.test_stopping.add_listener
def _stopping(**_: Any) -> None:
    if RUN is not None:
        RUN.stopping = True


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    global RUN, LAST_SUMMARY
    if RUN is None:
        return
    LAST_SUMMARY, RUN = RUN.finish(), None
    s = LAST_SUMMARY
    ttft, itl = s["latency_ms"]["ttft"], s["latency_ms"]["itl"]
    log.info(
        "trillm: %d requests (%d failed), %.1f output tok/s, TTFT p50/p99 %s ms, ITL p50/p99 %s ms",
        s["requests"]["total"],
        s["requests"]["failed"],
        s["throughput"]["output_tokens_per_s"],
        f"{ttft['p50']:.0f}/{ttft['p99']:.0f}" if ttft else "-",
        f"{itl['p50']:.0f}/{itl['p99']:.0f}" if itl else "-",
    )
    for violation in s["thresholds"]["violations"]:
        log.error("threshold crossed: %s", violation)


@events.quitting.add_listener
def _exit_code(environment: Environment, **_: Any) -> None:
    """Exit non-zero when a threshold was crossed or user code raised; failed
    requests within the error-ratio limit do not fail the run."""
    _write_final_csv(environment)
    if environment.process_exit_code is not None or LAST_SUMMARY is None:
        return
    crashed = environment.runner is not None and bool(environment.runner.exceptions)
    environment.process_exit_code = 0 if LAST_SUMMARY["thresholds"]["passed"] and not crashed else 1


def _write_final_csv(environment: Environment) -> None:
    """Rewrites Locust's --csv tables with the final figures. Locust refreshes
    them once a second, so the requests that finish while the test stops
    (``--stop-timeout``) would otherwise be missing from them."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    tables = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("stats", tables.requests_csv), ("failures", tables.failures_csv),
                          ("exceptions", tables.exceptions_csv)):
        with open(f"{prefix}_{suffix}.csv", "w", newline="", encoding="utf-8") as f:
            write(csv.writer(f))


class TrillmShape(LoadTestShape):
    """--shape constant | step | rate (shapes.py), reading -u, -r and -t."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        o = self.runner.environment.parsed_options
        return shape_target(
            o.shape,
            self.get_run_time(),
            users=int(o.num_users or 1),
            spawn_rate=float(o.spawn_rate or 1),
            run_time=o.run_time,
            step_users=o.step_users,
            step_time=o.step_time,
        )


class LLMUser(User):
    """One simulated client: a closed loop of requests (paced in the rate shape)."""

    abstract = True
    wait_time = constant(0)
    # --host overrides; the Docker load image passes HTTP_PORT.
    host = f"http://127.0.0.1:{os.environ.get('HTTP_PORT') or 8000}"
    transport = ""
    protocol = "http"

    def on_start(self) -> None:
        o = self.environment.parsed_options
        url = o.grpc_url if self.protocol == "grpc" else self.host
        self.client = Client(url, protocol=self.protocol, model=o.model, timeout=o.request_timeout)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def request(self) -> None:
        run = RUN
        if run is None or run.stopping:
            return
        prompt, sampling = run.next_prompt()
        lag = run.wait_turn()
        if run.stopping:
            return
        sent = time.perf_counter()
        record = RequestRecord(
            transport=self.transport, sent=sent - run.started, ok=False, e2e=0.0,
            prompt_tokens=prompt.input_tokens, max_tokens=prompt.max_tokens, lag=lag,
        )
        try:
            completion = self.send(prompt, sampling, record)
        except TrillmError as exc:
            record.e2e = time.perf_counter() - sent
            record.error = f"{type(exc).__name__}: {exc.message}"[:300]
        else:
            record.ok = True
            record.e2e = completion.latency
            record.input_tokens = completion.num_input_tokens
            record.output_tokens = completion.num_output_tokens
        run.add(record)

    def send(self, prompt: Prompt, sampling: dict[str, Any], record: RequestRecord) -> Completion:
        """Sends one request and waits for all of it; a streaming user also fills in
        ``record.ttft`` and ``record.token_times``. Raises TrillmError when it fails."""
        raise NotImplementedError


class StreamingUser(LLMUser):
    abstract = True

    def send(self, prompt: Prompt, sampling: dict[str, Any], record: RequestRecord) -> Completion:
        with self.client.stream(prompt.text, prompt.max_tokens, **sampling) as stream:
            for _ in stream:
                pass
        assert stream.completion is not None
        record.ttft, record.token_times = stream.ttft, stream.token_times
        return stream.completion


class GrpcStreamUser(StreamingUser):
    transport = "grpc-stream"
    protocol = "grpc"


class HttpStreamUser(StreamingUser):
    transport = "http-sse"


class HttpGenerateUser(LLMUser):
    """One JSON answer per request: end-to-end latency and tokens, no TTFT or ITL."""

    transport = "http-generate"

    def send(self, prompt: Prompt, sampling: dict[str, Any], record: RequestRecord) -> Completion:
        return self.client.generate(prompt.text, prompt.max_tokens, **sampling)


# The pipeline inputs an OpenAI request can carry: the same name, or OpenAI's own for stop_words.
OPENAI_FIELDS = {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"}
VLLM_FIELDS = {"top_k", "min_tokens", "repetition_penalty"}


class OpenAIStreamUser(LLMUser):
    """Streamed ``/v1/completions`` through the official client; ``--model`` is the model name it asks for."""

    transport = "openai-sse"

    def on_start(self) -> None:
        import openai  # only this user needs it (the other users run without it)

        o = self.environment.parsed_options
        self.client = openai.OpenAI(base_url=o.openai_url, api_key=os.environ.get("TRILLM_API_KEY") or "none",
                                    max_retries=0, timeout=o.request_timeout)
        self.api_error = openai.APIError

    def send(self, prompt: Prompt, sampling: dict[str, Any], record: RequestRecord) -> Completion:
        unknown = set(sampling) - OPENAI_FIELDS - VLLM_FIELDS - {"stop_words"}
        if unknown:
            raise TrillmError(f"the OpenAI API takes no {', '.join(sorted(unknown))}")
        # The pipeline samples greedily unless told; OpenAI at temperature 1: ask for the pipeline's default.
        fields = {"temperature": 0.0, **{k: v for k, v in sampling.items() if k in OPENAI_FIELDS}}
        if "stop_words" in sampling:
            fields["stop"] = sampling["stop_words"]
        extra = {k: v for k, v in sampling.items() if k in VLLM_FIELDS}
        sent = time.perf_counter()
        text, times, usage, reason = [], [], None, None
        try:
            stream = self.client.completions.create(
                model=self.environment.parsed_options.model, prompt=prompt.text, max_tokens=prompt.max_tokens,
                stream=True, stream_options={"include_usage": True}, extra_body=extra, **fields)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.perf_counter() - sent)
                    text.append(chunk.choices[0].text)
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                usage = chunk.usage or usage
        except self.api_error as exc:
            raise TrillmError(f"{type(exc).__name__}: {exc}") from exc
        record.ttft, record.token_times = (times[0] if times else None), times
        return Completion(text="".join(text), num_input_tokens=usage and usage.prompt_tokens,
                          num_output_tokens=usage and usage.completion_tokens, finish_reason=reason,
                          cum_log_probs=None, output_log_probs=None, model_version="",
                          latency=time.perf_counter() - sent)
