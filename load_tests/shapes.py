"""Load shapes, as pure functions of time (the Locust shape class in
``locustfile.py`` only calls them), and the arrival schedule of the
constant-request-rate shape.

- ``constant``: ``users`` users from the start (spawned at ``spawn_rate``/s).
- ``step``: ``step_users`` more users every ``step_time`` seconds up to
  ``users``, then held.
- ``rate``: ``users`` users form a pool that sends requests at
  ``request_rate`` requests/s in total (Poisson or evenly spaced arrivals),
  independent of how fast responses come back, as long as a user is free.

Every shape ends at ``run_time`` seconds; without one only ``step`` ends by
itself (one ``step_time`` after reaching ``users``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np


def shape_target(
    shape: str,
    elapsed: float,
    *,
    users: int,
    spawn_rate: float,
    run_time: float | None,
    step_users: int = 1,
    step_time: float = 10.0,
) -> tuple[int, float] | None:
    """(users, spawn rate) the test should have ``elapsed`` seconds in, or None to stop."""
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if run_time and elapsed >= run_time:
        return None
    if shape in ("constant", "rate"):
        return users, spawn_rate
    if shape != "step":
        raise ValueError(f"unknown shape {shape!r}")
    if step_users < 1 or step_time <= 0:
        raise ValueError("step shape: step_users must be >= 1 and step_time > 0")
    steps = math.ceil(users / step_users)
    if not run_time and elapsed >= steps * step_time:
        return None
    current = min(users, step_users * (1 + int(elapsed // step_time)))
    return current, spawn_rate


class ArrivalSchedule:
    """When each request of a constant-rate run is due.

    ``claim()`` hands out the next send time (``clock`` seconds). Arrivals are
    evenly spaced or Poisson (exponential gaps, seeded). A free user claims
    the next slot and sleeps until it; when every user is busy, slots are
    claimed late and the lag is reported, so a pool too small for the rate
    shows up as lag (and an achieved rate below the target), not silently.
    """

    def __init__(
        self, rate: float, arrival: str = "poisson", seed: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"request rate must be > 0, got {rate}")
        if arrival not in ("poisson", "uniform"):
            raise ValueError(f"arrival must be poisson or uniform, got {arrival!r}")
        self.rate = rate
        self.arrival = arrival
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._next: float | None = None

    def _gap(self) -> float:
        if self.arrival == "uniform":
            return 1.0 / self.rate
        return float(self._rng.exponential(1.0 / self.rate))

    def claim(self) -> float:
        """The due time of the next request (no I/O inside: atomic between greenlets)."""
        if self._next is None:
            self._next = self._clock()
        due = self._next
        self._next += self._gap()
        return due
