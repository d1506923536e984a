"""OTLP metric requests -> ``MetricBatch``: protobuf bytes (parsed by upb) or OTLP/JSON objects.

A row per data point: gauges and sums (``value``: the point's value), histograms,
exponential histograms and summaries (``value``: the sum of observations, NaN when
the point has none; ``count``: their count). Buckets and quantiles are not kept:
what telepipe does with metrics (scaling, detection) needs a value or a rate per
series. Both wire forms fill the same columns (``_MetricColumns``), validated once.

Rejected, counted in ``partial_success`` (``rejected_data_points``): points of a
metric without a name, points without a time, gauge and sum points without a value,
sums and histograms whose aggregation temporality is unspecified (the data model
forbids it). Points flagged "no recorded value" (``flags & 1``, a staleness marker)
are not data: skipped, not rejected.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from pipeline.decode.common import Decoded, MalformedRequest, _reason_message, parse
from pipeline.decode.logs import _json_anyvalue_to_python, anyvalue_to_python, render_value
from pipeline.decode.spans import _json_resource_ids, _resource_ids
from pipeline.metric_model import (
    METRIC_COLUMNS,
    METRIC_EXP_HISTOGRAM,
    METRIC_GAUGE,
    METRIC_HISTOGRAM,
    METRIC_SUM,
    METRIC_SUMMARY,
    MetricBatch,
)

MAX_ATTRS_CHARS = 1024  # a series' attributes, rendered, are cut to this (bounded keys)
NO_RECORDED_VALUE = 1  # DataPointFlags.FLAG_NO_RECORDED_VALUE
_KINDS = {"gauge": METRIC_GAUGE, "sum": METRIC_SUM, "histogram": METRIC_HISTOGRAM,
          "exponential_histogram": METRIC_EXP_HISTOGRAM, "summary": METRIC_SUMMARY}  # fmt: skip
_JSON_KINDS = {"gauge": METRIC_GAUGE, "sum": METRIC_SUM, "histogram": METRIC_HISTOGRAM,
               "exponentialHistogram": METRIC_EXP_HISTOGRAM, "summary": METRIC_SUMMARY}  # fmt: skip


def series_attrs(pairs: list[tuple[str, object]]) -> str:
    """A point's attributes in canonical form: sorted ``key=value`` joined by ``,``."""
    if not pairs:
        return ""
    text = ",".join(f"{k}={render_value(v)}" for k, v in sorted(pairs, key=lambda kv: kv[0]))
    return text[:MAX_ATTRS_CHARS]


class _MetricColumns:
    """Data points from either wire form, a row each, with their string tables."""

    def __init__(self) -> None:
        self.tables: tuple[dict[str, int], ...] = ({}, {}, {}, {})  # services, instances, names, attrs
        self.rows: list[tuple] = []
        self.reasons: Counter[str] = Counter()
        self.received = 0

    def add(self, service: str, instance: str, name: str, attrs: str, kind: int, temporality: int,
            monotonic: bool, start: int, time: int, value: float, count: float) -> None:  # fmt: skip
        s, i, n, a = self.tables
        self.rows.append((
            s.setdefault(service, len(s)), i.setdefault(instance, len(i)), n.setdefault(name, len(n)),
            a.setdefault(attrs, len(a)), kind, temporality, int(monotonic), start, time, value, count,
        ))  # fmt: skip

    def reject(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] += n

    def finish(self) -> Decoded:
        rejected = sum(self.reasons.values())
        message = _reason_message(self.reasons)
        if not self.rows:
            return Decoded(None, self.received, rejected, message)
        columns = list(zip(*self.rows, strict=True))
        cols = {name: np.array(values, dtype=dtype) for (name, dtype), values in zip(METRIC_COLUMNS, columns)}
        batch = MetricBatch(*(tuple(t) for t in self.tables), **cols)  # type: ignore[arg-type]
        return Decoded(batch, self.received, rejected, message)


