"""Delivering one HTTP request body, with retries and a circuit breaker (Loki, remote write).

- ``RetryPolicy``: connection errors, timeouts, 429 and 5xx are retried with capped
  exponential backoff and jitter; every other status is permanent.
- ``CircuitBreaker``: after ``failures`` failed tries in a row the breaker opens and
  no request is tried for ``cooldown_s``; then one probe is let through
  (half-open), and its outcome closes or reopens the breaker. While it is open
  the request waits (it is not dropped), so a sink catches up, in order, after an
  outage.
- ``Delivery.deliver``: post with retries; a delivered, rejected or abandoned
  request is counted (``sink_sent``, ``sink_errors``, ``dropped``) with its reason.
  Error response bodies are read with a size cap.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import httpx

from pipeline.selfmetrics import SelfMetrics

log = logging.getLogger("telepipe")

MAX_ERROR_BODY_BYTES = 64 * 1024


class RetryPolicy:
    """Which answers to retry, and how long to wait before try ``attempt + 1``."""

    def __init__(self, min_ms: int, max_ms: int, rng: random.Random | None = None) -> None:
        self.min_ms = min_ms
        self.max_ms = max_ms
        # Unseeded by default so that replicas do not retry in lockstep; tests inject a seeded one.
        self.rng = rng or random.Random()

    @staticmethod
    def retryable(status: int | None) -> bool:
        """None (connection error, timeout), 429 and 5xx are retried; anything else is permanent."""
        return status is None or status == 429 or 500 <= status <= 599

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try ``attempt`` (0-based).

        Uniform in [min, min * 2^attempt capped at max]: the floor keeps tries at
        least ``min`` apart, the jitter spreads clients that failed together.
        """
        cap = min(self.max_ms, self.min_ms * 2 ** min(attempt, 62))
        return self.rng.uniform(self.min_ms, cap) / 1000.0


class CircuitBreaker:
    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.run = 0  # failed tries in a row
        self.opened_at: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() >= self.opened_at + self.cooldown_s else "open"

    def wait(self) -> float:
        """Seconds until a try is allowed (0: now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def record(self, ok: bool) -> None:
        if ok:
            self.run, self.opened_at = 0, None
            return
        self.run += 1
        if self.opened_at is not None or self.run >= self.failures:
            self.opened_at = self.clock()  # open, or reopen after a failed probe


class Delivery:
    def __init__(
        self,
        sink: str,
        http: httpx.Client,
        url: httpx.URL | str,
        policy: RetryPolicy,
        metrics: SelfMetrics,
        max_retries: int,
        sleep: Callable[[float], object],
        stop: threading.Event,
        breaker: CircuitBreaker,
    ) -> None:
        self.sink, self.http, self.url, self.policy = sink, http, url, policy
        self.metrics, self.max_retries, self.sleep, self.stop = metrics, max_retries, sleep, stop
        self.breaker = breaker

    def deliver(self, body: bytes, items: int) -> bool:
        """Send one request body carrying ``items`` items; True when it was accepted."""
        attempt = 0
        while True:
            wait = self.breaker.wait()
            if wait > 0 and not self.stop.is_set():
                self.sleep(wait)  # breaker open: hold the request, do not hammer the sink
            if self.stop.is_set() and attempt:
                self.metrics.dropped(f"{self.sink}_closed", items, detail="retrying at close")
                return False
            status, reason, detail = self.post(body)
            ok = status is not None and 200 <= status < 300
            self.breaker.record(ok or (status is not None and not self.policy.retryable(status)))
            if ok:
                self.metrics.inc("sink_sent", items, self.sink)
                return True
            self.metrics.inc("sink_errors", 1, self.sink, reason)
            if not self.policy.retryable(status):
                # A 4xx may mean part of the request was kept; we cannot tell which part.
                self.metrics.dropped(f"{self.sink}_rejected_{status}", items, detail=detail)
                return False
            if attempt >= self.max_retries:
                self.metrics.dropped(f"{self.sink}_retries_exhausted", items, detail=f"{reason}: {detail}")
                return False
            if not self.stop.is_set():
                self.sleep(self.policy.backoff(attempt))
            if self.stop.is_set():
                self.metrics.dropped(f"{self.sink}_closed", items, detail=f"retrying at close: {reason}")
                return False
            attempt += 1

    def post(self, body: bytes) -> tuple[int | None, str, str]:
        """(status or None, error reason label, capped response body or error text)."""
        try:
            with self.http.stream("POST", self.url, content=body) as resp:
                if resp.is_success:
                    return resp.status_code, "", ""
                raw = bytearray()
                try:
                    for chunk in resp.iter_raw():
                        raw += chunk[: MAX_ERROR_BODY_BYTES - len(raw)]
                        if len(raw) >= MAX_ERROR_BODY_BYTES:
                            break
                except httpx.StreamConsumed:  # an in-memory response (tests' MockTransport)
                    raw = bytearray(resp.content[:MAX_ERROR_BODY_BYTES])
                return resp.status_code, f"http_{resp.status_code}", raw.decode(errors="replace").strip()
        except httpx.TimeoutException as exc:
            return None, "timeout", f"{type(exc).__name__}: {exc}"
        except httpx.TransportError as exc:
            return None, "connection", f"{type(exc).__name__}: {exc}"
