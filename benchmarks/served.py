"""Benchmark (d): the workload served through tritonserver (`ensemble`, gRPC streaming),
and the same through the OpenAI-compatible API in front of it (trillm.openai,
streamed ``/v1/completions``), so that the API's cost is a ratio of one run.

N concurrent clients each take requests from one shared queue and stream
them; per request we record time to first token (first non-empty text),
the gaps between text pieces (inter-token latency) and the output token
count the server reports. All traffic goes to servers this process starts
on free loopback ports, and they are always shut down. The OpenAI client is
plain http.client with a line reader, as light as the gRPC one, so that the
rows compare the servers rather than the client libraries.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from benchmarks.bench_engine import latency_row
from trillm.launcher import TritonServer, free_port
from trillm.openai.process import OpenAIOptions, OpenAIProcess
from trillm.serve import ServeConfig, prepare

StreamOne = Callable[[str, str, int], "RequestStats"]


@dataclass
class RequestStats:
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    input_tokens: int = 0
    error: str | None = None
    first_wave: bool = False  # a client's first request (see bench_engine.RequestTimes)


def _input(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def stream_one(url: str, prompt: str, max_tokens: int, timeout: float = 600.0) -> RequestStats:
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    stats = RequestStats()
    client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
    try:
        start = time.perf_counter()
        client.async_stream_infer(
            "ensemble",
            [
                _input("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
                _input("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
                _input("stream", np.array([[True]], dtype=bool), "BOOL"),
            ],
            enable_empty_final_response=True,
        )
        last = None
        while True:
            at, result, error = results.get(timeout=timeout)
            if error is not None:
                stats.error = str(error)
                return stats
            response = result.get_response()
            if any(o.name == "text_output" for o in response.outputs):
                if result.as_numpy("text_output").reshape(-1)[0]:
                    if last is None:
                        stats.ttft = at - start
                    else:
                        stats.itls.append(at - last)
                    last = at
                stats.output_tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                stats.input_tokens = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
            if response.parameters["triton_final_response"].bool_param:
                stats.e2e = at - start
                return stats
    finally:
        client.stop_stream()
        client.close()


def openai_stream_one(url: str, prompt: str, max_tokens: int, timeout: float = 600.0) -> RequestStats:
    """One streamed ``/v1/completions`` (greedy, as the gRPC rows) to the OpenAI API at ``url`` (host:port)."""
    host, _, port = url.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    stats = RequestStats()
    body = json.dumps({"model": "ensemble", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    try:
        start = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            stats.error = f"HTTP {response.status}: {response.read()[:300]!r}"
            return stats
        last = None
        for line in response:
            if not line.startswith(b"data: "):
                continue
            at = time.perf_counter()
            if line.startswith(b"data: [DONE]"):
                stats.e2e = at - start
                return stats
            chunk = json.loads(line[6:])
            if "error" in chunk:
                stats.error = str(chunk["error"])
                return stats
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if last is None:
                    stats.ttft = at - start
                else:
                    stats.itls.append(at - last)
                last = at
            if chunk.get("usage"):
                stats.output_tokens = chunk["usage"]["completion_tokens"]
                stats.input_tokens = chunk["usage"]["prompt_tokens"]
        stats.error = "the stream ended without [DONE]"
        return stats
    finally:
        connection.close()


def run_load(url: str, workload: list[tuple[str, int]], concurrency: int, send: StreamOne = stream_one) -> dict:
    """Send ``workload`` (prompt, max_tokens) with ``concurrency`` clients, each request by ``send``; summarise."""
    todo: queue.Queue = queue.Queue()
    for item in workload:
        todo.put(item)
    done: list[RequestStats] = []
    lock = threading.Lock()

    def client() -> None:
        first = True
        while True:
            try:
                prompt, max_tokens = todo.get_nowait()
            except queue.Empty:
                return
            stats = send(url, prompt, max_tokens)
            stats.first_wave, first = first, False
            with lock:
                done.append(stats)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [s for s in done if s.error is None]
    row = latency_row(concurrency, len(done), len(done) - len(ok), sum(s.output_tokens for s in ok), wall,
                      ttft=[s.ttft for s in ok], itl=[x for s in ok for x in s.itls],
                      steady_ttft=[s.ttft for s in ok if not s.first_wave])
    row["per_request"] = [{"input_tokens": s.input_tokens, "ttft_s": s.ttft, "first_wave": s.first_wave} for s in ok]
    return row


def start_server(checkpoint: Path, work_dir: Path, max_model_len: int = 1024) -> TritonServer:
    config = ServeConfig(
        checkpoint_dir=checkpoint,
        work_dir=work_dir,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        max_model_len=max_model_len,
        enable_prefix_caching=False,  # the configurations replay the same prompts (see bench_engine)
    )
    options = prepare(config)
    options.exit_timeout = 5
    server = TritonServer(options).start()
    try:
        server.wait_ready(600)
    except Exception:
        server.stop()
        raise
    return server


def bench_served(
    checkpoint: Path, workloads: dict[int, list[tuple[str, int]]], work_dir: Path = Path("build/bench-serve"),
    openai_concurrency: tuple[int, ...] = (),
) -> list[dict]:
    """One server; for each concurrency, its workload over gRPC (row ``path`` "grpc"), and right after
    it, for the concurrencies in ``openai_concurrency``, the same workload through the OpenAI API
    ("openai"), so that drift on a shared machine hits both alike."""
    server = start_server(checkpoint, work_dir)
    api = None
    try:
        stream_one(server.grpc_url, "warm up", 4)
        if openai_concurrency:
            api = OpenAIProcess(OpenAIOptions(server.grpc_url, port=free_port(), log_file=work_dir / "openai.log"))
            api.start().wait_ready(120)
            openai_stream_one(api.url.removeprefix("http://"), "warm up", 4)
        rows = []
        for concurrency, workload in workloads.items():
            paths: list[tuple[str, str, StreamOne]] = [("grpc", server.grpc_url, stream_one)]
            if api is not None and concurrency in openai_concurrency:
                paths.append(("openai", api.url.removeprefix("http://"), openai_stream_one))
            for path, url, send in paths:
                row = run_load(url, workload, concurrency, send)
                row["path"] = path
                print(
                    f"  {path:<6} c={concurrency:<3} {row['output_tok_s']:7.1f} tok/s  TTFT p50 "
                    f"{row['ttft_p50_s']:.3f}s p99 {row['ttft_p99_s']:.3f}s  ITL p50 {row['itl_p50_s'] * 1e3:.1f}ms "
                    f"p99 {row['itl_p99_s'] * 1e3:.1f}ms  errors {row['errors']}",
                    flush=True,
                )
                rows.append(row)
        return rows
    finally:
        if api is not None:
            api.stop()
        server.stop()
