"""Throughput through nginx with one replica and with two, on this host (docs/scale.md).

Each layout starts its tritonservers (the demo model) and nginx from trillm.lb
on free loopback ports, warms up, then runs a closed loop of CONCURRENCY
clients (trillm_client over gRPC through nginx, fixed output length) for
DURATION seconds, and prints requests/s, output tokens/s and latency, with
every figure also as a ratio to the first layout of the same run:

  .venv/bin/python deploy/measure_replicas.py [--duration 30] [--concurrency 8]

Layouts: one replica with one torch thread (the baseline), one replica with
two threads (scaled up), two replicas with one thread each (scaled out).
Traffic stays on 127.0.0.1 and every loop ends by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from trillm import lb
from trillm.demo_model import build_demo_model
from trillm.launcher import TritonServer, free_port
from trillm.serve import ServeConfig, prepare
from trillm_client import Client

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the city begins with a small settlement by the river, where"
LAYOUTS = {"1 replica x 1 thread": (1, 1), "1 replica x 2 threads": (1, 2), "2 replicas x 1 thread": (2, 1)}


def start_replicas(stack: ExitStack, work: Path, count: int, threads: int) -> list[TritonServer]:
    checkpoint = Path(build_demo_model(ROOT / "build" / "demo-model"))
    v2 = Path(build_demo_model(ROOT / "build" / "demo-model-v2", version=2))
    servers = []
    for index in range(count):
        config = ServeConfig(checkpoint_dir=checkpoint, version_checkpoints={2: v2},
                             model_repository=ROOT / "model_repository", work_dir=work / f"replica{index}",
                             http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                             max_model_len=1024, max_input_len=512, num_threads=threads)
        options = prepare(config)
        options.exit_timeout = 5
        server = TritonServer(options)
        stack.callback(server.stop)
        servers.append(server.start())
    for server in servers:
        server.wait_ready(600)
    return servers


def closed_loop(url: str, concurrency: int, duration: float, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = errors = 0
    lock = threading.Lock()
    end = time.monotonic() + duration

    def user() -> None:
        nonlocal tokens, errors
        with Client(url, protocol="grpc", timeout=120) as client:
            while time.monotonic() < end:
                try:
                    done = client.generate(PROMPT, max_tokens=max_tokens, min_tokens=max_tokens)
                except Exception:  # noqa: BLE001 - counted, the loop goes on
                    with lock:
                        errors += 1
                    continue
                with lock:
                    latencies.append(done.latency)
                    tokens += done.num_output_tokens or 0

    started = time.monotonic()
    users = [threading.Thread(target=user) for _ in range(concurrency)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "load_average_1m": os.getloadavg()[0],  # the host's other work during the run
        "requests_per_s": len(latencies) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "requests": len(latencies),
        "errors": errors,
    }


def measure(count: int, threads: int, args: argparse.Namespace) -> dict:
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trillm-measure-")))
        servers = start_replicas(stack, work, count, threads)
        config = lb.BalancerConfig(
            replicas=[lb.Replica(s.options.host, s.options.http_port, s.options.grpc_port) for s in servers],
            work_dir=work / "nginx", http_port=free_port(), grpc_port=free_port(),
            # Workers as our own user, so that they can use our temporary dir.
            user="root" if os.geteuid() == 0 else None)
        stack.enter_context(lb.running(config))
        url = f"{config.listen_host}:{config.grpc_port}"
        closed_loop(url, args.concurrency, args.warmup, args.max_tokens)
        return closed_loop(url, args.concurrency, args.duration, args.max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    # Layouts alternate round after round, so that a change in the host's
    # other load does not fall on one layout only.
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for round_ in range(1, args.rounds + 1):
        for name, (count, threads) in LAYOUTS.items():
            result = measure(count, threads, args)
            rows.append((round_, name, result))
            print(round_, name, json.dumps(result), flush=True)
    print("\n| round | layout | requests/s | output tok/s | vs 1x1 of the round | p50 latency s | errors | load average |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r: result for r, name, result in rows if name == next(iter(LAYOUTS))}
    for round_, name, r in rows:
        print(f"| {round_} | {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
              f"{r['output_tokens_per_s'] / base[round_]['output_tokens_per_s']:.2f}x | {r['latency_p50_s']:.2f} | "
              f"{r['errors']} | {r['load_average_1m']:.1f} |")


if __name__ == "__main__":
    main()
