"""Prometheus scrape endpoint: window results and self-metrics as metric families.

``SeriesState`` holds what the windows produced (cumulative calls and duration
histograms per (service, operation, kind, status), quantiles of the last closed
window per (service, operation, kind), anomaly and scaling gauges);
``SeriesState.render()`` writes the text exposition format (0.0.4) from it and from
``SelfMetrics`` on every scrape. Series not updated for ``stale_after_s`` (on the
injected clock) expire. ``MetricsHttpServer`` serves ``/metrics``, ``/healthz``
and ``/readyz``.

Families (label names follow the OTel Collector's spanmetrics connector):

- ``telepipe_calls_total{service_name,span_name,span_kind,status_code}``
- ``telepipe_duration_seconds_{bucket,sum,count}{...same labels, le}``
- ``telepipe_window_latency_seconds{service_name,span_name,span_kind,quantile}``
  (quantile 0.5, 0.9, 0.95, 0.99 and 1 = max, from the last closed window)
- ``telepipe_window_calls{service_name,span_name,span_kind}`` (spans in that window)
- self-metrics ``telepipe_<name>_total`` and ``telepipe_<name>`` (see pipeline/selfmetrics.py)
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate
from operator import add, attrgetter

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client.utils import floatToGoString

from pipeline.model import (
    SPAN_KINDS,
    STATE_VALUE,
    STATUS_CODES,
    AnomalyUpdate,
    KeyExpired,
    LateSpans,
    ScalingUpdate,
    ServiceExpired,
    WindowResult,
)
from pipeline.selfmetrics import COUNTERS, GAUGES, SelfMetrics

log = logging.getLogger("telepipe.prometheus")

QUANTILE_LABELS = ("0.5", "0.9", "0.95", "0.99", "1")


def _kind(k: int) -> str:
    return SPAN_KINDS[k] if 0 <= k < len(SPAN_KINDS) else str(k)


class _Series:
    __slots__ = ("calls", "buckets", "sum", "updated")

    def __init__(self, nb: int) -> None:
        self.calls = 0
        self.buckets = [0] * nb
        self.sum = 0.0
        self.updated = 0.0


class SeriesState:
    """Current per-operation metric state, updated from window results. Thread-safe."""

    def __init__(
        self,
        buckets: tuple[float, ...],
        metrics: SelfMetrics,
        stale_after_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bounds = tuple(buckets)
        self.metrics = metrics
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._latest: dict[tuple[str, str, str], tuple[tuple[float, ...], int, float]] = {}
        self._anomaly: dict[tuple[str, str, str], tuple[AnomalyUpdate, float]] = {}
        self._scaling: dict[str, tuple[ScalingUpdate, float]] = {}
        self._expired_at = -math.inf

    def update(self, items: Iterable[WindowResult | LateSpans]) -> None:
        now = self.clock()
        nb = len(self.bounds) + 1
        newest_end = 0
        with self._lock:
            for r in items:
                if isinstance(r, KeyExpired | ServiceExpired):
                    self._forget(r)
                    continue
                if isinstance(r, AnomalyUpdate):
                    kind = _kind(r.span_kind) if r.span_kind >= 0 else ""
                    self._anomaly[(r.service, r.operation, kind)] = (r, now)
                    continue
                if isinstance(r, ScalingUpdate):
                    self._scaling[r.service] = (r, now)
                    continue
                if not isinstance(r, WindowResult):
                    continue
                kind = _kind(r.span_kind)
                for status, n in enumerate(r.status_counts):
                    if not n:
                        continue
                    key = (r.service, r.operation, kind, STATUS_CODES[status])
                    s = self._series.get(key)
                    if s is None:
                        s = self._series[key] = _Series(nb)
                    s.calls += n
                    s.buckets = list(map(add, s.buckets, r.bucket_counts[status]))
                    s.sum += r.status_sums[status]
                    s.updated = now
                q = (r.p50, r.p90, r.p95, r.p99, r.max)
                self._latest[(r.service, r.operation, kind)] = (q, r.count, now)
                newest_end = max(newest_end, r.window_end)
            if now - self._expired_at >= 1.0:  # a scan of every series: not on every batch
                self._expire(now)
            self.metrics.set_gauge("series", len(self._series))
        if newest_end:
            self.metrics.set_gauge("pipeline_lag_seconds", max(0.0, now - newest_end / 1e9))
            newest = max(newest_end / 1e9, self.metrics.gauge("closed_window_end_seconds"))
            self.metrics.set_gauge("closed_window_end_seconds", newest)

    def _forget(self, r: KeyExpired | ServiceExpired) -> None:
        """Drop the series of a retired key, or of every key of a forgotten service (lock held)."""
        if isinstance(r, KeyExpired):
            key = (r.service, r.operation, _kind(r.span_kind))
            mine = lambda k: k[:3] == key  # noqa: E731
        else:
            mine = lambda k: k[0] == r.service  # noqa: E731
            self._scaling.pop(r.service, None)
        for table in (self._series, self._latest, self._anomaly):
            for k in [k for k in table if mine(k)]:
                del table[k]

    def _expire(self, now: float) -> None:
        self._expired_at = now
        horizon = now - self.stale_after_s
        for key in [k for k, s in self._series.items() if s.updated < horizon]:
            del self._series[key]
        for key in [k for k, v in self._latest.items() if v[2] < horizon]:
            del self._latest[key]
        for table in (self._anomaly, self._scaling):
            for key in [k for k, v in table.items() if v[1] < horizon]:
                del table[key]

    def render(self) -> Iterator[bytes]:
        """The whole /metrics page (text format 0.0.4), in chunks of a few hundred KiB.

        Written directly rather than through prometheus_client's sample objects: at
        10,000 keys (70 lines each, 110 MiB of text) those took 10 s and added ~90 MiB
        of RSS per scrape, this takes ~1 s and ~15 MiB (``bench/scrape.py``): the text
        is built in chunks and each chunk is dropped once written. The state
        is copied under the lock and rendered outside it, so the dataflow's metrics
        sink never waits for a scrape.
        """
        with self._lock:
            self._expire(self.clock())
            series = sorted((key, s.calls, list(s.buckets), s.sum) for key, s in self._series.items())
            latest = sorted(self._latest.items())
            anomaly = sorted(self._anomaly.items())
            scaling = sorted(self._scaling.items())
        page = _Page()
        labels = _LabelCache(("service_name", "span_name", "span_kind", "status_code"))
        les = [f',le="{_fmt(b)}"}} ' for b in self.bounds] + [',le="+Inf"} ']

        yield from page.family("telepipe_calls_total", "counter", "Spans per operation and status (closed windows)")
        for key, n, _, _ in series:
            yield from page.line(f"telepipe_calls_total{{{labels(key)}}} {n}\n")
        yield from page.family("telepipe_duration_seconds", "histogram",
                               "Span duration per operation and status (closed windows)")  # fmt: skip
        for key, n, buckets, total in series:
            lb = labels(key)
            yield from page.lines(
                f"telepipe_duration_seconds_bucket{{{lb}{le}{acc}\n" for le, acc in zip(les, accumulate(buckets))
            )
            yield from page.line(f"telepipe_duration_seconds_count{{{lb}}} {n}\n"
                                 f"telepipe_duration_seconds_sum{{{lb}}} {_fmt(total)}\n")  # fmt: skip

        yield from page.family("telepipe_window_latency_seconds", "gauge",
                               "Latency quantiles of the last closed window (quantile 1 is the max)")  # fmt: skip
        for key, (q, _, _) in latest:
            lb = labels(key)
            yield from page.lines(
                f'telepipe_window_latency_seconds{{{lb},quantile="{ql}"}} {_fmt(v)}\n'
                for ql, v in zip(QUANTILE_LABELS, q, strict=True)
            )
        yield from page.family("telepipe_window_calls", "gauge", "Spans in the last closed window")
        for key, (_, count, _) in latest:
            yield from page.line(f"telepipe_window_calls{{{labels(key)}}} {count}\n")

        yield from self._render_anomaly(page, labels, anomaly)
        yield from self._render_scaling(page, labels, scaling)
        yield from _render_selfmetrics(page, self.metrics)
        yield from page.flush()

    @staticmethod
    def _render_anomaly(page: _Page, labels: _LabelCache, items: list) -> Iterator[bytes]:
        yield from _gauges(page, labels, items, (
            ("telepipe_anomaly_score", "Anomaly score of the last window: max |z| / k over judged features "
             "(>= 1 is anomalous)", attrgetter("score")),
            ("telepipe_anomaly_hst_score", "HalfSpaceTrees score of the last window", attrgetter("hst_score")),
            ("telepipe_anomaly_learning", "1 while the key is still learning its baseline",
             lambda u: 1.0 if u.learning else 0.0),
            ("telepipe_alert_state", "Alert state: 0 ok, 1 pending, 2 firing", lambda u: float(STATE_VALUE[u.state])),
        ))  # fmt: skip
        bands = (
            ("telepipe_anomaly_observed", "Feature value of the last window", "observed"),
            ("telepipe_anomaly_expected", "Expected feature value", "expected"),
            ("telepipe_anomaly_lower", "Lower edge of the normal band", "lower"),
            ("telepipe_anomaly_upper", "Upper edge of the normal band", "upper"),
        )
        for name, doc, field in bands:
            yield from page.family(name, "gauge", doc)
            for key, (u, _) in items:
                lb = labels(key)
                for j in u.judgements:
                    # a feature without a baseline yet has an observed value only
                    if field == "observed" or not math.isnan(j.expected):
                        yield from page.line(
                            f'{name}{{{lb},feature="{_escape(j.feature)}"}} {_fmt(getattr(j, field))}\n'
                        )

    @staticmethod
    def _render_scaling(page: _Page, labels: _LabelCache, items: list) -> Iterator[bytes]:
        by_service = [((service,), v) for service, v in items]
        yield from _gauges(page, labels, by_service, (
            ("telepipe_desired_replicas", "Desired replicas (HPA algorithm)", attrgetter("desired")),
            ("telepipe_observed_replicas", "Distinct service.instance.id in the last window", attrgetter("observed")),
            ("telepipe_scaling_call_rate", "SERVER calls per second in the last window", attrgetter("call_rate")),
            ("telepipe_scaling_forecast_call_rate", "Forecast SERVER calls per second", attrgetter("forecast_rate")),
        ))  # fmt: skip
        yield from page.family("telepipe_scaling_reason", "gauge", "1 for the rule that decided the desired replicas")
        for key, (u, _) in by_service:
            yield from page.line(f'telepipe_scaling_reason{{{labels(key)},reason="{_escape(u.reason_code)}"}} 1\n')

    def scaling_signal(self, service: str) -> tuple[int, float] | None:
        """(desired replicas, latest SERVER call rate) of a service; the KEDA scaler serves this."""
        with self._lock:
            entry = self._scaling.get(service)
            return None if entry is None else (entry[0].desired, entry[0].call_rate)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_CHUNK_LINES = 4096


def _fmt(v: float) -> str:
    """A float sample value as Go (and so Prometheus and prometheus_client) writes it:
    ``+Inf``, ``NaN``, ``1e+06``. Integer counts are written as integers, also valid."""
    return floatToGoString(v)


def _escape(v: str) -> str:
    """A label value in the text format: backslash, double quote and line feed escaped."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


