"""Grafana Loki sink: log batches -> gzip JSON push requests.

Shaped like Vector's loki sink, one straight pipeline:
``encode_streams`` (pure) -> batch by size and age -> ``encode_push`` (pure)
-> send in order with ``RetryPolicy``. Labels stay few and low-cardinality
(``service``, ``level``); trace and span ids go into structured metadata.
Every line that is not delivered is counted through ``metrics.dropped``.

It runs for months, so nothing grows without bound and nothing unexpected stops it:
the label sets counted toward ``max_streams`` are forgotten after ``stream_idle_s``
unused (services come and go); an unexpected exception in the sender thread costs
the request it hit, and one in the dataflow's ``write_batch`` the item it hit
(``loki_internal_error``), never the thread or the dataflow.
"""

from __future__ import annotations

import gzip
import logging
import random
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from pipeline.config import ConfigError, LokiConfig
from pipeline.model import LogBatch
from pipeline.selfmetrics import SelfMetrics
from pipeline.threads import PAUSE_AFTER_ERROR_S, survive
from sinks.delivery import CircuitBreaker, Delivery, RetryPolicy

log = logging.getLogger("telepipe")

PUSH_PATH = "/loki/api/v1/push"
MAX_LABEL_VALUE_BYTES = 2048  # Loki's default validation limit
CLOSE_GRACE_S = 1.0  # close() waits this long for the sender after a timed-out flush
UNKNOWN_SERVICE = "unknown_service"  # OTel's name for a missing service.name
_STREAM_OVERHEAD = 64  # JSON bytes around one stream's labels and values
STREAM_SWEEP_INTERVAL_S = 1.0  # idle label sets are looked for at most this often (and when the limit is hit)
OVERFLOW_SERVICE = "__overflow__"
SENDER_THREAD = "loki-sender"
_FAILED = object()  # survive()'s answer when the sender's wait for a request raised

# OTLP severity number 1..24, four per level.
_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
_TEXT_LEVELS = {
    **{name: name for name in _LEVELS},
    "information": "info",
    "notice": "info",
    "warning": "warn",
    "err": "error",
    "critical": "fatal",
    "crit": "fatal",
    "alert": "fatal",
    "emerg": "fatal",
    "emergency": "fatal",
    "panic": "fatal",
}
_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_]")


# --- encoder (pure) ---------------------------------------------------------------


