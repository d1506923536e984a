"""telepipe's own counters and gauges, shared by the receiver, spool, flow and sinks.

One ``SelfMetrics`` object is created at start-up and passed down (no module-level
metric objects). ``sinks/prometheus`` exposes it as ``telepipe_<name>`` families.
Every drop anywhere goes through ``dropped(reason, n)``, which logs and counts it.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

log = logging.getLogger("telepipe")

# name -> (help, label names). Counters get "_total" appended on exposition.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "received_spans": ("Spans received in Export requests", ()),
    "accepted_spans": ("Spans appended to the spool and acknowledged", ()),
    "rejected_spans": ("Spans rejected, by reason", ("reason",)),
    "received_logs": ("Log records received in Export requests", ()),
    "accepted_logs": ("Log records appended to the spool and acknowledged", ()),
    "rejected_logs": ("Log records rejected, by reason", ("reason",)),
    "received_metric_points": ("Metric data points received in Export requests", ()),
    "accepted_metric_points": ("Metric data points appended to the spool and acknowledged", ()),
    "rejected_metric_points": ("Metric data points rejected, by reason", ("reason",)),
    "processed_metric_points": ("Metric data points that went through the windows", ()),
    "late_metric_points": ("Metric data points whose window had already closed (counted, not merged)", ()),
    "overflow_metric_points": ("Metric data points of new series over metrics.max_series_per_service (left out)", ()),
    "requests": ("Export requests answered, by signal and gRPC status code", ("signal", "code")),
    "refused_requests": ("Export requests refused (client retries or must fix), by reason", ("reason",)),
    "read_spans": ("Spans the dataflow read from the spool (accepted minus read is its backlog)", ()),
    "processed_spans": ("Spans that went through the windows", ()),
    "processed_logs": ("Log records that went through the pipeline", ()),
    "late_spans": ("Spans whose window had already closed (counted, not merged)", ()),
    "late_logs": ("Log records whose window had already closed (counted in no window; still shipped to Loki)", ()),
    "late_edges": ("Sampled service-graph calls whose window had already closed (counted, not merged)", ()),
    "expired_keys": ("(service, operation, kind) keys retired after prometheus.stale_after_s without spans", ()),
    "expired_services": ("Services forgotten after prometheus.service_stale_after_s without any data", ()),
    "overflow_spans": ("Spans folded into a service's overflow series (cardinality limit)", ()),
    "templated_spans": ("Spans counted under their name's template (/users/{id}) to stay within the limit", ()),
    "incidents": ("Incident events, by state (opened, updated, resolved)", ("state",)),
    "windows_closed": ("Event-time windows closed", ()),
    "sink_errors": ("Sink request failures, by sink and reason", ("sink", "reason")),
    "sink_sent": ("Items delivered by sinks", ("sink",)),
    "sink_overflow_lines": ("Lines sent under an overflow label set (stream limit reached)", ("sink",)),
    "dropped": ("Items dropped, by reason (every drop is counted here)", ("reason",)),
    "thread_errors": ("Unexpected exceptions caught in a background thread, which carried on", ("thread",)),
    "spool_failures": ("Spool fsync, rotate or write failures (appends refused until the spool is sound)", ("op",)),
}
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "spool_bytes": ("Bytes in spool segments on disk", ()),
    "spool_unread_bytes": ("Acknowledged bytes the dataflow has not read yet (its backlog)", ()),
    "pipeline_lag_seconds": ("Wall-clock time minus the newest span end time that closed a window", ()),
    "closed_window_end_seconds": ("End (unix seconds) of the newest window on /metrics", ()),
    "incidents_open": ("Incidents open now (alerts on linked services grouped; see --emit-jsonl or Loki)", ()),
    "series": ("Active per-operation series on /metrics", ()),
    "loki_queue_batches": ("Batches waiting in the Loki sink's queue", ()),
}


class SelfMetrics:
    """Thread-safe counters and gauges by (name, label values)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
        self._gauges: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)

    def inc(self, name: str, n: float = 1, *labels: str) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name}")
        with self._lock:
            series = self._counters[name]
            series[labels] = series.get(labels, 0) + n

    def set_gauge(self, name: str, value: float, *labels: str) -> None:
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name}")
        with self._lock:
            self._gauges[name][labels] = value

    def dropped(self, reason: str, n: int = 1, detail: str = "") -> None:
        """The one place where anything telepipe drops is logged and counted."""
        if n <= 0:
            return
        self.inc("dropped", n, reason)
        log.warning("dropped %d (%s)%s", n, reason, f": {detail}" if detail else "")

    def counter(self, name: str, *labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(labels, 0)

    def gauge(self, name: str, *labels: str) -> float:
        with self._lock:
            return self._gauges.get(name, {}).get(labels, 0)

    def snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            return (
                {k: dict(v) for k, v in self._counters.items()},
                {k: dict(v) for k, v in self._gauges.items()},
            )