class _LabelCache:
    """``name="value",...`` for a key tuple, escaped once per scrape (names taken in order)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.cache: dict[tuple, str] = {}

    def __call__(self, key: tuple) -> str:
        text = self.cache.get(key)
        if text is None:
            text = self.cache[key] = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(self.names, key))
        return text


class _Page:
    """Collects exposition lines and hands them out as encoded chunks."""

    def __init__(self) -> None:
        self.buf: list[str] = []

    def family(self, name: str, kind: str, doc: str) -> Iterator[bytes]:
        doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
        return self.line(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")

    def line(self, text: str) -> Iterator[bytes]:
        self.buf.append(text)
        if len(self.buf) >= _CHUNK_LINES:
            yield from self.flush()

    def lines(self, texts: Iterable[str]) -> Iterator[bytes]:
        self.buf.extend(texts)
        if len(self.buf) >= _CHUNK_LINES:
            yield from self.flush()

    def flush(self) -> Iterator[bytes]:
        if self.buf:
            chunk = "".join(self.buf).encode()
            self.buf = []
            yield chunk


def _gauges(page: _Page, labels: _LabelCache, items: list, specs: tuple) -> Iterator[bytes]:
    """One gauge family per (name, help, value of an update) over ``items`` ((key, (update,
    time)) pairs); a NaN value has no sample."""
    for name, doc, value in specs:
        yield from page.family(name, "gauge", doc)
        for key, (u, _) in items:
            v = value(u)
            if not math.isnan(v):
                yield from page.line(f"{name}{{{labels(key)}}} {_fmt(v)}\n")


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip;q=0`` refuses it)."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip() if params.strip().startswith("q=") else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


def _render_selfmetrics(page: _Page, metrics: SelfMetrics) -> Iterator[bytes]:
    counters, gauges = metrics.snapshot()
    for table, values, kind, suffix in ((COUNTERS, counters, "counter", "_total"), (GAUGES, gauges, "gauge", "")):
        for name, (doc, label_names) in table.items():
            full = f"telepipe_{name}{suffix}"
            yield from page.family(full, kind, doc)
            samples = values.get(name) or ({(): 0} if not label_names else {})
            labels = _LabelCache(label_names)
            for lv, v in sorted(samples.items()):
                yield from page.line(f"{full}{{{labels(lv)}}} {_fmt(v)}\n" if lv else f"{full} {_fmt(v)}\n")


class _MetricsPartition(StatelessSinkPartition[WindowResult | LateSpans]):
    def __init__(self, state: SeriesState) -> None:
        self.state = state

    def write_batch(self, items: list[WindowResult | LateSpans]) -> None:
        self.state.update(items)


class MetricsSink(DynamicSink[WindowResult | LateSpans]):
    """bytewax output that feeds window results into the process's SeriesState."""

    def __init__(self, state: SeriesState) -> None:
        self.state = state

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MetricsPartition:
        return _MetricsPartition(self.state)


