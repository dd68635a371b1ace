"""Short real Locust runs (`python -m load_tests.run`, as `make load` runs it)
against the session's tritonserver (tests/conftest.py), checking the report
for structure and plausibility, never for speed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.load

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Locust's start-up, the run and its shutdown, with room for a loaded CI machine.
LIMIT_S = 300


def load(command: str, server, demo_model_dir: Path, reports: Path, *flags: str) -> tuple[int, str]:
    """Runs ``python -m load_tests.run COMMAND`` against the test server; returns (exit code, output)."""
    argv = [
        sys.executable, "-m", "load_tests.run", command,
        "--url", server.http_url, "--grpc-url", server.grpc_url,
        "--tokenizer", str(demo_model_dir), "--reports", str(reports),
        "--warmup-requests", "1", "--num-prompts", "16", "--request-timeout", "60",
        *flags,
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    return done.returncode, done.stdout + done.stderr


def only_report(reports: Path) -> Path:
    runs = [p for p in reports.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def stats_rows(report: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(report / "locust_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_headless_run_reports_ttft_itl_and_tokens(triton_server, demo_model_dir, tmp_path):
    rc, output = load(
        "run", triton_server, demo_model_dir, tmp_path,
        "-u", "3", "-r", "3", "-t", "4s", "--transport", "grpc-stream,http-sse,http-generate",
        "--input-tokens", "uniform:8:24", "--output-tokens", "6",
    )
    assert rc == 0, output
    report = only_report(tmp_path)
    summary = json.loads((report / "summary.json").read_text())

    requests = summary["requests"]
    assert requests["total"] > 0 and requests["completed"] == requests["total"], requests
    assert requests["failed"] == 0 and summary["thresholds"]["passed"], summary["thresholds"]
    assert set(summary["by_transport"]) == {"grpc-stream", "http-sse", "http-generate"}
    assert summary["throughput"]["output_tokens_per_s"] > 0
    # Prompts have the token counts asked for, and min_tokens makes every request run to max_tokens.
    assert summary["tokens"]["input_not_as_asked"] == 0
    assert summary["tokens"]["output_short_of_max_tokens"] == 0
    assert summary["tokens"]["output"]["min"] == summary["tokens"]["output"]["max"] == 6
    assert summary["server"] == {"started_here": False, "http_url": triton_server.http_url,
                                 "grpc_url": triton_server.grpc_url}

    latency = summary["latency_ms"]
    assert 0 < latency["ttft"]["min"] and latency["ttft"]["p50"] < latency["e2e"]["p50"]
    assert latency["itl"]["count"] > 0 and latency["itl"]["min"] > 0
    assert latency["tpot"]["count"] > 0
    assert summary["by_transport"]["http-generate"]["latency_ms"]["ttft"] is None  # one answer: no first token

    records = [json.loads(line) for line in (report / "requests.jsonl").read_text().splitlines()]
    assert len(records) == requests["total"]
    for r in records:
        assert r["ok"] and r["output_tokens"] == 6 and r["e2e"] > 0
        if r["transport"] != "http-generate":
            assert 0 < r["ttft"] < r["e2e"], r
            assert r["token_times"] == sorted(r["token_times"]) and len(r["token_times"]) >= 2, r

    # Locust's own table: a row per measure and transport, with the final counts.
    rows = stats_rows(report)
    for transport in ("grpc-stream", "http-sse"):
        for name in ("ttft", "itl", "tpot"):
            assert int(rows[transport, name]["Request Count"]) > 0, (transport, name)
        assert 0 < float(rows[transport, "ttft"]["Average Response Time"]) < float(
            rows[transport, "e2e"]["Average Response Time"]
        )
    for transport, figures in summary["by_transport"].items():
        assert int(rows[transport, "e2e"]["Request Count"]) == figures["completed"], transport
        assert int(rows[transport, "e2e"]["Failure Count"]) == 0
        assert float(rows[transport, "output_tokens"]["Average Response Time"]) == 6
    assert ("http-generate", "ttft") not in rows

    assert "ttft" in (report / "report.html").read_text(encoding="utf-8")
    for name in ("timeline.png", "latency.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name


def test_crossed_threshold_fails_the_run(triton_server, demo_model_dir, tmp_path):
    rc, output = load(
        "run", triton_server, demo_model_dir, tmp_path,
        "-u", "2", "-t", "2s", "--transport", "grpc-stream", "--input-tokens", "8", "--output-tokens", "4",
        "--max-ttft-p99-ms", "0.001",
    )
    assert rc == 1, output
    summary = json.loads((only_report(tmp_path) / "summary.json").read_text())
    assert summary["requests"]["completed"] > 0 and summary["requests"]["failed"] == 0
    verdict = summary["thresholds"]
    assert not verdict["passed"]
    assert len(verdict["violations"]) == 1 and verdict["violations"][0].startswith("TTFT p99"), verdict
    assert "thresholds FAILED" in output


def test_sweep_draws_the_throughput_latency_curve(triton_server, demo_model_dir, tmp_path):
    rc, output = load(
        "sweep", triton_server, demo_model_dir, tmp_path,
        "--sweep-users", "1,2", "--step-duration", "2s", "--transport", "http-sse",
        "--input-tokens", "8", "--output-tokens", "4",
    )
    assert rc == 0, output
    report = only_report(tmp_path)
    sweep = json.loads((report / "sweep.json").read_text())
    assert [p["users"] for p in sweep["points"]] == [1, 2]
    for point in sweep["points"]:
        assert point["completed"] > 0 and point["failed"] == 0 and point["passed"]
        assert point["output_tokens_per_s"] > 0
        assert 0 < point["ttft_p50_ms"] <= point["ttft_p99_ms"] < point["e2e_p99_ms"]
        assert 0 < point["itl_p50_ms"] <= point["itl_p99_ms"]
    with open(report / "sweep.csv", newline="") as f:
        assert [row["users"] for row in csv.DictReader(f)] == ["1", "2"]
    assert (report / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    for users in (1, 2):
        assert (report / f"users-{users:03d}" / "summary.json").is_file()
