"""Benchmarks (a)-(c) of the CPU engine, in process, on one fixed-seed workload.

(a) ``transformers`` ``generate()``, one request at a time;
(b) ``transformers`` static batches (left-padded, every row runs until the
    batch's longest request is done);
(c) our :class:`~trillm.engine.TorchEngine`, with a closed loop of
    ``concurrency`` clients: each submits its next request as soon as the
    previous one has finished.

Plus the machine's memory bandwidth (a large tensor copy, and a read-only
reduction) and batch-1 decode speed as a fraction of the roofline (weight
bytes read per token / bandwidth).

Every configuration reports output tok/s (generated tokens / wall time),
TTFT and ITL percentiles, with the keys of ``benchmarks/served.py`` so the
rows can be merged into ``benchmarks/results/latest.json``. TTFT is measured
from the moment a client issues the request. The workload is sized by
:class:`BenchConfig`; the defaults take 2-3 minutes on 2 cores. Run:

    python -m benchmarks.bench_engine [--checkpoint DIR] [--requests N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from trillm.engine import EngineConfig, GenerationRequest, SamplingParams, StepOutput, TorchEngine
from trillm.engine.cpu import cpu_info

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchConfig:
    checkpoint: Path = ROOT / "build" / "demo-model"
    seed: int = 0
    prompt_tokens: tuple[int, int] = (32, 512)  # inclusive range of prompt lengths
    output_tokens: tuple[int, int] = (64, 256)  # inclusive range of max_tokens
    # Requests per engine concurrency: at least twice the clients, so that after the first wave
    # (all clients at once) requests arrive one by one into a running batch: the steady state.
    engine_requests: int = 64
    engine_concurrencies: tuple[int, ...] = (8, 32)
    batch1_requests: int = 4  # lone requests (concurrency 1); served c=1 fits TTFT against prompt length on them
    hf_sequential_requests: int = 3
    hf_batch_size: int = 8
    hf_batch_requests: int = 8
    max_model_len: int = 1024
    num_threads: int = 0  # 0 = torch's default
    skip_hf: bool = False
    # Off: every configuration replays the same prompts, and blocks cached by the previous
    # configuration would turn its prefills into cache hits.
    prefix_caching: bool = False


@dataclass
class WorkItem:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class RequestTimes:
    """When a client issued a request and when each of its tokens arrived (time.perf_counter)."""

    issued: float
    token_times: list[float] = field(default_factory=list)
    first_wave: bool = False  # issued at t=0 with every other client: a burst, not the steady state

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.issued

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.token_times))


def make_workload(n: int, config: BenchConfig, vocab_size: int) -> list[WorkItem]:
    """``n`` requests of random tokens (ids from 6 up: clear of the demo model's special tokens)."""
    rng = np.random.default_rng(config.seed)
    lo_p, hi_p = config.prompt_tokens
    lo_o, hi_o = config.output_tokens
    return [
        WorkItem(rng.integers(6, vocab_size, int(rng.integers(lo_p, hi_p + 1))).tolist(),
                 int(rng.integers(lo_o, hi_o + 1)))
        for _ in range(n)
    ]


def summarise(name: str, concurrency: int, requests: list[RequestTimes], wall: float, errors: int = 0) -> dict:
    return {"name": name, **latency_row(
        concurrency, len(requests), errors, sum(len(r.token_times) for r in requests), wall,
        ttft=[r.ttft for r in requests if r.token_times], itl=[x for r in requests for x in r.itls],
        steady_ttft=[r.ttft for r in requests if r.token_times and not r.first_wave])}


def latency_row(concurrency: int, requests: int, errors: int, tokens: int, wall: float, ttft: list[float],
                itl: list[float], steady_ttft: list[float]) -> dict:
    """The figures every configuration reports (in-process and served alike).

    ``steady_ttft``: TTFT of the requests after the first wave (a client's
    second request on), which join a running batch one at a time.
    """
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": errors,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_steady_p50_s": pct(steady_ttft, 50),
        "ttft_steady_p99_s": pct(steady_ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
    }


# ---- machine -----------------------------------------------------------------------------------


def memory_bandwidth(repeats: int = 5) -> dict:
    """Best-of-``repeats`` bandwidth of a tensor copy (bytes read + written) and of a sum (bytes read).

    The buffers are 4x the L3 (at least 512 MiB): a Xeon's 300 MiB L3 serves a
    256 MiB read at 179 GB/s, several times what memory gives.
    """
    nbytes = max(512 << 20, 4 * cpu_info().l3_bytes)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = read_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read_s = min(read_s, time.perf_counter() - start)
    nbytes = src.numel() * 4
    return {"copy_gb_s": 2 * nbytes / copy_s / 1e9, "read_gb_s": nbytes / read_s / 1e9, "buffer_mib": nbytes >> 20}


# ---- (a), (b): transformers ----------------------------------------------------------------------


class _StreamTimer:
    """A generate() streamer that records when each new token (or batch row of tokens) arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def load_hf(checkpoint: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early: lengths are the workload's
    model.generation_config.pad_token_id = 0
    return model


def bench_hf_sequential(model, workload: list[WorkItem]) -> dict:
    requests = []
    start = time.perf_counter()
    with torch.inference_mode():
        for item in workload:
            timer = _StreamTimer()
            issued = time.perf_counter()
            model.generate(torch.tensor([item.prompt_ids]), attention_mask=torch.ones(1, len(item.prompt_ids),
                           dtype=torch.long), max_new_tokens=item.max_tokens, do_sample=False, streamer=timer)
            requests.append(RequestTimes(issued, timer.times[:item.max_tokens]))
    return summarise("hf_generate_sequential", 1, requests, time.perf_counter() - start)


def bench_hf_static_batches(model, workload: list[WorkItem], batch_size: int) -> dict:
    """Left-padded batches in arrival order; a row's tokens count only up to its own max_tokens."""
    requests = []
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(workload), batch_size):
            batch = workload[b:b + batch_size]
            width = max(len(item.prompt_ids) for item in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, item in enumerate(batch):
                ids[row, width - len(item.prompt_ids):] = torch.tensor(item.prompt_ids)
                mask[row, width - len(item.prompt_ids):] = 1
            timer = _StreamTimer()
            issued = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=max(item.max_tokens for item in batch),
                           do_sample=False, streamer=timer)
            requests += [RequestTimes(issued, timer.times[:item.max_tokens]) for item in batch]
    return summarise(f"hf_generate_static_batch_{batch_size}", batch_size, requests, time.perf_counter() - start)