class MetricsHttpServer:
    """``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) on one address.

    ``/metrics`` is sent with chunked transfer encoding as ``render()`` produces it
    (a scraper can tell a cut-off page from a whole one), gzip-compressed when the
    scraper accepts it (Prometheus does; level 1: the page is repetitive text and
    higher levels cost CPU the dataflow needs for little gain).
    """

    def __init__(self, host: str, port: int, render: Callable[[], Iterable[bytes]], ready: Callable[[], tuple[bool, str]]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive for scrapers, chunked /metrics
            timeout = 120  # an idle kept-alive connection is closed (and its thread ends)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self.send_metrics()
                    return
                if path == "/healthz":
                    body, code = b"ok\n", 200
                elif path == "/readyz":
                    ok, why = outer.ready()
                    body, code = (why + "\n").encode(), 200 if ok else 503
                else:
                    body, code = b"not found\n", 404
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_metrics(self) -> None:
                gzipped = _accepts_gzip(self.headers.get("Accept-Encoding", ""))
                chunked = self.request_version != "HTTP/1.0"  # an HTTP/1.0 client reads to the close
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE)
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    if gzipped:
                        self.send_header("Content-Encoding", "gzip")
                    self.end_headers()
                    packer = zlib.compressobj(1, zlib.DEFLATED, 31) if gzipped else None
                    for chunk in outer.render():
                        self.write_chunk(packer.compress(chunk) if packer else chunk, chunked)
                    if packer:
                        self.write_chunk(packer.flush(), chunked)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the scraper went away (its timeout, a reset): nothing to answer
                    self.close_connection = True

            def write_chunk(self, data: bytes, chunked: bool) -> None:
                if data:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http: " + fmt, *args)

        self.render = render
        self.ready = ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
