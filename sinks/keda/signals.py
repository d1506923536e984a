"""The scaling signal of every service, gathered on the one process that serves KEDA.

Per-service state (windows, detectors, scalers) is spread over all processes of
a cluster by bytewax; KEDA asks one address. The dataflow therefore keys every
``ScalingUpdate`` to a single output partition, ``SignalsSink`` (``sink.py``), which only the
KEDA process lists (``owner``): bytewax routes the whole stream there, and the
partition keeps the newest signal per service in a ``ScalingSignals`` board that
the KEDA server reads. With one process it is simply that process.

Nothing here needs recovery state: after a restart the board fills again as
windows close, and KEDA is told NOT_FOUND for a service until then.

A service is kept only while its signal is fresh: one not updated for
``stale_after_s`` (processing time: the board's clock, not window time) is
gone, and KEDA is told NOT_FOUND for it, as after a restart. Without this the
board would keep every service name it ever saw for the life of the process,
and answer for a service that sends nothing any more with its last signal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from pipeline.model import ScalingUpdate, ServiceExpired

SWEEP_EVERY_S = 1.0  # update() runs per batch; a full sweep each time would cost O(services) per batch


class ScalingSignals:
    """service -> (desired replicas, SERVER calls per second) of its newest window. Thread-safe.

    An entry not updated for ``stale_after_s`` of ``clock`` is gone: ``lookup`` no longer returns it, and
    ``update`` sweeps such entries out (at most once per ``SWEEP_EVERY_S``).
    """

    def __init__(self, stale_after_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}")
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, float, float]] = {}  # service -> (desired, rate, updated at)
        self._swept_at = -float("inf")

    def update(self, items: Iterable) -> None:
        """Takes the ``ScalingUpdate``s among ``items``; a ``ServiceExpired`` forgets its service
        (others are ignored)."""
        with self._lock:
            now = self._clock()
            for u in items:
                if isinstance(u, ScalingUpdate):
                    self._latest[u.service] = (u.desired, u.call_rate, now)
                elif isinstance(u, ServiceExpired):
                    self._latest.pop(u.service, None)
            if now - self._swept_at >= SWEEP_EVERY_S:
                self._swept_at = now
                stale = [s for s, (_, _, at) in self._latest.items() if now - at >= self.stale_after_s]
                for service in stale:
                    del self._latest[service]

    def lookup(self, service: str) -> tuple[int, float] | None:
        with self._lock:
            found = self._latest.get(service)
            if found is None:
                return None
            desired, rate, at = found
            if self._clock() - at >= self.stale_after_s:  # between sweeps, or no update() at all any more
                del self._latest[service]
                return None
            return desired, rate

    def forget(self, service: str) -> None:
        """Remove ``service`` now (KEDA is told NOT_FOUND until a new update arrives); unknown is fine."""
        with self._lock:
            self._latest.pop(service, None)
