"""Prometheus scrape endpoint: window results and self-metrics as metric families.

``SeriesState`` holds what the windows produced (cumulative calls and duration
histograms per (service, operation, kind, status), quantiles of the last closed
window per (service, operation, kind), anomaly and scaling gauges);
``SeriesState.render()`` writes the text exposition format (0.0.4) from it and from
``SelfMetrics`` on every scrape. Series not updated for ``stale_after_s`` (on the
injected clock) expire. ``MetricsHttpServer`` serves ``/metrics``, ``/healthz``
and ``/readyz``.

``state`` (the series), ``exposition`` (the page), ``server`` (HTTP), ``sink`` (the
bytewax output).

Families (label names follow the OTel Collector's spanmetrics connector):

- ``telepipe_calls_total{service_name,span_name,span_kind,status_code}``
- ``telepipe_duration_seconds_{bucket,sum,count}{...same labels, le}``
- ``telepipe_window_latency_seconds{service_name,span_name,span_kind,quantile}``
  (quantile 0.5, 0.9, 0.95, 0.99 and 1 = max, from the last closed window)
- ``telepipe_window_calls{service_name,span_name,span_kind}`` (spans in that window)
- self-metrics ``telepipe_<name>_total`` and ``telepipe_<name>`` (see pipeline/selfmetrics.py)
"""

from sinks.prometheus.exposition import CONTENT_TYPE
from sinks.prometheus.server import MetricsHttpServer
from sinks.prometheus.sink import MetricsSink, _MetricsPartition
from sinks.prometheus.state import SeriesState

__all__ = ["CONTENT_TYPE", "MetricsHttpServer", "MetricsSink", "SeriesState", "_MetricsPartition"]
