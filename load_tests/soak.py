"""``make soak``: a bounded soak of a real server, watching for leaks.

Starts `trillm serve` (OpenAI server included) on free loopback ports, runs a
Locust load against it for ``--duration`` (default 10 minutes) through
``load_tests.run``, samples the resident memory of every process of the
server every ``--sample-every`` seconds, and at the end checks the three
things a leak shows as: resident memory that keeps growing after warm-up,
KV blocks not back to 0 once idle, failed requests.

    python -m load_tests.soak [--duration 10m] [--users 6] [--checkpoint DIR]

Writes ``build/reliability/soak.json`` and prints a markdown table; exits
non-zero when a check fails. Loopback only, bounded, always stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from trillm.engine.cpu import cpu_info
from trillm.launcher import free_port

from load_tests.run import parse_duration

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "reliability" / "soak.json"


def descendants(root: int) -> dict[int, str]:
    """pid -> a short name (tritonserver, the stub's model, openai, ...) of every process under ``root``."""
    procs: dict[int, tuple[int, list[str]]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        procs[int(proc.name)] = (ppid, argv)
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, argv) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = _name(argv)
                frontier.append(pid)
    return {pid: name for pid, name in found.items() if name}


def _name(argv: list[str]) -> str:
    if argv[0].endswith("tritonserver"):
        return "tritonserver"
    if argv[0].endswith("triton_python_backend_stub") and len(argv) > 1:
        model_file = Path(argv[1])
        return f"stub:{model_file.parent.parent.name}/{model_file.parent.name}"
    if "trillm.openai" in " ".join(argv[:3]):
        return "openai"
    return ""  # the stubs' tiny parent watchers and the like


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def metric(url: str, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
    return sum(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("10m"))
    parser.add_argument("--warmup", type=parse_duration, default=parse_duration("2m"),
                        help="excluded from the memory trend (caches, allocator pools fill up)")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--max-growth", type=float, default=0.05,
                        help="largest allowed growth of a process's resident memory after warm-up (fraction)")
    parser.add_argument("--checkpoint", default=str(ROOT / "build" / "demo-model"))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="trillm-soak-"))
    http, grpc, metrics_port, openai_port = (free_port() for _ in range(4))
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "trillm"), "serve", "--checkpoint", args.checkpoint,
         "--work-dir", str(work), "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics_port), "--openai-port", str(openai_port), "--version-policy", "specific:1"],
        stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    samples: dict[str, list[tuple[float, int]]] = {}
    try:
        deadline = time.monotonic() + 900
        while metric(metrics_url, "trillm_kv_blocks_total") is None:
            if serve.poll() is not None or time.monotonic() > deadline:
                print((work / "serve.log").read_text()[-3000:])
                return 1
            time.sleep(2)
        reports = work / "reports"
        load = subprocess.Popen(
            [sys.executable, "-m", "load_tests.run", "run", "--url", f"127.0.0.1:{http}",
             "--grpc-url", f"127.0.0.1:{grpc}", "-u", str(args.users), "-r", str(args.users),
             "-t", f"{args.duration:.0f}s", "--transport", "grpc-stream,http-sse", "--reports", str(reports)],
            cwd=ROOT, stdout=open(work / "load.log", "wb"), stderr=subprocess.STDOUT)
        started = time.monotonic()
        while load.poll() is None:
            now = time.monotonic() - started
            for pid, name in descendants(serve.pid).items():
                rss = rss_bytes(pid)
                if rss is not None:
                    samples.setdefault(name, []).append((now, rss))
            time.sleep(args.sample_every)
        time.sleep(3)  # the engine publishes its stats every 0.1 s
        kv_used = metric(metrics_url, "trillm_kv_blocks_used")
        summary_files = sorted(reports.glob("*/summary.json"))
        requests = json.loads(summary_files[-1].read_text())["requests"] if summary_files else None
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)

    memory = {}
    for name, points in sorted(samples.items()):
        settled = [rss for t, rss in points if t >= args.warmup]
        if len(settled) < 4:
            continue
        quarter = max(1, len(settled) // 4)
        first, last = statistics.mean(settled[:quarter]), statistics.mean(settled[-quarter:])
        memory[name] = {"rss_mib_after_warmup": round(first / 2**20, 1), "rss_mib_at_end": round(last / 2**20, 1),
                        "growth": round(last / first - 1, 4)}
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_info().summary(), "duration_s": args.duration,
        "users": args.users, "transports": ["grpc-stream", "http-sse"], "requests": requests,
        "kv_blocks_used_at_end": kv_used, "memory": memory,
    }
    checks = {
        "no failed request": bool(requests) and requests["failed"] == 0,
        "KV blocks back to 0": kv_used == 0,
        f"resident memory within {args.max_growth:.0%} after warm-up":
            bool(memory) and all(m["growth"] <= args.max_growth for m in memory.values()),
    }
    result["checks"] = checks
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"soak: {args.duration:.0f}s, {args.users} users, {result['cpu']}")
    if requests:
        print(f"requests: {requests['total']} total, {requests['failed']} failed; KV blocks used at the end: {kv_used}")
    print("| process | RSS after warm-up (MiB) | RSS at the end (MiB) | growth |\n|---|---|---|---|")
    for name, m in memory.items():
        print(f"| {name} | {m['rss_mib_after_warmup']} | {m['rss_mib_at_end']} | {100 * m['growth']:+.1f}% |")
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {check}")
    print(f"written {OUT}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