# ---- (c): our engine ---------------------------------------------------------------------------


def bench_engine(engine: TorchEngine, workload: list[WorkItem], concurrency: int, name: str = "") -> dict:
    """Closed loop: ``concurrency`` requests in flight; each finish issues the next request."""
    todo = list(enumerate(workload))
    times: dict[str, RequestTimes] = {}
    finished: queue.Queue = queue.Queue()
    errors = 0
    lock = threading.Lock()

    def on_output(output: StepOutput) -> None:
        now = time.perf_counter()
        with lock:
            times[output.request_id].token_times += [now] * len(output.token_ids)
        if output.finished:
            finished.put(output)

    def issue(first_wave: bool = False) -> None:
        index, item = todo.pop(0)
        request_id = f"bench-{concurrency}-{index}"
        with lock:
            times[request_id] = RequestTimes(time.perf_counter(), first_wave=first_wave)
        engine.submit(GenerationRequest(request_id, item.prompt_ids, SamplingParams(max_tokens=item.max_tokens)),
                      on_output)

    start = time.perf_counter()
    for _ in range(min(concurrency, len(todo))):
        issue(first_wave=True)
    for _ in range(len(workload)):
        output = finished.get(timeout=3600)
        errors += output.finish_reason is None or output.finish_reason.value == "error"
        if todo:
            issue()
    wall = time.perf_counter() - start
    return summarise(name or f"trillm_engine_c{concurrency}", concurrency, list(times.values()), wall, errors)


def batch1_decode(engine: TorchEngine, bandwidth_gb_s: float, prompt_len: int = 128, tokens: int = 128) -> dict:
    """Steady-state decode of one request alone, against the memory roofline."""
    item = WorkItem(list(range(6, 6 + prompt_len)), tokens)
    row = bench_engine(engine, [item], 1, name="batch1_probe")
    decode_s = row["itl_p50_s"]
    kv_bytes_token = engine.spec.kv_bytes_per_token(engine.kv_cache.k.dtype)
    mean_context = prompt_len + tokens / 2
    weight_bytes = engine.model.weight_bytes
    roofline = bandwidth_gb_s * 1e9 / weight_bytes
    roofline_kv = bandwidth_gb_s * 1e9 / (weight_bytes + kv_bytes_token * mean_context)
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_token,
        "bandwidth_gb_s": bandwidth_gb_s,
        "decode_tok_s": 1.0 / decode_s,
        "roofline_tok_s": roofline,
        "fraction_of_roofline": (1.0 / decode_s) / roofline,
        "roofline_with_kv_tok_s": roofline_kv,
        "fraction_of_roofline_with_kv": (1.0 / decode_s) / roofline_kv,
        "itl_p50_s": decode_s,
        "itl_p99_s": row["itl_p99_s"],
    }


