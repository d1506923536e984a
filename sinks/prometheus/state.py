"""What /metrics shows, as state: cumulative calls and duration histograms per (service,
operation, kind, status), quantiles and calls of the last closed window per (service,
operation, kind), anomaly and scaling gauges. Updated from the dataflow's results
(``sinks/prometheus/sink.py``); series not updated for ``stale_after_s`` (on the injected
clock) expire, and a retired key or forgotten service (``KeyExpired``, ``ServiceExpired``)
takes its series with it. Thread-safe: a scrape copies it under the lock and renders
outside it (``sinks/prometheus/exposition.py``)."""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from operator import add

from pipeline.db_analysis import DbCalls, Finding
from pipeline.exceptions import ExceptionCounts
from pipeline.graph_calls import GraphCalls
from pipeline.model import STATUS_CODES, AnomalyUpdate, KeyExpired, ScalingUpdate, ServiceExpired, WindowResult
from pipeline.selfmetrics import SelfMetrics
from sinks.prometheus.exposition import kind_label as _kind
from sinks.prometheus.exposition import render_page


class _Series:
    __slots__ = ("calls", "failed", "buckets", "sum", "updated", "exemplars")

    def __init__(self, nb: int) -> None:
        self.calls = 0
        self.failed = 0  # service-graph requests only
        self.buckets = [0] * nb
        self.sum = 0.0
        self.updated = 0.0
        self.exemplars: dict[int, tuple[str, float, float]] = {}  # bucket -> (trace id, seconds, unix time)


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
        # database calls per (service, system, statement); findings per their labels
        self._db: dict[tuple[str, str, str], _Series] = {}
        self._n_plus_one: dict[tuple[str, str, str], list] = {}  # (service, span name, statement) -> [n, time]
        self._slow: dict[tuple[str, str, str], list] = {}  # (service, system, statement) -> [n, time]
        self._graph: dict[tuple[str, str, str], _Series] = {}  # (client, server, connection type)
        self._exceptions: dict[tuple[str, str, str], list] = {}  # (service, span name, type) -> [n, time]
        self._expired_at = -math.inf

    def update(self, items: Iterable[object]) -> None:
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
                if isinstance(r, DbCalls | Finding):
                    self._database(r, now, nb)
                    continue
                if isinstance(r, GraphCalls):
                    self._requests(r, now, nb)
                    continue
                if isinstance(r, ExceptionCounts):
                    entry = self._exceptions.setdefault((r.service, r.operation, r.exception_type), [0, now])
                    entry[0] += r.count
                    entry[1] = now
                    continue
                if not isinstance(r, WindowResult):
                    continue
                kind = _kind(r.span_kind)
                self._exemplars(r, kind, nb)
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

    def _exemplars(self, r: WindowResult, kind: str, nb: int) -> None:
        """The window's slowest spans as exemplars of the bucket each falls in (the newest one per
        bucket kept), on the series of the status most of them have: unset, else ok, else error."""
        if not r.slow_durations:
            return
        status = next((i for i in (0, 1, 2) if r.status_counts[i]), 2)
        key = (r.service, r.operation, kind, STATUS_CODES[status])
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(nb)
        when = r.window_end / 1e9
        for trace_id, seconds in zip(r.slow_traces, r.slow_durations):
            s.exemplars[bisect_left(self.bounds, seconds)] = (trace_id, seconds, when)

    def _database(self, r: DbCalls | Finding, now: float, nb: int) -> None:
        if isinstance(r, DbCalls):
            key = (r.service, r.db_system, r.statement)
            s = self._db.get(key)
            if s is None:
                s = self._db[key] = _Series(nb)
            s.calls += r.calls
            s.buckets = list(map(add, s.buckets, r.bucket_counts))
            s.sum += r.sum_s
            s.updated = now
            return
        table = self._n_plus_one if r.kind == "n_plus_one" else self._slow
        fkey = (r.service, r.operation if r.kind == "n_plus_one" else r.db_system, r.statement)
        entry = table.setdefault(fkey, [0, now])
        entry[0] += 1
        entry[1] = now

    def _requests(self, r: GraphCalls, now: float, nb: int) -> None:
        key = (r.client, r.server, r.connection_type)
        s = self._graph.get(key)
        if s is None:
            s = self._graph[key] = _Series(nb)
        s.calls += r.calls
        s.failed += r.failed
        s.buckets = list(map(add, s.buckets, r.bucket_counts))
        s.sum += r.sum_s
        s.updated = now

    def _forget(self, r: KeyExpired | ServiceExpired) -> None:
        """Drop the series of a retired key, or of every key of a forgotten service (lock held)."""
        if isinstance(r, KeyExpired):
            retired = (r.service, r.operation, _kind(r.span_kind))

            def mine(k: tuple) -> bool:
                return k[:3] == retired
        else:

            def mine(k: tuple) -> bool:
                return k[0] == r.service

            self._scaling.pop(r.service, None)
            for db in (self._db, self._n_plus_one, self._slow, self._exceptions):
                for k in [k for k in db if k[0] == r.service]:
                    del db[k]
            for k in [k for k in self._graph if r.service in k[:2]]:
                del self._graph[k]
        tables: tuple[dict, ...] = (self._series, self._latest, self._anomaly)
        for table in tables:
            for k in [k for k in table if mine(k)]:
                del table[k]

    def _expire(self, now: float) -> None:
        self._expired_at = now
        horizon = now - self.stale_after_s
        for key in [k for k, s in self._series.items() if s.updated < horizon]:
            del self._series[key]
        for latest in [k for k, v in self._latest.items() if v[2] < horizon]:
            del self._latest[latest]
        for series in (self._db, self._graph):
            for k in [k for k, s in series.items() if s.updated < horizon]:
                del series[k]
        for findings in (self._n_plus_one, self._slow, self._exceptions):
            for k in [k for k, v in findings.items() if v[1] < horizon]:
                del findings[k]
        tables: tuple[dict, ...] = (self._anomaly, self._scaling)
        for table in tables:
            for k in [k for k, v in table.items() if v[1] < horizon]:
                del table[k]

    def render(self, openmetrics: bool = False) -> Iterator[bytes]:
        """The whole /metrics page (text format 0.0.4, or OpenMetrics 1.0 with exemplars), in
        chunks of a few hundred KiB.

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
            exemplars = {k: dict(s.exemplars) for k, s in self._series.items() if s.exemplars} if openmetrics else {}
            latest = sorted(self._latest.items())
            anomaly = sorted(self._anomaly.items())
            scaling = sorted(self._scaling.items())
            db = {
                "calls": sorted((key, s.calls, list(s.buckets), s.sum) for key, s in self._db.items()),
                "n_plus_one": sorted((key, v[0]) for key, v in self._n_plus_one.items()),
                "slow": sorted((key, v[0]) for key, v in self._slow.items()),
                "graph": sorted((key, s.calls, s.failed, list(s.buckets), s.sum) for key, s in self._graph.items()),
                "exceptions": sorted((key, v[0]) for key, v in self._exceptions.items()),
            }
        return render_page(self.bounds, series, latest, anomaly, scaling, self.metrics, db, exemplars, openmetrics)
