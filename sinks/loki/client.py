"""The Loki client: log streams batched into push requests, sent one at a time, in order.

Requests are built and queued by ``sinks/delivery`` (bounded queue, one guarded sender
thread); this client brings what a request is made of (label set -> entries, sealed by
size here and by age in the sender) and how one goes out (gzip JSON, retried with
backoff and a circuit breaker). ``push`` never blocks on the network.

Label sets are bounded: at most ``max_streams`` in use; a new one beyond that goes to
an overflow stream (service ``__overflow__``, counted in ``sink_overflow_lines``), and a
label set unused for ``stream_idle_s`` stops counting (services come and go for months).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import httpx
import orjson

from pipeline.config import ConfigError, LokiConfig
from pipeline.model import LogBatch
from pipeline.selfmetrics import SelfMetrics
from sinks.delivery import BatchQueue, CircuitBreaker, Delivery, RetryPolicy
from sinks.loki.encoder import encode_events, encode_push, encode_streams, merge_sorted

log = logging.getLogger("telepipe")

PUSH_PATH = "/loki/api/v1/push"
_STREAM_OVERHEAD = 64  # JSON bytes around one stream's labels and values
STREAM_SWEEP_INTERVAL_S = 1.0  # idle label sets are looked for at most this often (and when the limit is hit)
OVERFLOW_SERVICE = "__overflow__"
SENDER_THREAD = "loki-sender"


def push_url(url: str) -> httpx.URL:
    """The configured URL as is, or with Loki's push path when it has none."""
    if not url:
        raise ConfigError("loki.url: must be set to use the Loki sink")
    parsed = httpx.URL(url)
    return parsed if parsed.path not in ("", "/") else parsed.copy_with(path=PUSH_PATH)


class _Request:
    """A push request being built: entries per label set, and its size."""

    def __init__(self) -> None:
        self.groups: dict[tuple, list[list]] = {}
        self.items = 0  # lines
        self.bytes = 0

    def sealed(self) -> list[dict]:
        return merge_sorted(self.groups)


class LokiClient:
    """``push``/``push_events`` add lines; at most ``cfg.queue_max_batches`` sealed requests wait
    (beyond that the oldest is dropped, ``loki_queue_full``)."""

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
        stop = threading.Event()
        # Default sleep wakes up on close(), so a long backoff does not hold shutdown.
        self._sleep = sleep or stop.wait
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
            "loki", self._http, self.url, self.policy, metrics, cfg.max_retries, self._sleep, stop,
            CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s, clock),
        )  # fmt: skip
        # Label sets in use, for the stream limit: label set -> last used (clock), least recently used first.
        self._streams: OrderedDict[tuple, float] = OrderedDict()
        self._next_stream_sweep = 0.0
        self.queue: BatchQueue[_Request] = BatchQueue(
            "loki", metrics, new_request=_Request, send=self._send, max_requests=cfg.queue_max_batches,
            max_wait_s=cfg.batch_max_wait_ms / 1000.0, stop=stop, thread=SENDER_THREAD, clock=clock,
            gauge="loki_queue_batches",
        )  # fmt: skip

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
        # Every line is serialized before any is added: a line that cannot be serialized makes
        # the push raise having added nothing, so the caller can count it dropped or push the
        # items one by one without sending a line twice.
        sizes = [[len(orjson.dumps(value)) + 1 for value in stream["values"]] for stream in streams]

        def fill(queue: BatchQueue[_Request]) -> None:
            for stream, value_sizes in zip(streams, sizes, strict=True):
                key = self._stream_key(stream["stream"], len(stream["values"]))
                for value, size in zip(stream["values"], value_sizes, strict=True):
                    req = queue.building
                    if req.items and req.bytes + size > self.cfg.batch_max_bytes:
                        queue.seal()
                        req = queue.building
                    if key not in req.groups:
                        size += sum(len(k) + len(v) for k, v in key) + _STREAM_OVERHEAD
                    req.groups.setdefault(key, []).append(value)
                    req.items += 1
                    req.bytes += size

        if not self.queue.add(fill):
            self.metrics.dropped("loki_closed", lines, detail="push after close")

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
        return self.queue.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; what is still unsent after ``timeout`` is dropped."""
        drained = self.queue.close(timeout)
        if not self.queue.sender_alive():
            self._http.close()
        return drained

    def _send(self, streams: list[dict], lines: int) -> None:
        self._delivery.deliver(encode_push(streams), lines)
