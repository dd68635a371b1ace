"""Prometheus metrics of the engine host, exposed on tritonserver's metrics port.

Uses the Python backend's custom metrics (``pb_utils.MetricFamily``). Where
they are unavailable (the fake pb_utils of the unit tests) every call is a
no-op, so the host logic does not care.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class HostMetrics:
    def __init__(self, model: str, version: str) -> None:
        family = getattr(pb_utils, "MetricFamily", None)
        self.enabled = family is not None
        if not self.enabled:
            return
        labels = {"model": model, "version": version}
        # A MetricFamily must outlive its Metrics: keep every one referenced.
        self._families = []

        def make(name, kind, description, **extra):
            metric_family = family(name=name, description=description, kind=kind)
            self._families.append(metric_family)
            if kind == family.HISTOGRAM:
                return metric_family.Metric(labels=labels, buckets=extra["buckets"])
            return metric_family.Metric(labels=labels)

        G, C, H = family.GAUGE, family.COUNTER, family.HISTOGRAM
        self.gauges = {
            "running": make("trillm_requests_active", G, "Sequences being generated"),
            "waiting": make("trillm_requests_queued", G, "Sequences waiting for admission"),
            "kv_blocks_used": make("trillm_kv_blocks_used", G, "KV cache blocks in use"),
            "kv_blocks_total": make("trillm_kv_blocks_total", G, "KV cache blocks in all"),
            "batch_invariant": make("trillm_batch_invariant", G,
                                    "1 when a request's output does not depend on its batch (probed on this CPU at load)"),
            "resident_memory_bytes": make("trillm_resident_memory_bytes", G,
                                           "Resident memory (VmRSS) of the engine's process: weights, KV cache, runtime"),
        }
        self.counters = {
            "prompt_tokens_total": make("trillm_prompt_tokens_total", C, "Prompt tokens processed"),
            "generation_tokens_total": make("trillm_generation_tokens_total", C, "Tokens generated"),
            "prefix_cache_hit_blocks": make("trillm_prefix_cache_hit_blocks_total", C, "KV blocks reused from the prefix cache"),
        }
        self._last = {k: 0 for k in self.counters}
        self.ttft = make("trillm_time_to_first_token_seconds", H, "Time to first token", buckets=LATENCY_BUCKETS)
        self.itl = make("trillm_inter_token_latency_seconds", H, "Time between tokens", buckets=LATENCY_BUCKETS)
        finished = family(name="trillm_requests_finished_total", description="Finished sequences by reason", kind=C)
        self._finished_family = finished
        self._families.append(finished)
        self._finished: dict[str, object] = {}
        self._labels = labels

    def observe(self, kind: str, value) -> None:
        if not self.enabled:
            return
        if kind == "ttft":
            self.ttft.observe(value)
        elif kind == "itl":
            self.itl.observe(value)
        elif kind == "finished":
            metric = self._finished.get(value)
            if metric is None:
                metric = self._finished_family.Metric(labels={**self._labels, "reason": value})
                self._finished[value] = metric
            metric.increment(1)

    def update(self, stats: dict) -> None:
        """Copy the engine's stats (see TorchEngine.stats) into the gauges and counters."""
        if not self.enabled:
            return
        for key, gauge in self.gauges.items():
            if key in stats:
                gauge.set(float(stats[key]))
        for key, counter in self.counters.items():
            if key in stats:
                delta = stats[key] - self._last[key]
                if delta > 0:
                    counter.increment(float(delta))
                    self._last[key] = stats[key]

    def close(self) -> None:
        """Drops every metric, then its family, while the stub can still tell the server.

        Left to the interpreter's exit, their destructors run after the stub's
        connection to tritonserver is gone, and the stub crashes on its way out.
        """
        if not self.enabled:
            return
        self.gauges.clear()
        self.counters.clear()
        self._finished.clear()
        self.ttft = self.itl = None
        self._finished_family = None
        self._families.clear()
