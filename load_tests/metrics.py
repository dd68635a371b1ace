"""What one request measured, what a run adds up to (``summary.json``), and
the pass/fail thresholds.

Definitions (the ones vLLM's benchmark_serving and genai-perf use):

- TTFT: from sending the request to the first response that carries text.
- ITL: the gap between consecutive text-carrying responses of a stream, every
  gap of every request pooled (with one response per token, the time per token).
- TPOT: per request, (e2e - TTFT) / (output tokens - 1).
- e2e: from sending the request to its last response.
- Output tokens/s: output tokens of the completed requests over the window
  from the start of the test to the last completion. Locust lets requests in
  flight at the end finish (``--stop-timeout``), so every request sent counts.

Percentiles here are exact (numpy, linear interpolation); Locust's own CSV
rounds response times above 100 ms to two significant digits.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """One request. Times are seconds; ``sent`` is measured from the start of the test."""

    transport: str
    sent: float
    ok: bool
    e2e: float
    prompt_tokens: int  # what the suite asked for (counted with the tokenizer when it had one)
    max_tokens: int
    ttft: float | None = None  # None for non-streamed requests
    token_times: list[float] = field(default_factory=list)  # arrival of each text response, from sending
    input_tokens: int | None = None  # as the server counted them
    output_tokens: int | None = None
    error: str = ""
    lag: float | None = None  # rate shape: how late the request left after its due time

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in pairwise(self.token_times)]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def read_records(path: Path) -> list[RequestRecord]:
    with open(path, encoding="utf-8") as f:
        return [RequestRecord(**json.loads(line)) for line in f if line.strip()]


def write_records(records: Iterable[RequestRecord], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")


def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, float] | None:
    """count, mean, min, p50/p90/p95/p99 and max of ``values`` times ``scale``; None when empty."""
    if len(values) == 0:
        return None
    array = np.asarray(values, dtype=np.float64) * scale
    out = {"count": int(array.size), "mean": float(array.mean()), "min": float(array.min())}
    for p, value in zip(PERCENTILES, np.percentile(array, PERCENTILES), strict=True):
        out[f"p{p}"] = float(value)
    out["max"] = float(array.max())
    return {k: (v if k == "count" else round(v, 3)) for k, v in out.items()}


def _latencies(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    return {
        "ttft": distribution([r.ttft for r in ok if r.ttft is not None], 1000.0),
        "itl": distribution([gap for r in ok for gap in r.itl], 1000.0),
        "tpot": distribution([t for r in ok if (t := r.tpot) is not None], 1000.0),
        "e2e": distribution([r.e2e for r in ok], 1000.0),
    }


def summarize(
    records: Sequence[RequestRecord],
    elapsed: float,
    config: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` of a run that lasted ``elapsed`` seconds (start to stop)."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    ends = [r.sent + r.e2e for r in ok]
    window = max([*ends, 1e-9]) if ok else elapsed
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    input_tokens = sum(r.input_tokens or 0 for r in ok)
    summary: dict[str, Any] = {
        "config": config or {},
        "elapsed_s": round(elapsed, 3),
        "window_s": round(window, 3),
        "requests": {
            "total": len(records),
            "completed": len(ok),
            "failed": len(failed),
            "error_ratio": round(len(failed) / len(records), 6) if records else 0.0,
            "errors": dict(Counter(r.error for r in failed).most_common(10)),
        },
        "throughput": {
            "requests_per_s": round(len(ok) / window, 3),
            "output_tokens_per_s": round(output_tokens / window, 3),
            "input_tokens_per_s": round(input_tokens / window, 3),
            "output_tokens": output_tokens,
            "input_tokens": input_tokens,
        },
        "latency_ms": _latencies(records),
        "tokens": {
            "input": distribution([r.input_tokens for r in ok if r.input_tokens is not None]),
            "output": distribution([r.output_tokens for r in ok if r.output_tokens is not None]),
            "input_not_as_asked": sum(
                1 for r in ok if r.input_tokens is not None and r.input_tokens != r.prompt_tokens
            ),
            "output_short_of_max_tokens": sum(
                1 for r in ok if r.output_tokens is not None and r.output_tokens < r.max_tokens
            ),
        },
        "by_transport": {
            transport: {
                "completed": sum(1 for r in group if r.ok),
                "failed": sum(1 for r in group if not r.ok),
                "latency_ms": _latencies(group),
            }
            for transport in sorted({r.transport for r in records})
            if (group := [r for r in records if r.transport == transport])
        },
        "client": client or {},
    }
    lags = [r.lag for r in records if r.lag is not None]
    if lags:
        summary["arrivals"] = {
            "achieved_rate_per_s": round(len(records) / window, 3),
            "lag_ms": distribution(lags, 1000.0),
        }
    return summary


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits of a run; 0 means no limit for the latencies."""

    max_error_ratio: float = 0.01
    max_ttft_p99_ms: float = 0.0
    max_itl_p99_ms: float = 0.0

    def violations(self, summary: dict[str, Any]) -> list[str]:
        """What the run crossed (empty when it passed). A run with no completed request fails."""
        out = []
        requests = summary["requests"]
        if requests["completed"] == 0:
            out.append("no request completed")
        if requests["error_ratio"] > self.max_error_ratio:
            out.append(
                f"error ratio {requests['error_ratio']:.4f} > {self.max_error_ratio} "
                f"({requests['failed']} of {requests['total']} requests failed)"
            )
        latency = summary["latency_ms"]
        for metric, limit in (("ttft", self.max_ttft_p99_ms), ("itl", self.max_itl_p99_ms)):
            if limit > 0 and latency[metric] and latency[metric]["p99"] > limit:
                out.append(f"{metric.upper()} p99 {latency[metric]['p99']:.1f} ms > {limit:g} ms")
        return out

    def verdict(self, summary: dict[str, Any]) -> dict[str, Any]:
        found = self.violations(summary)
        return {"limits": asdict(self), "passed": not found, "violations": found}