# ---- the whole run -------------------------------------------------------------------------------


def run(config: BenchConfig) -> dict:
    """Every configuration; returns the dict printed by :func:`print_report`."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": cpu_info().model_name,
                    "cpu": cpu_info().as_dict()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "memory_bandwidth": memory_bandwidth(),
        "rows": [],
    }
    bandwidth = max(results["memory_bandwidth"]["copy_gb_s"], results["memory_bandwidth"]["read_gb_s"])
    engine = TorchEngine(EngineConfig(checkpoint_dir=str(config.checkpoint), max_model_len=config.max_model_len,
                                      num_threads=config.num_threads,
                                      enable_prefix_caching=config.prefix_caching))
    try:
        vocab = engine.vocab_size
        bench_engine(engine, make_workload(2, BenchConfig(seed=config.seed + 99, output_tokens=(4, 4)), vocab), 2,
                     name="warm-up")
        results["engine_limits"] = asdict(engine.limits)
        results["engine_kernels"] = engine.kernels
        results["batch1_roofline"] = batch1_decode(engine, bandwidth)
        workload = make_workload(max(config.engine_requests, config.batch1_requests), config, vocab)
        _report_row(bench_engine(engine, workload[:config.batch1_requests], 1), results)
        for concurrency in config.engine_concurrencies:
            _report_row(bench_engine(engine, workload[:config.engine_requests], concurrency), results)
    finally:
        engine.shutdown()
    if not config.skip_hf:
        model = load_hf(config.checkpoint)
        workload = make_workload(max(config.hf_sequential_requests, config.hf_batch_requests), config, vocab)
        _report_row(bench_hf_sequential(model, workload[:config.hf_sequential_requests]), results)
        _report_row(bench_hf_static_batches(model, workload[:config.hf_batch_requests], config.hf_batch_size), results)
    return results


def _report_row(row: dict, results: dict) -> None:
    results["rows"].append(row)
    print(_format_row(row), flush=True)


def _format_row(row: dict) -> str:
    return (f"  {row['name']:<32} c={row['concurrency']:<3} n={row['requests']:<3} {row['output_tok_s']:8.1f} tok/s  "
            f"TTFT p50 {row['ttft_p50_s']:7.3f}s p99 {row['ttft_p99_s']:7.3f}s  "
            f"ITL p50 {row['itl_p50_s'] * 1e3:7.1f}ms p99 {row['itl_p99_s'] * 1e3:7.1f}ms  errors {row['errors']}")


def print_report(results: dict) -> None:
    bw, roof = results["memory_bandwidth"], results["batch1_roofline"]
    print(f"machine: {results['machine']}")
    print(f"memory bandwidth: copy {bw['copy_gb_s']:.1f} GB/s (read+write), read {bw['read_gb_s']:.1f} GB/s")
    print(f"batch-1 decode: {roof['decode_tok_s']:.1f} tok/s; roofline {roof['roofline_tok_s']:.1f} tok/s "
          f"({roof['weight_bytes'] / 1e6:.0f} MB of weights at {roof['bandwidth_gb_s']:.1f} GB/s) -> "
          f"{100 * roof['fraction_of_roofline']:.0f}% ({100 * roof['fraction_of_roofline_with_kv']:.0f}% "
          f"counting the KV cache read)")
    print(f"{'configuration':<34} {'':<5} {'':<5} {'output':>13}  {'TTFT':>28}  {'ITL':>30}")
    for row in results["rows"]:
        print(_format_row(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=BenchConfig.checkpoint)
    parser.add_argument("--requests", type=int, default=BenchConfig.engine_requests,
                        help="requests per engine concurrency (the workload size)")
    parser.add_argument("--hf-requests", type=int, default=BenchConfig.hf_sequential_requests,
                        help="requests for transformers one at a time")
    parser.add_argument("--hf-batch-requests", type=int, default=BenchConfig.hf_batch_requests)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(BenchConfig.engine_concurrencies))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only the engine")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        from trillm.demo_model import build_demo_model

        build_demo_model(args.checkpoint)
    config = BenchConfig(checkpoint=args.checkpoint, engine_requests=args.requests,
                         hf_sequential_requests=args.hf_requests, hf_batch_requests=args.hf_batch_requests,
                         engine_concurrencies=tuple(args.concurrency), num_threads=args.threads, skip_hf=args.skip_hf)
    results = run(config)
    print()
    print_report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
