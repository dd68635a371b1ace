"""Faults on a real server started as a user starts it (`trillm serve`, demo model): a dead
engine stub, SIGTERM with streams in flight, SIGKILL of the launcher.

Faults are injected by signal, by pid (found by walking the launcher's process
tree), never by process name. Each test writes what it measured (times to
detect and recover, requests lost) to build/reliability/<test>.json, from which
docs/reliability.md is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trillm.launcher import free_port

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
TRILLM = Path(sys.executable).parent / "trillm"
REPORT_DIR = ROOT / "build" / "reliability"
HANG_GUARD_S = 240  # only so that a broken server cannot hang the suite; never a performance bound


def report(name: str, figures: dict) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / f"{name}.json").write_text(json.dumps(figures, indent=2))


class Served:
    """`trillm serve` in a subprocess on free loopback ports."""

    def __init__(self, checkpoint: Path, work: Path, drain_timeout: float = 20.0) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "serve.log"
        self.process = subprocess.Popen(
            [str(TRILLM), "serve", "--checkpoint", str(checkpoint), "--work-dir", str(work),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--version-policy", "specific:1", "--no-openai", "--max-model-len", "1024",
             "--drain-timeout", str(drain_timeout)],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def ready(self) -> bool:
        """Ready, and the launcher has said so (its watchdog knows the stubs from then on)."""
        if b"trillm: ready." not in self.log.read_bytes():
            return False
        try:
            with urllib.request.urlopen(self.url("/v2/health/ready"), timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, predicate, timeout: float = HANG_GUARD_S, period: float = 0.05) -> float:
        """Seconds until ``predicate()``; fails the test past the hang guard."""
        start = time.monotonic()
        while not predicate():
            assert time.monotonic() - start < timeout, f"timed out; log:\n{self.log.read_text()[-3000:]}"
            time.sleep(period)
        return time.monotonic() - start

    def generate(self, prompt: str = "The capital of France is", max_tokens: int = 8) -> tuple[int, str]:
        """(HTTP status, body) of a /generate call; status 0 when the connection failed."""
        body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(self.url("/v2/models/ensemble/generate"), data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def descendants(self) -> dict[int, str]:
        return descendants(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            out[int(proc.name)] = (int(stat[1]), cmd)
    return out


def descendants(root: int) -> dict[int, str]:
    procs = _processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmd) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                frontier.append(pid)
    return found


def alive(pids) -> list[int]:
    procs = _processes()
    return [p for p in pids if p in procs]


@pytest.fixture()
def served(demo_model_dir, tmp_path):
    servers = []

    def start(**kwargs) -> Served:
        server = Served(demo_model_dir, tmp_path / f"serve{len(servers)}", **kwargs)
        servers.append(server)
        server.wait(server.ready)
        return server

    yield start
    for server in servers:
        server.stop()
        leftover = alive(server.descendants())
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)


def test_a_dead_engine_stub_turns_readiness_false_and_the_server_recovers(served):
    server = served()
    status, before = server.generate()
    assert status == 200, before
    stub = next(pid for pid, cmd in server.descendants().items() if "/tensorrt_llm/1/model.py" in cmd)
    os.kill(stub, signal.SIGKILL)
    killed = time.monotonic()
    answers: list[tuple[float, int, str]] = []  # (seconds after the kill, status, body) while it was down

    def not_ready_yet() -> bool:
        answers.append((time.monotonic() - killed, *server.generate()))
        return not server.ready()

    detect_s = server.wait(not_ready_yet, period=0.02)
    recover_s = detect_s + server.wait(server.ready, period=0.2)
    status, after = server.generate()
    # Until the launcher restarts tritonserver, a request can still reach the dead stub (Triton's
    # 400, or tritonserver restarting the stub itself); once the server is down (connections
    # refused: UNAVAILABLE), no request may be answered as a bad input.
    assert "restarting tritonserver" in server.log.read_text()
    down = next((i for i, (_, s, _) in enumerate(answers) if s == 0), len(answers))
    assert all(s != 400 for _, s, _ in answers[down:]), answers
    assert status == 200 and json.loads(after)["text_output"] == json.loads(before)["text_output"]
    assert stub not in server.descendants()
    lost = [a for a in answers if a[1] != 200]
    report("dead_engine_stub", {"detect_s": round(detect_s, 3), "recover_s": round(recover_s, 3),
                                "requests_during_fault": len(answers), "failed": len(lost),
                                "failed_as_400_before_detection": sum(1 for a in lost if a[1] == 400)})


def test_sigterm_drains_streams_in_flight_and_exits_zero(served):
    from trillm_client import Client
    from trillm_client.errors import TrillmError

    drain = 4.0
    server = served(drain_timeout=drain)
    results: dict[str, object] = {}

    def stream(name: str, max_tokens: int) -> None:
        try:
            with Client(f"127.0.0.1:{server.grpc}", protocol="grpc", model="ensemble") as client:
                with client.stream("Once upon a time", max_tokens=max_tokens) as s:
                    text = "".join(s)
                results[name] = ("done", s.completion.finish_reason, len(text))
        except TrillmError as e:
            results[name] = ("error", type(e).__name__, e.message)

    threads = [threading.Thread(target=stream, args=(f"long{i}", 1000)) for i in range(4)]
    threads.append(threading.Thread(target=stream, args=("short", 12)))
    for t in threads:
        t.start()
    time.sleep(1.5)  # the streams are running
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    not_ready_s = server.wait(lambda: not server.ready(), period=0.02)
    late_status, late_body = server.generate()
    for t in threads:
        t.join(HANG_GUARD_S)
    code = server.process.wait(HANG_GUARD_S)
    exit_s = time.monotonic() - signalled

    assert code == 0, server.log.read_text()[-3000:]
    assert late_status in (0, 503), (late_status, late_body)  # refused: a server fault, not a bad input
    assert results["short"][0] == "done", results["short"]
    for i in range(4):
        kind, error_type, message = results[f"long{i}"]
        assert (kind, error_type) == ("error", "UnavailableError") and "server shutting down" in message, results
    assert exit_s <= drain + 5 + 2, exit_s  # the launcher kills at drain + 4 s at the latest
    report("sigterm_drain", {"drain_timeout_s": drain, "not_ready_after_s": round(not_ready_s, 3),
                             "exit_after_s": round(exit_s, 3), "exit_code": code,
                             "late_request": [late_status, late_body[:200]],
                             "streams": {k: list(v) for k, v in results.items()}})


def test_sigkill_of_the_launcher_leaves_no_server_process(served):
    server = served()
    tree = server.descendants()
    assert any("tritonserver" in cmd for cmd in tree.values()) and len(tree) >= 5, tree
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    killed = time.monotonic()
    gone_s = server.wait(lambda: not alive(tree), timeout=60, period=0.1)
    report("sigkill_launcher", {"processes": len(tree), "all_gone_after_s": round(time.monotonic() - killed, 3),
                                "gone_s": round(gone_s, 3)})
