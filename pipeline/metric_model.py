"""Metric records: OTLP metric points as columns (``MetricBatch``), what pre-aggregation makes
of them (``MetricPartial``), what a closed window sees of a service's metrics (``MetricValues``),
and the counts the flow keeps (``MetricPoints``, ``LateMetrics``). Spans, logs and everything
else are in ``pipeline/model.py``; the binary form is in ``pipeline/batch_codec.py``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# OTLP metric point kinds (MetricBatch.kind) and aggregation temporalities.
METRIC_GAUGE, METRIC_SUM, METRIC_HISTOGRAM, METRIC_EXP_HISTOGRAM, METRIC_SUMMARY = 1, 2, 3, 4, 5
TEMPORALITY_DELTA, TEMPORALITY_CUMULATIVE = 1, 2

METRIC_COLUMNS = (
    ("service_idx", np.int32),
    ("instance_idx", np.int32),
    ("name_idx", np.int32),
    ("attrs_idx", np.int32),
    ("kind", np.int8),
    ("temporality", np.int8),
    ("monotonic", np.int8),
    ("start_ns", np.int64),
    ("time_ns", np.int64),
    ("value", np.float64),
    ("count", np.float64),
)


@dataclass(frozen=True, eq=False)
class MetricBatch:
    """Metric data points of one request, as columns: a row per point.

    String tables as in ``SpanBatch``: ``services``, ``instances``, metric ``names`` and
    ``attrs`` (a point's attributes, canonical: sorted ``key=value`` joined by ``,``; the
    series is (service, instance, name, attrs)). ``value`` is a gauge's or sum's value, and
    a histogram's (or summary's) sum of observations (NaN when it carries none); ``count``
    is a histogram's (or summary's) count of observations, 0 for gauges and sums.
    """

    services: tuple[str, ...]
    instances: tuple[str, ...]
    names: tuple[str, ...]
    attrs: tuple[str, ...]
    service_idx: np.ndarray
    instance_idx: np.ndarray
    name_idx: np.ndarray
    attrs_idx: np.ndarray
    kind: np.ndarray
    temporality: np.ndarray
    monotonic: np.ndarray
    start_ns: np.ndarray
    time_ns: np.ndarray
    value: np.ndarray
    count: np.ndarray
    received_ns: int = 0  # like SpanBatch.received_ns
    step: tuple[int, int] = (0, 0)  # set by the source, like SpanBatch.step

    def __len__(self) -> int:
        return int(self.time_ns.shape[0])

    def select(self, keep: np.ndarray) -> MetricBatch:
        """The points where ``keep`` (a boolean mask) is true; string tables kept as they are."""
        return dataclasses.replace(self, **{name: getattr(self, name)[keep] for name, _ in METRIC_COLUMNS})

    def check(self) -> None:
        """Raise ValueError unless every index points into its string table."""
        for col, table in (("service_idx", self.services), ("instance_idx", self.instances),
                           ("name_idx", self.names), ("attrs_idx", self.attrs)):  # fmt: skip
            idx = getattr(self, col)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(table)):
                raise ValueError(f"metric batch: {col} outside its table of {len(table)}")


@dataclass(frozen=True)
class MetricValues:
    """One OTLP metric of a service at a window's end: the latest value of each of its live
    series (``pipeline/metric_series.py``)."""

    name: str
    values: tuple[float, ...]  # per series: a gauge's or sum's latest value, a histogram's mean observation
    rates: tuple[float, ...]  # per series: per-second increase (sums, histogram counts); NaN when unknown
    instances: tuple[str, ...]  # distinct service.instance.id of the series
    fresh: bool  # a point of this metric arrived in the window


@dataclass(frozen=True)
class MetricPoints:
    """Metric points of one service that went into a closed window (counted by the flow)."""

    service: str
    window_start: int
    processed: int
    overflow: int  # of new series over metrics.max_series_per_service: left out


@dataclass(frozen=True)
class LateMetrics:
    """Metric points of a service for a window that had already closed (counted, not merged)."""

    service: str
    count: int


@dataclass
class MetricPartial:
    """Metric points of one batch that share a service and a window: a row per point,
    (time, name, instance, attrs, kind, temporality, monotonic, start, value, count)."""

    service: str
    window_start: int
    max_time_ns: int
    step: tuple[int, int]
    points: list[tuple]
