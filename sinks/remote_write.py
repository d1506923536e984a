"""Prometheus remote write 1.0: window results and scaling signals as samples.

Each closed window becomes samples at its end time (ms), one per series:

- ``telepipe_window_calls``, ``telepipe_window_errors``
  {service_name, span_name, span_kind}
- ``telepipe_window_latency_seconds`` {..., quantile} (0.5, 0.9, 0.95, 0.99, 1 = max)
- ``telepipe_desired_replicas``, ``telepipe_observed_replicas`` {service_name}

Every value is a function of its window alone, so a window re-emitted after a
crash produces identical samples (Prometheus accepts an identical duplicate;
if newer samples of that series already arrived, it answers 400 out-of-order,
which is counted as ``remote_write_rejected_400`` and not retried). When a
series ends (no sample for ``stale_after_s`` of event time) it gets a stale
marker. The body is the snappy *block* encoding of a hand-encoded
``WriteRequest`` protobuf; labels sorted by name, samples of a series in time
order, requests sent one at a time in order through ``sinks/delivery``.

Nothing unexpected stops it, as it runs for months: an exception in the sender
thread costs the request it hit, never the thread (which would leave every later
request to be dropped as queue-full); in the dataflow's ``write_batch`` it costs
the item it hit, and a series that cannot be encoded costs that series' samples in
that request. All of these are counted as ``remote_write_internal_error``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

import cramjam
import httpx
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from pipeline.config import RemoteWriteConfig
from pipeline.model import SPAN_KINDS, ScalingUpdate, WindowResult
from pipeline.selfmetrics import SelfMetrics
from pipeline.threads import PAUSE_AFTER_ERROR_S, survive
from sinks.delivery import CircuitBreaker, Delivery, RetryPolicy

log = logging.getLogger("telepipe")

STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.95", "p95"), ("0.99", "p99"), ("1", "max"))

Labels = tuple[tuple[str, str], ...]  # sorted by name, __name__ included

THREAD = "remote-write"  # the sender thread's name, and its thread_errors label
_FAILED = object()  # survive()'s answer when the sender's wait for a request raised


# --- encoding (pure) ------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_series(labels: Labels, samples: list[tuple[int, float]]) -> bytes:
    """One series -> a WriteRequest's ``timeseries`` field (samples in time order)."""
    ts = bytearray()
    for name, value in labels:
        ts += _field(1, _field(1, name.encode()) + _field(2, value.encode()))
    for t, v in sorted(samples, key=lambda s: s[0]):
        # Sample{double value = 1; int64 timestamp = 2;}
        ts += _field(2, b"\x09" + struct.pack("<d", v) + b"\x10" + _varint(t & 0xFFFFFFFFFFFFFFFF))
    return _field(1, bytes(ts))


def compress(fields: list[bytes]) -> bytes:
    """Encoded series -> the snappy-compressed WriteRequest body."""
    return bytes(cramjam.snappy.compress_raw(b"".join(fields)))


def encode_write_request(series: list[tuple[Labels, list[tuple[int, float]]]]) -> bytes:
    """[(labels, [(timestamp ms, value)])] -> snappy-compressed WriteRequest."""
    return compress([encode_series(labels, samples) for labels, samples in series])


def labels_of(name: str, **labels: str) -> Labels:
    items = [("__name__", name)] + [(k, v) for k, v in labels.items() if v != ""]
    return tuple(sorted(items))


def samples_of(item) -> list[tuple[Labels, int, float]]:
    """One window result or scaling update -> (labels, timestamp ms, value) samples."""
    out = []
    if isinstance(item, WindowResult):
        t = item.window_end // 1_000_000
        kind = SPAN_KINDS[item.span_kind] if 0 <= item.span_kind < len(SPAN_KINDS) else str(item.span_kind)
        base = {"service_name": item.service, "span_name": item.operation, "span_kind": kind}
        out.append((labels_of("telepipe_window_calls", **base), t, float(item.count)))
        out.append((labels_of("telepipe_window_errors", **base), t, float(item.errors)))
        for q, attr in QUANTILES:
            out.append((labels_of("telepipe_window_latency_seconds", **base, quantile=q), t, getattr(item, attr)))
    elif isinstance(item, ScalingUpdate):
        t = item.time // 1_000_000
        out.append((labels_of("telepipe_desired_replicas", service_name=item.service), t, float(item.desired)))
        out.append((labels_of("telepipe_observed_replicas", service_name=item.service), t, float(item.observed)))
    return out


# --- client ---------------------------------------------------------------------------