def _point(cols: _MetricColumns, ids: tuple[str, str, str], kind: int, temporality: int, monotonic: bool,
           attrs: str, start: int, time: int, flags: int, value: float | None, count: float) -> None:  # fmt: skip
    cols.received += 1
    if flags & NO_RECORDED_VALUE:
        return
    if not ids[2]:
        cols.reject("metric without a name")
    elif time <= 0:
        cols.reject("points without a time")
    elif kind in (METRIC_SUM, METRIC_HISTOGRAM, METRIC_EXP_HISTOGRAM) and temporality not in (1, 2):
        cols.reject("points of unspecified aggregation temporality")
    elif kind in (METRIC_GAUGE, METRIC_SUM) and value is None:
        cols.reject("points without a value")
    else:
        cols.add(ids[0], ids[1], ids[2], attrs, kind, temporality, monotonic, start, time,
                 math.nan if value is None else value, count)  # fmt: skip


# -- protobuf ----------------------------------------------------------------------------------


def decode_metrics(data: bytes) -> Decoded:
    """ExportMetricsServiceRequest bytes -> MetricBatch of the valid points."""
    req = parse(ExportMetricsServiceRequest(), data, "ExportMetricsServiceRequest")
    cols = _MetricColumns()
    for rm in req.resource_metrics:
        service, instance = _resource_ids(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                _proto_metric(cols, (service, instance, m.name), m)
    return cols.finish()


def _proto_metric(cols: _MetricColumns, ids: tuple[str, str, str], m) -> None:
    which = m.WhichOneof("data")
    if which is None:
        return
    kind = _KINDS[which]
    data = getattr(m, which)
    temporality = getattr(data, "aggregation_temporality", 0)
    monotonic = bool(getattr(data, "is_monotonic", False))
    for p in data.data_points:
        attrs = series_attrs([(kv.key, anyvalue_to_python(kv.value)) for kv in p.attributes])
        value: float | None
        count = 0.0
        if kind in (METRIC_GAUGE, METRIC_SUM):
            field = p.WhichOneof("value")
            value = None if field is None else float(getattr(p, field))
        else:
            count = float(p.count)
            value = p.sum if (kind == METRIC_SUMMARY or p.HasField("sum")) else None
        _point(cols, ids, kind, temporality, monotonic, attrs, p.start_time_unix_nano, p.time_unix_nano,
               p.flags, value, count)  # fmt: skip


# -- OTLP/JSON ---------------------------------------------------------------------------------


def decode_metrics_json(obj: dict) -> Decoded:
    """One OTLP/JSON ExportMetricsServiceRequest (int64 as strings or numbers) -> MetricBatch."""
    cols = _MetricColumns()
    try:
        for rm in obj.get("resourceMetrics") or ():
            service, instance = _json_resource_ids(rm.get("resource") or {})
            for sm in rm.get("scopeMetrics") or ():
                for m in sm.get("metrics") or ():
                    _json_metric(cols, (service, instance, m.get("name") or ""), m)
        return cols.finish()
    except (AttributeError, TypeError, ValueError, OverflowError, KeyError) as exc:
        raise MalformedRequest(f"malformed OTLP/JSON metrics request: {exc}") from exc


def _json_metric(cols: _MetricColumns, ids: tuple[str, str, str], m: dict) -> None:
    which = next((k for k in _JSON_KINDS if k in m), None)
    if which is None:
        return
    kind = _JSON_KINDS[which]
    data = m[which] or {}
    temporality = int(data.get("aggregationTemporality") or 0)
    monotonic = bool(data.get("isMonotonic", False))
    for p in data.get("dataPoints") or ():
        pairs = [(kv["key"], _json_anyvalue_to_python(kv.get("value"))) for kv in p.get("attributes") or ()]
        attrs = series_attrs(pairs)
        value: float | None
        count = 0.0
        if kind in (METRIC_GAUGE, METRIC_SUM):
            raw = p.get("asDouble", p.get("asInt"))
            value = None if raw is None else float(raw)
        else:
            count = float(int(p.get("count") or 0))
            value = float(p["sum"]) if p.get("sum") is not None else None
        _point(cols, ids, kind, temporality, monotonic, attrs, int(p.get("startTimeUnixNano") or 0),
               int(p.get("timeUnixNano") or 0), int(p.get("flags") or 0), value, count)  # fmt: skip
