"""Prometheus scrape endpoint: window results and self-metrics as metric families.

``SeriesState`` holds what the windows produced (cumulative calls and duration
histograms per (service, operation, kind, status), quantiles of the last closed
window per (service, operation, kind)); ``TelepipeCollector.collect()`` builds
families fresh from it and from ``SelfMetrics`` on every scrape, registered in an
injected ``CollectorRegistry``. Series not updated for ``stale_after_s`` (on the
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
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pipeline.anomaly import STATE_VALUE, AnomalyUpdate
from pipeline.model import SPAN_KINDS, STATUS_CODES, OVERFLOW_OPERATION, LateSpans, WindowResult
from pipeline.scaling import ScalingUpdate
from pipeline.selfmetrics import COUNTERS, GAUGES, SelfMetrics

log = logging.getLogger("telepipe.prometheus")

SERIES_LABELS = ["service_name", "span_name", "span_kind", "status_code"]
WINDOW_LABELS = ["service_name", "span_name", "span_kind"]
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

    def update(self, items: Iterable[WindowResult | LateSpans]) -> None:
        now = self.clock()
        nb = len(self.bounds) + 1
        newest_end = 0
        with self._lock:
            for r in items:
                if isinstance(r, LateSpans):
                    self.metrics.inc("late_spans", r.count)
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
                    row = r.bucket_counts[status]
                    for i in range(nb):
                        s.buckets[i] += row[i]
                    s.sum += r.status_sums[status]
                    s.updated = now
                q = (r.p50, r.p90, r.p95, r.p99, r.max)
                self._latest[(r.service, r.operation, kind)] = (q, r.count, now)
                self.metrics.inc("windows_closed", 1)
                self.metrics.inc("processed_spans", r.count)
                if r.operation == OVERFLOW_OPERATION:
                    self.metrics.inc("overflow_spans", r.count)
                newest_end = max(newest_end, r.window_end)
            self._expire(now)
            self.metrics.set_gauge("series", len(self._series))
        if newest_end:
            self.metrics.set_gauge("pipeline_lag_seconds", max(0.0, now - newest_end / 1e9))
            newest = max(newest_end / 1e9, self.metrics.gauge("closed_window_end_seconds"))
            self.metrics.set_gauge("closed_window_end_seconds", newest)

    def _expire(self, now: float) -> None:
        horizon = now - self.stale_after_s
        for key in [k for k, s in self._series.items() if s.updated < horizon]:
            del self._series[key]
        for key in [k for k, v in self._latest.items() if v[2] < horizon]:
            del self._latest[key]
        for table in (self._anomaly, self._scaling):
            for key in [k for k, v in table.items() if v[1] < horizon]:
                del table[key]

    def families(self) -> list:
        calls = CounterMetricFamily("telepipe_calls", "Spans per operation and status (closed windows)", labels=SERIES_LABELS)
        dur = HistogramMetricFamily(
            "telepipe_duration_seconds", "Span duration per operation and status (closed windows)", labels=SERIES_LABELS
        )
        lat = GaugeMetricFamily(
            "telepipe_window_latency_seconds",
            "Latency quantiles of the last closed window (quantile 1 is the max)",
            labels=WINDOW_LABELS + ["quantile"],
        )
        wcalls = GaugeMetricFamily("telepipe_window_calls", "Spans in the last closed window", labels=WINDOW_LABELS)
        les = [_fmt(b) for b in self.bounds] + ["+Inf"]
        # Copy under the lock, build the families outside it: at 10,000 keys building takes
        # seconds, and the dataflow's metrics sink must not wait for a scrape.
        with self._lock:
            self._expire(self.clock())
            series = [(key, s.calls, list(s.buckets), s.sum) for key, s in self._series.items()]
            latest = list(self._latest.items())
            anomaly_items = list(self._anomaly.items())
            scaling_items = list(self._scaling.items())
        for key, n, buckets, total in sorted(series):
            labels = list(key)
            calls.add_metric(labels, n)
            cum, acc = [], 0
            for le, c in zip(les, buckets, strict=True):
                acc += c
                cum.append((le, acc))
            dur.add_metric(labels, cum, total)
        for key, (q, count, _) in sorted(latest):
            for label, value in zip(QUANTILE_LABELS, q, strict=True):
                lat.add_metric([*key, label], value)
            wcalls.add_metric(list(key), count)
        anomaly = self._anomaly_families(anomaly_items)
        scaling = self._scaling_families(scaling_items)
        return [calls, dur, lat, wcalls, *anomaly, *scaling]

    def _anomaly_families(self, items: list) -> list:
        score = GaugeMetricFamily("telepipe_anomaly_score", "Anomaly score of the last window: max |z| / k "
                                  "over judged features (>= 1 is anomalous)", labels=WINDOW_LABELS)  # fmt: skip
        hst = GaugeMetricFamily("telepipe_anomaly_hst_score", "HalfSpaceTrees score of the last window",
                                labels=WINDOW_LABELS)  # fmt: skip
        learning = GaugeMetricFamily("telepipe_anomaly_learning", "1 while the key is still learning its baseline",
                                     labels=WINDOW_LABELS)  # fmt: skip
        state = GaugeMetricFamily("telepipe_alert_state", "Alert state: 0 ok, 1 pending, 2 firing",
                                  labels=WINDOW_LABELS)  # fmt: skip
        flabels = WINDOW_LABELS + ["feature"]
        observed = GaugeMetricFamily("telepipe_anomaly_observed", "Feature value of the last window", labels=flabels)
        expected = GaugeMetricFamily("telepipe_anomaly_expected", "Expected feature value", labels=flabels)
        lower = GaugeMetricFamily("telepipe_anomaly_lower", "Lower edge of the normal band", labels=flabels)
        upper = GaugeMetricFamily("telepipe_anomaly_upper", "Upper edge of the normal band", labels=flabels)
        for key, (u, _) in sorted(items, key=lambda kv: kv[0]):
            labels = list(key)
            score.add_metric(labels, u.score)
            if not math.isnan(u.hst_score):
                hst.add_metric(labels, u.hst_score)
            learning.add_metric(labels, 1.0 if u.learning else 0.0)
            state.add_metric(labels, STATE_VALUE[u.state])
            for j in u.judgements:
                fl = [*labels, j.feature]
                observed.add_metric(fl, j.observed)
                if not math.isnan(j.expected):
                    expected.add_metric(fl, j.expected)
                    lower.add_metric(fl, j.lower)
                    upper.add_metric(fl, j.upper)
        return [score, hst, learning, state, observed, expected, lower, upper]

    def _scaling_families(self, items: list) -> list:
        desired = GaugeMetricFamily("telepipe_desired_replicas", "Desired replicas (HPA algorithm)",
                                    labels=["service_name"])  # fmt: skip
        observed = GaugeMetricFamily("telepipe_observed_replicas", "Distinct service.instance.id in the last window",
                                     labels=["service_name"])  # fmt: skip
        reason = GaugeMetricFamily("telepipe_scaling_reason", "1 for the rule that decided the desired replicas",
                                   labels=["service_name", "reason"])  # fmt: skip
        rate = GaugeMetricFamily("telepipe_scaling_call_rate", "SERVER calls per second in the last window",
                                 labels=["service_name"])  # fmt: skip
        forecast = GaugeMetricFamily("telepipe_scaling_forecast_call_rate", "Forecast SERVER calls per second",
                                     labels=["service_name"])  # fmt: skip
        for service, (u, _) in sorted(items, key=lambda kv: kv[0]):
            desired.add_metric([service], u.desired)
            observed.add_metric([service], u.observed)
            reason.add_metric([service, u.reason_code], 1.0)
            rate.add_metric([service], u.call_rate)
            forecast.add_metric([service], u.forecast_rate)
        return [desired, observed, reason, rate, forecast]

    def scaling_signal(self, service: str) -> tuple[int, float] | None:
        """(desired replicas, latest SERVER call rate) of a service; the KEDA scaler serves this."""
        with self._lock:
            entry = self._scaling.get(service)
            return None if entry is None else (entry[0].desired, entry[0].call_rate)


def _fmt(v: float) -> str:
    return repr(float(v))


class TelepipeCollector(Collector):
    def __init__(self, state: SeriesState, metrics: SelfMetrics) -> None:
        self.state = state
        self.metrics = metrics

    def collect(self):
        yield from self.state.families()
        counters, gauges = self.metrics.snapshot()
        for name, (doc, labels) in COUNTERS.items():
            fam = CounterMetricFamily(f"telepipe_{name}", doc, labels=list(labels))
            for lv, v in sorted(counters.get(name, {}).items()):
                fam.add_metric(list(lv), v)
            if not labels and not counters.get(name):
                fam.add_metric([], 0)
            yield fam
        for name, (doc, labels) in GAUGES.items():
            fam = GaugeMetricFamily(f"telepipe_{name}", doc, labels=list(labels))
            for lv, v in sorted(gauges.get(name, {}).items()):
                fam.add_metric(list(lv), v)
            if not labels and not gauges.get(name):
                fam.add_metric([], 0)
            yield fam


def make_registry(state: SeriesState, metrics: SelfMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelepipeCollector(state, metrics))
    return registry


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
    """``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) on one address."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(outer.registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif path == "/readyz":
                    ok, why = outer.ready()
                    body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http: " + fmt, *args)

        self.registry = registry
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