class RemoteWriteClient:
    """Batches samples into WriteRequests and sends them, one at a time, in order.

    ``push`` never blocks: at most ``queue_max_batches`` requests wait; beyond that the
    oldest is dropped (``remote_write_queue_full``).
    """

    def __init__(
        self,
        cfg: RemoteWriteConfig,
        metrics: SelfMetrics,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._stop = threading.Event()
        headers = {
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": "telepipe",
        }
        self._http = httpx.Client(transport=transport, timeout=cfg.timeout_s, headers=headers)
        self._delivery = Delivery(
            "remote_write", self._http, cfg.url, RetryPolicy(cfg.retry_min_ms, cfg.retry_max_ms), metrics,
            cfg.max_retries, self._stop.wait, self._stop, CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s, clock),
        )  # fmt: skip
        self._cond = threading.Condition()
        self._pending: deque[tuple[bytes, int]] = deque()
        self._open: dict[Labels, list[tuple[int, float]]] = {}
        self._open_samples = 0
        self._open_at = 0.0
        self._clock = clock
        self._busy = False
        self._last: dict[Labels, int] = {}  # series -> newest sample time (ms), for stale markers
        self._newest = 0
        self._thread = threading.Thread(target=self._run, name="remote-write", daemon=True)
        self._thread.start()

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
        with self._cond:
            for labels, t, v in samples:
                self._add(labels, t, v)
                self._last[labels] = max(self._last.get(labels, 0), t)
                self._newest = max(self._newest, t)
            self._mark_stale()
            if self._open_samples >= self.cfg.batch_max_samples:
                self._seal()
            self._cond.notify_all()

    def _add(self, labels: Labels, t: int, v: float) -> None:
        if not self._open_samples:
            self._open_at = self._clock()
        self._open.setdefault(labels, []).append((t, v))
        self._open_samples += 1

    def _mark_stale(self) -> None:
        horizon = self._newest - int(self.cfg.stale_after_s * 1000)
        for labels in [k for k, t in self._last.items() if t < horizon]:
            self._add(labels, self._last.pop(labels) + 1, STALE_NAN)

    def _seal(self) -> None:
        """Turn the open samples into a pending request, dropping the oldest if full.

        Never raises (the dataflow, flush() and the sender all seal). The open samples
        are taken out first, and a series that cannot be encoded is dropped alone
        (``remote_write_internal_error``), so one bad series fails neither the rest of
        its request nor every later seal.
        """
        if not self._open_samples:
            return
        series, n = self._open, self._open_samples
        self._open, self._open_samples = {}, 0
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
        if not fields:
            return
        self._pending.append((compress(fields), n))
        while len(self._pending) > self.cfg.queue_max_batches:
            _, n = self._pending.popleft()
            self.metrics.dropped("remote_write_queue_full", n, detail=f"{len(self._pending)} requests waiting")

    def flush(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._seal()
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        done = self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(1.0)
        self._http.close()
        return done

    def _run(self) -> None:
        """Send requests in order until closed and drained.

        Nothing in an iteration can end the thread: an unexpected exception is logged
        with its traceback and counted in ``thread_errors{thread="remote-write"}``;
        when it hit a request, that request's samples are dropped as
        ``remote_write_internal_error`` and the next one is sent.
        """
        while True:
            taken = survive(THREAD, self.metrics, self._take, default=_FAILED)
            if taken is _FAILED:
                if self._stop.is_set():
                    return  # closing, and taking the next request fails (logged, counted): do not spin
                self._stop.wait(PAUSE_AFTER_ERROR_S)  # whatever failed must not spin either
                continue
            if taken is None:
                return
            body, n = taken
            try:
                self._delivery.deliver(body, n)
            except Exception as exc:  # the thread must live on: count the request, go on with the next
                log.exception("%s: unexpected error (carrying on)", THREAD)
                self.metrics.inc("thread_errors", 1, THREAD)
                self.metrics.dropped("remote_write_internal_error", n, detail=repr(exc))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take(self) -> tuple[bytes, int] | None:
        """The next request (body, samples), waiting for one and sealing by age; None once closed and drained."""
        with self._cond:
            while not self._pending and not self._stop.is_set():
                if self._open_samples:
                    wait = self._open_at + self.cfg.batch_max_wait_ms / 1000 - self._clock()
                    if wait <= 0:
                        self._seal()
                        continue
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            if self._stop.is_set() and not self._pending:
                return None
            taken = self._pending.popleft()
            self._busy = True
            return taken


class _Partition(StatelessSinkPartition):
    def __init__(self, client: RemoteWriteClient) -> None:
        self.client = client

    def write_batch(self, items: list) -> None:
        """Runs in the dataflow, which an exception would stop. ``push`` already drops a bad
        item alone; anything else unexpected costs this batch's items (counted as
        ``remote_write_internal_error``), and the dataflow carries on."""
        try:
            self.client.push(items)
        except Exception as exc:
            log.exception("%s: could not take %d items (dropped, the dataflow carries on)", THREAD, len(items))
            self.client.metrics.dropped("remote_write_internal_error", len(items), detail=repr(exc))


class RemoteWriteSink(DynamicSink):
    """bytewax output feeding window results and scaling updates to one client per process."""

    def __init__(self, client: RemoteWriteClient) -> None:
        self.client = client

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(self.client)

