"""The remote-write client: samples batched into WriteRequests, sent one at a time, in order.

Requests are built and queued by ``sinks/delivery`` (bounded queue, one guarded sender
thread: ``push`` never blocks); this client keeps, per series, the time of its newest
sample, so that a series that ended (no sample for ``stale_after_s`` of event time)
gets a stale marker, and encodes each request in the sender thread. A series that
cannot be encoded costs only its own samples (``remote_write_internal_error``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import httpx

from pipeline.config import RemoteWriteConfig
from pipeline.selfmetrics import SelfMetrics
from sinks.delivery import BatchQueue, CircuitBreaker, Delivery, RetryPolicy
from sinks.remote_write.encoder import STALE_NAN, Labels, compress, encode_series, samples_of

log = logging.getLogger("telepipe")

THREAD = "remote-write"  # the sender thread's name, and its thread_errors label


class _Request:
    """A WriteRequest being built: samples per series."""

    def __init__(self) -> None:
        self.series: dict[Labels, list[tuple[int, float]]] = {}
        self.items = 0  # samples

    def add(self, labels: Labels, t: int, v: float) -> None:
        self.series.setdefault(labels, []).append((t, v))
        self.items += 1

    def sealed(self) -> dict[Labels, list[tuple[int, float]]]:
        return self.series


class RemoteWriteClient:
    """``push`` adds window results' and scaling updates' samples; at most ``queue_max_batches``
    requests wait (beyond that the oldest is dropped, ``remote_write_queue_full``)."""

    def __init__(
        self,
        cfg: RemoteWriteConfig,
        metrics: SelfMetrics,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        stop = threading.Event()
        headers = {
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": "telepipe",
        }
        self._http = httpx.Client(transport=transport, timeout=cfg.timeout_s, headers=headers)
        self._delivery = Delivery(
            "remote_write", self._http, cfg.url, RetryPolicy(cfg.retry_min_ms, cfg.retry_max_ms), metrics,
            cfg.max_retries, stop.wait, stop, CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s, clock),
        )  # fmt: skip
        self._last: dict[Labels, int] = {}  # series -> newest sample time (ms), for stale markers
        self._newest = 0
        self.queue: BatchQueue[_Request] = BatchQueue(
            "remote_write", metrics, new_request=_Request, send=self._send, max_requests=cfg.queue_max_batches,
            max_wait_s=cfg.batch_max_wait_ms / 1000, stop=stop, thread=THREAD, clock=clock,
        )  # fmt: skip

    def push(self, items: list) -> None:
        """Add the items' samples to the request being built (sealed by count here, by age in the sender).

        This runs in the dataflow: an item whose samples cannot be made (a bug upstream)
        is dropped alone, counted as one ``remote_write_internal_error``, and the
        others still go.
        """
        samples: list[tuple[Labels, int, float]] = []
        for item in items:
            try:
                # int() and float() here, so that a bad value costs its own item, not the request it would join.
                samples += [(labels, int(t), float(v)) for labels, t, v in samples_of(item)]
            except Exception as exc:
                log.exception("%s: could not make samples of a %s (dropped)", THREAD, type(item).__name__)
                detail = f"a {type(item).__name__} whose samples could not be made: {exc!r}"
                self.metrics.dropped("remote_write_internal_error", 1, detail=detail)
        if not samples:
            return

        def fill(queue: BatchQueue[_Request]) -> None:
            req = queue.building
            for labels, t, v in samples:
                req.add(labels, t, v)
                self._last[labels] = max(self._last.get(labels, 0), t)
                self._newest = max(self._newest, t)
            horizon = self._newest - int(self.cfg.stale_after_s * 1000)
            for labels in [k for k, t in self._last.items() if t < horizon]:
                req.add(labels, self._last.pop(labels) + 1, STALE_NAN)  # the series ended
            if req.items >= self.cfg.batch_max_samples:
                queue.seal()

        if not self.queue.add(fill):
            self.metrics.dropped("remote_write_closed", len(samples), detail="push after close")

    def flush(self, timeout: float | None = None) -> bool:
        return self.queue.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        done = self.queue.close(timeout)
        if not self.queue.sender_alive():
            self._http.close()
        return done

    def _send(self, series: dict[Labels, list[tuple[int, float]]], n: int) -> None:
        """Encode and deliver one request; a series that cannot be encoded is dropped alone."""
        fields: list[bytes] = []
        failed: list[tuple[Labels, int, Exception]] = []
        for labels, samples in series.items():
            try:
                fields.append(encode_series(labels, samples))
            except Exception as exc:
                if not failed:  # one traceback per request is enough
                    log.exception("%s: could not encode series %s (dropped)", THREAD, labels)
                failed.append((labels, len(samples), exc))
        if failed:
            lost = sum(k for _, k, _ in failed)
            n -= lost
            detail = f"{len(failed)} series not encoded, first {dict(failed[0][0])}: {failed[0][2]!r}"
            self.metrics.dropped("remote_write_internal_error", lost, detail=detail)
        if fields:
            self._delivery.deliver(compress(fields), n)
