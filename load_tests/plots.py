"""PNG plots (matplotlib, Agg backend) of one run and of a concurrency sweep.

- ``timeline.png``: requests in flight and output tokens/s over time, TTFT
  and TPOT of each request by the time it was sent.
- ``latency.png``: distributions of TTFT, ITL, TPOT and e2e with p50 and p99.
- ``sweep.png``: output tokens/s against TTFT and against ITL (p50 and p99),
  one point per concurrency: the throughput-latency curve of the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from load_tests.metrics import RequestRecord  # noqa: E402

BIN_S = 1.0


def token_arrivals(record: RequestRecord) -> tuple[np.ndarray, np.ndarray]:
    """(times since the test start, tokens) of a completed request: each text
    response carries an equal share of its output tokens; a non-streamed
    request delivers them all at its end."""
    tokens = record.output_tokens or 0
    if record.token_times:
        times = record.sent + np.asarray(record.token_times)
        return times, np.full(times.size, tokens / times.size)
    return np.array([record.sent + record.e2e]), np.array([float(tokens)])


def _timeline(records: Sequence[RequestRecord], path: Path) -> None:
    ok = [r for r in records if r.ok]
    end = max((r.sent + r.e2e for r in records), default=BIN_S)
    edges = np.arange(0.0, end + BIN_S, BIN_S)
    tokens = np.zeros(edges.size - 1)
    in_flight = np.zeros(edges.size - 1)
    for r in ok:
        times, counts = token_arrivals(r)
        tokens += np.histogram(times, bins=edges, weights=counts)[0]
    for r in records:
        in_flight += np.clip(np.minimum(edges[1:], r.sent + r.e2e) - np.maximum(edges[:-1], r.sent), 0, None) / BIN_S

    fig, (ax_tput, ax_ttft, ax_tpot) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax_tput.step(edges[:-1], tokens / BIN_S, where="post", color="tab:blue", label="output tok/s")
    ax_tput.set_ylabel("output tokens/s")
    ax_users = ax_tput.twinx()
    ax_users.step(edges[:-1], in_flight, where="post", color="tab:gray", alpha=0.7, label="requests in flight")
    ax_users.set_ylabel("requests in flight (mean per s)")
    ax_tput.legend(loc="upper left")
    ax_users.legend(loc="upper right")
    for transport in sorted({r.transport for r in ok}):
        mine = [r for r in ok if r.transport == transport]
        # Non-streamed requests have neither: they appear in the throughput panel only.
        if with_ttft := [r for r in mine if r.ttft is not None]:
            ax_ttft.scatter([r.sent for r in with_ttft], [r.ttft * 1000 for r in with_ttft], s=10, label=transport)
        if with_tpot := [r for r in mine if r.tpot is not None]:
            ax_tpot.scatter([r.sent for r in with_tpot], [r.tpot * 1000 for r in with_tpot], s=10, label=transport)
    failed = [r for r in records if not r.ok]
    if failed:
        ax_ttft.scatter([r.sent for r in failed], [0] * len(failed), marker="x", color="red", label="failed")
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_tpot.set_ylabel("TPOT (ms)")
    ax_tpot.set_xlabel("seconds since the start of the test (by the time each request was sent)")
    for ax in (ax_ttft, ax_tpot):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    ax_tput.grid(alpha=0.3)
    fig.suptitle(f"trillm load test: {len(ok)} completed, {len(failed)} failed requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency(records: Sequence[RequestRecord], path: Path) -> None:
    ok = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft * 1000 for r in ok if r.ttft is not None],
        "ITL (per text response)": [gap * 1000 for r in ok for gap in r.itl],
        "TPOT (per request)": [t * 1000 for r in ok if (t := r.tpot) is not None],
        "end-to-end": [r.e2e * 1000 for r in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values) in zip(axes.flat, series.items(), strict=True):
        ax.set_title(title)
        ax.set_xlabel("ms")
        if not values:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
        for p, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(values, p))
            ax.axvline(value, color="black", linestyle=style, label=f"p{p} {value:.0f} ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_plots(records: Sequence[RequestRecord], out_dir: Path) -> list[Path]:
    """Writes timeline.png and latency.png into ``out_dir``; returns their paths."""
    paths = [out_dir / "timeline.png", out_dir / "latency.png"]
    _timeline(records, paths[0])
    _latency(records, paths[1])
    return paths


def sweep_plot(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """``points``: one dict per concurrency (run.py's sweep rows)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    x = [p["output_tokens_per_s"] for p in points]
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            y = [np.nan if p[f"{metric}_{stat}_ms"] is None else p[f"{metric}_{stat}_ms"] for p in points]
            ax.plot(x, y, style, label=f"{metric.upper()} {stat}")
        for p in points:
            if p[f"{metric}_p50_ms"] is None:
                continue
            ax.annotate(f"{p['users']}u", (p["output_tokens_per_s"], p[f"{metric}_p50_ms"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("trillm concurrency sweep (labels: concurrent users)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
