"""A/B traffic split: route requests between versions of one model by weight.

>>> from trillm_client.ab import TrafficSplit
>>> with TrafficSplit({"1": 0.9, "2": 0.1}, model="tensorrt_llm_bls", seed=7) as split:
...     version, completion = split.generate("Hello", max_tokens=16)
...     print(split.report())

Each request goes to one version, pinned (so the server cannot substitute
another), picked at random in proportion to the weights. With a ``seed`` the
sequence of picks is the same on every run (with several threads, which
request gets which pick depends on their timing). :meth:`TrafficSplit.stats`
keeps, per version, the requests, the errors by type and the latencies.

Side by side means both versions loaded at once: ``tensorrt_llm_bls`` can
(version policy ``all``, or ``specific`` with both); ``ensemble`` serves one
version at a time (docs/versions.md).
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from trillm_client.client import Client
from trillm_client.completion import Completion
from trillm_client.errors import TrillmError


@dataclass
class VersionStats:
    """What one version did: requests sent, errors by type, latency of each success (seconds)."""

    version: str
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.error_count / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the latencies (nearest rank), None without any."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.latencies) if self.latencies else None


def check_weights(weights: Mapping[str | int, float]) -> dict[str, float]:
    """The weights by version string; ValueError naming what is wrong."""
    if not weights:
        raise ValueError("weights: give at least one version, e.g. {'1': 0.9, '2': 0.1}")
    out = {}
    for version, weight in weights.items():
        name = str(version)
        if not name.isdigit() or int(name) < 1:
            raise ValueError(f"weights: version must be a positive integer, got {version!r}")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights: version {name}'s weight must be a finite number >= 0, got {weight!r}")
        out[name] = float(weight)
    if sum(out.values()) <= 0:
        raise ValueError("weights: at least one weight must be > 0")
    return out


def parse_split(text: str) -> dict[str, float]:
    """``"1=90,2=10"`` as weights."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        version, sep, weight = part.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[version.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"split: expected VERSION=WEIGHT[,VERSION=WEIGHT...], got {text!r}") from None
    return check_weights(weights)


class TrafficSplit:
    """Sends each request to one version of ``model``, chosen by weight.

    ``url``, ``protocol``, ``model``, ``timeout`` and ``validate`` are those of
    :class:`~trillm_client.Client`; ``make_client(version)`` replaces how the
    per-version clients are made (tests use it). Safe to share between threads.
    """

    def __init__(
        self,
        weights: Mapping[str | int, float],
        url: str | None = None,
        protocol: str = "grpc",
        model: str = "tensorrt_llm_bls",
        seed: int | None = None,
        timeout: float | None = 60.0,
        validate: bool = True,
        make_client: Callable[[str], Any] | None = None,
    ) -> None:
        self.weights = check_weights(weights)
        self._versions = list(self.weights)
        self._cumulative = []
        total = 0.0
        for version in self._versions:
            total += self.weights[version]
            self._cumulative.append(total)
        self._last = max(i for i, v in enumerate(self._versions) if self.weights[v] > 0)
        self._random = random.Random(seed)
        make = make_client or (
            lambda version: Client(url, protocol=protocol, model=model, version=version, timeout=timeout,
                                   validate=validate)
        )
        self._clients = {v: make(v) for v in self._versions if self.weights[v] > 0}
        self._stats = {v: VersionStats(v) for v in self._versions}
        self._lock = threading.Lock()

    def choose(self) -> str:
        """The version for the next request (never one of weight 0)."""
        with self._lock:
            point = self._random.random() * self._cumulative[-1]
        index = bisect.bisect_right(self._cumulative, point)
        return self._versions[min(index, self._last)]

    def generate(self, prompt: str, max_tokens: int, **sampling: Any) -> tuple[str, Completion]:
        """``Client.generate`` on the chosen version; returns it with the completion.

        A :class:`TrillmError` is counted against the version, then raised.
        """
        version = self.choose()
        started = time.perf_counter()
        try:
            completion = self._clients[version].generate(prompt, max_tokens, **sampling)
        except TrillmError as exc:
            self._record(version, error=type(exc).__name__)
            raise
        self._record(version, latency=time.perf_counter() - started)
        return version, completion

    def generate_many(
        self, prompts: Sequence[str], max_tokens: int, concurrency: int = 4, **sampling: Any
    ) -> list[tuple[str, Completion] | TrillmError]:
        """:meth:`generate` for every prompt, ``concurrency`` at a time; a failed slot holds its error."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")

        def one(prompt: str) -> tuple[str, Completion] | TrillmError:
            try:
                return self.generate(prompt, max_tokens, **sampling)
            except TrillmError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="trillm-ab") as pool:
            return list(pool.map(one, prompts))

    def _record(self, version: str, latency: float | None = None, error: str | None = None) -> None:
        with self._lock:
            stats = self._stats[version]
            stats.requests += 1
            if error is not None:
                stats.errors[error] += 1
            if latency is not None:
                stats.latencies.append(latency)

    def stats(self) -> dict[str, VersionStats]:
        """A snapshot of every version's statistics."""
        with self._lock:
            return {
                v: VersionStats(v, s.requests, Counter(s.errors), list(s.latencies)) for v, s in self._stats.items()
            }

    def report(self) -> str:
        """The statistics as a table (latencies in milliseconds)."""
        ms = lambda x: "-" if x is None else f"{x * 1000:.0f}"  # noqa: E731
        rows = [("VERSION", "WEIGHT", "REQUESTS", "ERRORS", "MEAN MS", "P50 MS", "P95 MS")]
        total = sum(self.weights.values())
        for version, s in self.stats().items():
            rows.append((version, f"{self.weights[version] / total:.0%}", str(s.requests), str(s.error_count),
                         ms(s.mean), ms(s.quantile(0.5)), ms(s.quantile(0.95))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> TrafficSplit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