def _cut_utf8(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary."""
    if len(text) * 4 <= limit:  # cannot be over: skip the encode
        return text, False
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode(errors="ignore"), True


def level_of(severity: int, severity_text: str) -> str:
    """OTLP severity number (or, when 0, the severity text) -> level label."""
    if 1 <= severity <= 24:
        return _LEVELS[(severity - 1) // 4]
    # Text like "INFO", "Warning" or OTel's short names with a digit ("ERROR2").
    return _TEXT_LEVELS.get(severity_text.strip().lower().rstrip("0123456789"), "unknown")


def metadata_key(key: str) -> str:
    """An attribute key as a structured metadata name: ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    key = _BAD_KEY_CHARS.sub("_", key)
    return key if key and not key[0].isdigit() else f"_{key}"


def encode_streams(
    batch: LogBatch, max_line_bytes: int, *, metrics: SelfMetrics | None = None
) -> list[dict]:
    """One Loki stream per (service, level), entries sorted by time (stable).

    Each value is ``[unix ns as str, line]`` plus a structured metadata dict
    when there is any. Lines over ``max_line_bytes`` are truncated (counted as
    ``loki_line_truncated`` when ``metrics`` is given).
    """
    groups: dict[tuple[str, str], list[tuple[int, list]]] = {}
    truncated = 0
    attributes = batch.attributes
    for i in range(len(batch)):
        line, cut = _cut_utf8(batch.body[i], max_line_bytes)
        truncated += cut
        service, _ = _cut_utf8(batch.service[i] or UNKNOWN_SERVICE, MAX_LABEL_VALUE_BYTES)
        level = level_of(int(batch.severity[i]), batch.severity_text[i])
        meta = {metadata_key(k): str(v) for k, v in attributes[i].items()} if i < len(attributes) else {}
        # Our own fields win over an attribute that sanitizes to the same name.
        for key, value in (
            ("trace_id", batch.trace_id[i]),
            ("span_id", batch.span_id[i]),
            ("service_instance_id", batch.instance[i]),
        ):
            if value:
                meta[key] = value
        ts = max(int(batch.time_ns[i]), 0)  # uint64 garbage shows up negative
        value = [str(ts), line, meta] if meta else [str(ts), line]
        groups.setdefault((service, level), []).append((ts, value))
    if truncated and metrics is not None:
        metrics.dropped("loki_line_truncated", truncated, detail=f"lines cut to {max_line_bytes} bytes")
    streams = []
    for (service, level), entries in groups.items():
        entries.sort(key=lambda e: e[0])
        streams.append({"stream": {"service": service, "level": level}, "values": [v for _, v in entries]})
    return streams


def encode_push(streams: list[dict]) -> bytes:
    """Streams -> the gzip-compressed JSON push body."""
    return gzip.compress(orjson.dumps({"streams": streams}), compresslevel=6, mtime=0)


def encode_events(events: list, source: str = "telepipe") -> list[dict]:
    """telepipe's own events (alerts, scaling changes) -> streams labelled source, kind, service.

    The line is the event's JSON (as ``--emit-jsonl`` writes it); its time is the
    event time of the window that caused it.
    """
    groups: dict[tuple, list[tuple[int, list]]] = {}
    for e in events:
        doc = e.to_json()
        service, _ = _cut_utf8(doc.get("service") or UNKNOWN_SERVICE, MAX_LABEL_VALUE_BYTES)
        labels = (("kind", doc["type"]), ("service", service), ("source", source))
        groups.setdefault(labels, []).append((int(doc["time"]), [str(int(doc["time"])), orjson.dumps(doc).decode()]))
    streams = []
    for labels, entries in groups.items():
        entries.sort(key=lambda e: e[0])
        streams.append({"stream": dict(labels), "values": [v for _, v in entries]})
    return streams


def _merge_sorted(groups: dict[tuple, list[list]]) -> list[dict]:
    """Accumulated values per label set -> streams, each sorted by time (stable)."""
    streams = []
    for labels, values in groups.items():
        values.sort(key=lambda v: int(v[0]))
        streams.append({"stream": dict(labels), "values": values})
    return streams


# --- client: bounded queue + one sender thread ------------------------------------


@dataclass
class _Request:
    seq: int
    streams: list[dict]
    lines: int


def push_url(url: str) -> httpx.URL:
    """The configured URL as is, or with Loki's push path when it has none."""
    if not url:
        raise ConfigError("loki.url: must be set to use the Loki sink")
    parsed = httpx.URL(url)
    return parsed if parsed.path not in ("", "/") else parsed.copy_with(path=PUSH_PATH)


class LokiClient:
    """Batches log streams into push requests and sends them, one at a time, in order.

    ``push`` never blocks on the network. At most ``cfg.queue_max_batches``
    sealed requests wait; beyond that the oldest is dropped (``loki_queue_full``).
    At most ``cfg.max_streams`` label sets are in use (see ``_stream_key``).
    """

    def __init__(
        self,
        cfg: LokiConfig,
        metrics: SelfMetrics,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.policy = RetryPolicy(cfg.retry_min_ms, cfg.retry_max_ms, rng)
        self.url = push_url(cfg.url)
        self._clock = clock
        self._stop = threading.Event()
        # Default sleep wakes up on close(), so a long backoff does not hold shutdown.
        self._sleep = sleep or self._stop.wait
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Accept-Encoding": "identity",  # keeps the capped error body readable
            "User-Agent": "telepipe",
        }
        if cfg.tenant:
            headers["X-Scope-OrgID"] = cfg.tenant
        self._http = httpx.Client(transport=transport, timeout=cfg.timeout_s, headers=headers)
        self._delivery = Delivery(
            "loki", self._http, self.url, self.policy, metrics, cfg.max_retries, self._sleep, self._stop,
            CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s, clock),
        )
        self._cond = threading.Condition()
        # Label sets in use, for the stream limit: label set -> last used (clock), least recently used first.
        self._streams: OrderedDict[tuple, float] = OrderedDict()
        self._next_stream_sweep = 0.0
        self._pending: deque[_Request] = deque()
        self._inflight: _Request | None = None
        self._seq = 0
        self._closed = False
        self._reset_open()
        self._thread = threading.Thread(target=self._run, name="loki-sender", daemon=True)
        self._thread.start()

    # -- producer side

    def push(self, batch: LogBatch) -> None:
        """Add a batch's lines to the request being built (sealed by size here, by age in the sender)."""
        if not len(batch):
            return
        self.push_streams(encode_streams(batch, self.cfg.max_line_bytes, metrics=self.metrics), len(batch))

    def push_events(self, events: list) -> None:
        """Add telepipe's own events (alerts, scaling changes), labelled source, kind, service."""
        if events:
            self.push_streams(encode_events(events), len(events))

    def push_streams(self, streams: list[dict], lines: int) -> None:
        with self._cond:
            if self._closed:
                self.metrics.dropped("loki_closed", lines, detail="push after close")
                return
            # Every line is serialized before any is added: a line that cannot be serialized makes
            # the push raise having added nothing, so the caller can count it dropped or push the
            # items one by one without sending a line twice.
            sizes = [[len(orjson.dumps(value)) + 1 for value in stream["values"]] for stream in streams]
            for stream, value_sizes in zip(streams, sizes, strict=True):
                key = self._stream_key(stream["stream"], len(stream["values"]))
                for value, size in zip(stream["values"], value_sizes, strict=True):
                    if self._open_lines and self._open_bytes + size > self.cfg.batch_max_bytes:
                        self._seal()
                    if key not in self._open:
                        size += sum(len(k) + len(v) for k, v in key) + _STREAM_OVERHEAD
                    if not self._open_lines:
                        self._open_at = self._clock()
                    self._open.setdefault(key, []).append(value)
                    self._open_lines += 1
                    self._open_bytes += size
            self._cond.notify_all()

    def _stream_key(self, labels: dict, lines: int) -> tuple:
        """Label set of a stream; while ``max_streams`` label sets are in use, a new one goes to
        an overflow stream (service "__overflow__"), counted in ``sink_overflow_lines``.

        A label set not used for ``stream_idle_s`` (by the injected clock) stops counting,
        so services that come and go over months do not fill the limit for good. Overflow
        label sets count too, as they are streams in Loki as well.
        """
        now = self._clock()
        key = tuple(sorted(labels.items()))
        new = key not in self._streams
        if now >= self._next_stream_sweep or (new and len(self._streams) >= self.cfg.max_streams):
            self._forget_idle_streams(now)
        if new and len(self._streams) >= self.cfg.max_streams:
            self.metrics.inc("sink_overflow_lines", lines, "loki")  # kept; only their labels change
            key = tuple(sorted({**labels, "service": OVERFLOW_SERVICE}.items()))
        self._streams[key] = now
        self._streams.move_to_end(key)
        return key

    def _forget_idle_streams(self, now: float) -> None:
        """Forget label sets unused for ``stream_idle_s``; they are the oldest, so this stops at
        the first one still in use (cheap enough to run whenever the limit is hit)."""
        self._next_stream_sweep = now + STREAM_SWEEP_INTERVAL_S
        horizon = now - self.cfg.stream_idle_s
        while self._streams and self._streams[next(iter(self._streams))] <= horizon:
            self._streams.popitem(last=False)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything pushed so far is sent or dropped; False on timeout."""
        with self._cond:
            self._seal()
            target = self._seq

            def done() -> bool:
                head = self._inflight or (self._pending[0] if self._pending else None)
                return head is None or head.seq > target

            return self._cond.wait_for(done, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; what is still unsent after ``timeout`` is dropped.

        Backoff sleeps end at once on close, so the sender normally stops (and has
        counted what it dropped) within ``CLOSE_GRACE_S`` after the flush.
        """
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(None if timeout is None else CLOSE_GRACE_S)
        if not self._thread.is_alive():
            self._http.close()
        return drained

    # -- queue (called with self._cond held)

    def _reset_open(self) -> None:
        self._open: dict[tuple, list[list]] = {}
        self._open_lines = 0
        self._open_bytes = 0
        self._open_at = 0.0

    def _seal(self) -> None:
        """Turn the request being built into a pending one, dropping the oldest if full.

        Never raises: a request that cannot be built is dropped (``loki_internal_error``).
        It is taken out of the open slot first, so it cannot fail every later seal too.
        """
        if not self._open_lines:
            return
        groups, lines = self._open, self._open_lines
        self._reset_open()
        try:
            streams = _merge_sorted(groups)
        except Exception as exc:  # the dataflow, flush() and the sender all seal: none may die of it
            log.exception("loki: could not build a request (dropped, carrying on)")
            self.metrics.dropped("loki_internal_error", lines, detail=f"building a request: {exc!r}")
            return
        self._seq += 1
        self._pending.append(_Request(self._seq, streams, lines))
        while len(self._pending) > self.cfg.queue_max_batches:
            old = self._pending.popleft()
            waiting = f"{len(self._pending)} requests waiting"
            self.metrics.dropped("loki_queue_full", old.lines, detail=waiting)
        self.metrics.set_gauge("loki_queue_batches", len(self._pending))
        self._cond.notify_all()

    def _next(self) -> _Request | None:
        """The next request to send, waiting for one; None when stopped."""
        while True:
            if self._stop.is_set():
                self._seal()
                for req in self._pending:
                    self.metrics.dropped("loki_closed", req.lines, detail="not sent before close")
                self._pending.clear()
                self.metrics.set_gauge("loki_queue_batches", 0)
                return None
            if self._pending:
                self._inflight = self._pending.popleft()
                self.metrics.set_gauge("loki_queue_batches", len(self._pending))
                return self._inflight
            if self._open_lines:
                wait = self._open_at + self.cfg.batch_max_wait_ms / 1000.0 - self._clock()
                if wait <= 0:
                    self._seal()
                    continue
                self._cond.wait(wait)
            else:
                self._cond.wait()

    # -- sender thread

    def _run(self) -> None:
        """Send requests in order until closed.

        Nothing in an iteration can end the thread (a dead sender would leave every later
        line to be dropped as queue-full): an unexpected exception is logged with its
        traceback and counted in ``thread_errors{thread="loki-sender"}``; when it hit a
        request, that request's lines are dropped as ``loki_internal_error``.
        """
        while True:
            req = survive(SENDER_THREAD, self.metrics, self._take, default=_FAILED)
            if req is _FAILED:
                if self._stop.is_set():
                    return  # even the drain at close failed (logged, counted): do not spin
                self._stop.wait(PAUSE_AFTER_ERROR_S)  # whatever failed must not spin either
                continue
            if req is None:
                return
            try:
                self._deliver(req)
            except Exception as exc:  # the thread must live on: count the request, go on with the next
                log.exception("%s: unexpected error (carrying on)", SENDER_THREAD)
                self.metrics.inc("thread_errors", 1, SENDER_THREAD)
                self.metrics.dropped("loki_internal_error", req.lines, detail=repr(exc))
            finally:
                with self._cond:
                    self._inflight = None
                    self._cond.notify_all()

    def _take(self) -> _Request | None:
        with self._cond:
            return self._next()

    def _deliver(self, req: _Request) -> None:
        self._delivery.deliver(encode_push(req.streams), req.lines)


# --- bytewax sink -------------------------------------------------------------------


class _LokiPartition(StatelessSinkPartition[LogBatch]):
    def __init__(self, sink: LokiSink) -> None:
        self.sink = sink
        self.client = sink._acquire()

    def write_batch(self, items: list) -> None:
        """Push the items. This runs in the dataflow, which an exception would stop: an item
        that cannot be pushed (a bug, a malformed batch) is dropped alone, as
        ``loki_internal_error``, and the others still go."""
        events = []
        for item in items:
            if isinstance(item, LogBatch):
                self._push(self.client.push, item, len(item))
            else:
                events.append(item)
        if not events:
            return
        try:
            self.client.push_events(events)
        except Exception:  # a failed push added nothing: find the bad events one by one
            for event in events:
                self._push(self.client.push_events, [event], 1)

    def _push(self, push: Callable[[Any], object], what: object, lines: int) -> None:
        try:
            push(what)
        except Exception as exc:
            log.exception("loki: could not take %d lines (dropped, the dataflow carries on)", lines)
            self.client.metrics.dropped("loki_internal_error", lines, detail=repr(exc))

    def close(self) -> None:
        self.sink._release()


class LokiSink(DynamicSink[LogBatch]):
    """Writes LogBatch items (and telepipe's events) to Loki through one ``LokiClient`` per process.

    Give it a client or a factory (called once, at the first ``build``). The
    client is closed (flushed, up to ``close_timeout_s``) when the last
    partition of this process closes.
    """

    def __init__(self, client: LokiClient | Callable[[], LokiClient], close_timeout_s: float = 30.0) -> None:
        self._client = client if isinstance(client, LokiClient) else None
        self._factory = None if isinstance(client, LokiClient) else client
        self.close_timeout_s = close_timeout_s
        self._lock = threading.Lock()
        self._users = 0

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LokiPartition:
        return _LokiPartition(self)

    def _acquire(self) -> LokiClient:
        with self._lock:
            if self._client is None:
                assert self._factory is not None
                self._client = self._factory()
            self._users += 1
            return self._client

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or self._client is None:
                return
            client = self._client
            if self._factory is not None:  # a later run builds a fresh client
                self._client = None
        client.close(self.close_timeout_s)
