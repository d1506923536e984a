"""Domain records: columnar span and log batches, window results.

One OTLP request becomes one batch. Spans are kept as numpy columns plus small
string tables, so that every later stage works on arrays, not per-span objects.
Their binary form (what the spool stores, so the receiver decodes each request
exactly once) is in ``pipeline/batch_codec.py``. Every record the stages pass on
is here too: pre-aggregates, window results, late counts, expiries, anomaly and
scaling updates and events; plain frozen dataclasses, importing nothing of the
engine, the analysis or the sinks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.metric_model import MetricValues

# OTLP span kinds and status codes as they appear on the wire.
SPAN_KINDS = ("SPAN_KIND_UNSPECIFIED", "SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT",
              "SPAN_KIND_PRODUCER", "SPAN_KIND_CONSUMER")  # fmt: skip
STATUS_CODES = ("STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR")
STATUS_ERROR = 2
KIND_SERVER = 2
KIND_CLIENT = 3

# Alert states as /metrics shows them (telepipe_alert_state).
STATE_VALUE = {"ok": 0, "pending": 1, "firing": 2}

# Operation name that stands for every operation over a service's cardinality limit.
OVERFLOW_OPERATION = "__overflow__"

SPAN_COLUMNS = (
    ("service_idx", np.int32),
    ("op_idx", np.int32),
    ("instance_idx", np.int32),
    ("kind", np.int8),
    ("status", np.int8),
    ("end_ns", np.int64),
    ("duration_ns", np.int64),
    ("trace_id", "S16"),
    ("span_id", "S8"),
    ("parent_span_id", "S8"),
)

@dataclass(frozen=True, eq=False)
class SpanBatch:
    """Spans of one request, as columns.

    ``services``, ``operations`` and ``instances`` are string tables; the
    ``*_idx`` columns index into them. Durations and end times are nanoseconds.
    Ids are fixed-width bytes (all-zero ``parent_span_id`` means a root span).
    """

    services: tuple[str, ...]
    operations: tuple[str, ...]
    instances: tuple[str, ...]
    service_idx: np.ndarray
    op_idx: np.ndarray
    instance_idx: np.ndarray
    kind: np.ndarray
    status: np.ndarray
    end_ns: np.ndarray
    duration_ns: np.ndarray
    trace_id: np.ndarray
    span_id: np.ndarray
    parent_span_id: np.ndarray
    # When the receiver accepted the request (unix ns, its clock; 0: unknown, as in OTLP/JSON
    # recordings). Stored with the batch, so replaying a native recording sees the same value.
    received_ns: int = 0
    # Adjusted counts (int32, ``pipeline/sampling.py``): how many spans each one stands for, from
    # its tracestate's ``ot=th`` sampling threshold. None: every span stands for itself.
    weight: np.ndarray | None = None
    # Span attributes read (only those asked for: ``DecodeLimits.span_attributes``): ``attrs[j]``
    # indexes ``attr_values`` with each span's value of ``attr_keys[j]`` (int32, -1: absent).
    attr_keys: tuple[str, ...] = ()
    attr_values: tuple[str, ...] = ()
    attrs: np.ndarray | None = None
    # Set by the source, not stored: (partition, step number) of the read step this
    # batch came in. Watermarks advance only between steps (see pipeline/windows.py).
    step: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.end_ns.shape[0])

    def select(self, keep: np.ndarray) -> SpanBatch:
        """The spans where ``keep`` (a boolean mask) is true; string tables kept as they are."""
        cols = {name: getattr(self, name)[keep] for name, _ in SPAN_COLUMNS}
        return dataclasses.replace(
            self, **cols, weight=None if self.weight is None else self.weight[keep],
            attrs=None if self.attrs is None else self.attrs[:, keep],
        )  # fmt: skip

    def check(self) -> None:
        """Raise ValueError unless every index points into its string table."""
        for col, table in (("service_idx", self.services), ("op_idx", self.operations),
                           ("instance_idx", self.instances)):  # fmt: skip
            idx = getattr(self, col)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(table)):
                raise ValueError(f"span batch: {col} outside its table of {len(table)}")
        if self.attrs is not None and self.attrs.size:
            if self.attrs.shape != (len(self.attr_keys), len(self)):
                raise ValueError("span batch: attribute columns of the wrong shape")
            if int(self.attrs.min()) < -1 or int(self.attrs.max()) >= len(self.attr_values):
                raise ValueError(f"span batch: attribute values outside their table of {len(self.attr_values)}")

    def last_end_ns(self) -> int:
        return int(self.end_ns.max()) if len(self) else 0

    def attribute(self, *keys: str) -> np.ndarray | None:
        """Per span, the index into ``attr_values`` of the first of ``keys`` it has (-1: none); None: none read."""
        cols = [self.attrs[self.attr_keys.index(k)] for k in keys if k in self.attr_keys and self.attrs is not None]
        for c in cols[1:]:
            cols[0] = np.where(cols[0] >= 0, cols[0], c)
        return cols[0] if cols else None

    def weights(self) -> np.ndarray:
        """Each span's adjusted count (ones when the batch has none)."""
        return self.weight if self.weight is not None else np.ones(len(self), dtype=np.int32)


def progress_ns(event_ns: int, received_ns: int) -> int:
    """How far a batch whose newest event time is ``event_ns`` moves event time (watermarks, the
    service graph's generations): never past the moment it was accepted. A client whose clock
    runs ahead (by less than ``otlp.max_future_s``: more is rejected at the door) then keeps its
    own windows open until real time reaches them, instead of making everyone else's spans late."""
    return min(event_ns, received_ns) if received_ns else event_ns


@dataclass(frozen=True, eq=False)
class LogBatch:
    """Log records of one request, as parallel columns.

    ``trace_id``/``span_id`` are lowercase hex ('' when absent). ``attributes``
    holds a bounded set of attributes per record, values rendered as strings.
    """

    time_ns: np.ndarray  # int64, time_unix_nano (observed time when unset)
    severity: np.ndarray  # int8, OTLP severity number (0 = unspecified)
    severity_text: list[str]
    body: list[str]
    trace_id: list[str]
    span_id: list[str]
    service: list[str]
    instance: list[str]
    attributes: list[dict[str, str]] = field(default_factory=list)
    received_ns: int = 0  # like SpanBatch.received_ns
    step: tuple[int, int] = (0, 0)  # set by the source, like SpanBatch.step

    def __len__(self) -> int:
        return int(self.time_ns.shape[0])

    def select(self, keep: np.ndarray) -> LogBatch:
        """The records where ``keep`` (a boolean mask) is true."""
        rows = np.flatnonzero(keep).tolist()
        lists: dict[str, Any] = {name: [getattr(self, name)[i] for i in rows] for name in _LOG_LISTS}
        if self.attributes:
            lists["attributes"] = [self.attributes[i] for i in rows]
        return dataclasses.replace(self, time_ns=self.time_ns[keep], severity=self.severity[keep], **lists)

_LOG_LISTS = ("severity_text", "body", "trace_id", "span_id", "service", "instance")


@dataclass(frozen=True)
class WindowResult:
    """One closed event-time window of one (service, operation, span kind)."""

    service: str
    operation: str
    span_kind: int
    window_start: int  # unix ns
    window_end: int  # unix ns
    count: int
    errors: int
    p50: float  # seconds
    p90: float
    p95: float
    p99: float
    max: float
    sum: float  # seconds, all spans
    status_counts: tuple[int, int, int]  # unset, ok, error
    bucket_counts: tuple[tuple[int, ...], ...]  # per status, per explicit bucket (+Inf last)
    status_sums: tuple[float, float, float]
    slow_traces: tuple[str, ...] = ()  # trace ids of the slowest spans, slowest first
    error_traces: tuple[str, ...] = ()  # trace ids of error spans
    slow_durations: tuple[float, ...] = ()  # seconds, of the spans of ``slow_traces`` (exemplars)

    def to_json(self) -> dict:
        return {
            "type": "window",
            "service": self.service,
            "operation": self.operation,
            "span_kind": SPAN_KINDS[self.span_kind]
            if 0 <= self.span_kind < len(SPAN_KINDS)
            else str(self.span_kind),
            "window_start": self.window_start,
            "window_end": self.window_end,
            "count": self.count,
            "errors": self.errors,
            "p50": self.p50,
            "p90": self.p90,
            "p95": self.p95,
            "p99": self.p99,
            "max": self.max,
        }


@dataclass(frozen=True)
class Dependency:
    """Sampled calls from a service to one other service in a window (pipeline/servicegraph.py)."""

    callee: str
    calls: int
    errors: int
    mean_duration: float  # seconds, of the callee's spans


@dataclass(frozen=True)
class ServiceWindow:
    """Everything one service did in one closed window (input of anomaly detection and scaling)."""

    service: str
    window_start: int
    window_end: int
    results: tuple[WindowResult, ...]  # one per (operation, span kind), sorted
    instances: tuple[str, ...]  # distinct service.instance.id seen
    logs: int
    error_logs: int  # severity ERROR or worse
    server_calls: int  # SERVER spans
    server_errors: int
    server_p95: float  # seconds, over all SERVER spans (NaN when none)
    dependencies: tuple[Dependency, ...] = ()  # services this one called (sampled traces)
    silent_run: int = 0  # windows in a row, this one included, without spans, logs or calls from the service
    metrics: tuple[MetricValues, ...] = ()  # the service's OTLP metrics at the window's end (metric_model.py)
    idle_run: int = 0  # windows in a row, this one included, in which the service sent nothing (metrics neither)
    blind: bool = False  # an empty window in which nobody sent anything either (a gap in the input): not judged
    gap: bool = False  # a stretch of it without anyone's data (a gap in the input): its rates are not judged

    def metric(self, name: str) -> MetricValues | None:
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def calls(self) -> int:
        """Spans of every operation of the service in this window."""
        return sum(r.count for r in self.results)


@dataclass(frozen=True)
class Tick:
    """A source step read data from other services in these windows while this one sent nothing
    in that step: its empty windows there are silence, not a gap in the input. ``gaps``: stretches
    of event time (unix ns, [start, end)) in which nobody's data was read."""

    service: str
    windows: tuple[int, ...]  # window starts (unix ns) the step read data in
    step: tuple[int, int]
    gaps: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TemplatedSpans:
    """Spans counted under their name's template (``/users/{id}``: pipeline/span_names.py) because
    the service's names with ids would not fit under its operation limit otherwise."""

    service: str
    count: int


@dataclass(frozen=True)
class LateSpans:
    """Spans that arrived for a window that had already closed (counted, not merged)."""

    service: str
    operation: str
    span_kind: int
    count: int


@dataclass(frozen=True)
class LateLogs:
    """Log records of a service for a window that had already closed: counted in no window
    (they still go to Loki: the records themselves are not dropped)."""

    service: str
    count: int


@dataclass(frozen=True)
class LateEdges:
    """Sampled calls from a service for a window that had already closed (counted, not merged)."""

    service: str
    count: int


@dataclass(frozen=True)
class KeyExpired:
    """A (service, operation, kind) key without spans for ``prometheus.stale_after_s`` while its
    service kept sending: no longer judged; sinks drop its series."""

    service: str
    operation: str
    span_kind: int
    time: int  # unix ns: start of the window that retired it


@dataclass(frozen=True)
class ServiceExpired:
    """A service that sent nothing for ``prometheus.service_stale_after_s``: its state is gone;
    sinks drop its series and scaling signal."""

    service: str
    time: int  # unix ns: start of the window that retired it


# -- aggregates of one read step (pre-aggregation, the service-graph join) -----------------


@dataclass
class Partial:
    """Aggregates of one batch's spans of one service in one window: a row per (operation, kind).

    Columnar so that a batch touching thousands of operations is a handful of
    items and array operations, not an object per operation."""

    service: str
    window_start: int
    max_end_ns: int
    step: tuple[int, int]  # (source partition, step number) it was read in
    operations: list[str]  # per row
    kinds: list[int]  # per row
    row_end_ns: list[int]  # per row: newest span end (the cardinality limiter's last seen)
    status_counts: np.ndarray  # int64[rows, 3]: unset, ok, error
    bucket_counts: np.ndarray  # int64[rows, 3, len(bounds) + 1]
    status_sums: np.ndarray  # float64[rows, 3], seconds
    zero: np.ndarray  # int64[rows]: spans of zero duration (the sketch's zero bucket)
    vmin: np.ndarray  # float64[rows], seconds
    vmax: np.ndarray
    sk_row: np.ndarray  # sketch buckets: row, bucket index, count (sorted by row, then index)
    sk_idx: np.ndarray
    sk_cnt: np.ndarray
    slow_row: np.ndarray  # exemplars: the slowest spans of each row, slowest first
    slow_dur: np.ndarray  # float64 seconds
    slow_trace: np.ndarray  # S16 trace ids
    err_row: np.ndarray  # trace ids of error spans of each row (the slowest ones first)
    err_trace: np.ndarray
    instances: tuple[str, ...] = ()  # distinct service.instance.id values (sorted, none empty)

    @property
    def count(self) -> int:
        return int(self.status_counts.sum())


@dataclass
class LogPartial:
    """Log records of one batch that share a service and a window."""

    service: str
    window_start: int
    max_time_ns: int
    step: tuple[int, int]
    records: int
    errors: int  # severity ERROR or worse (number >= 17)


@dataclass
class EdgePartial:
    """Sampled calls from ``service`` (the caller) to ``callee`` in one window, from one step."""

    service: str
    callee: str
    window_start: int
    max_end_ns: int
    step: tuple[int, int]
    calls: int
    errors: int
    duration_sum: float  # seconds, of the callee's spans


# -- analysis: anomaly updates and alerts, scaling updates and events --------------------------


@dataclass(frozen=True)
class Judgement:
    """One feature of one window: observed value, band, directional z-score."""

    feature: str
    observed: float
    expected: float
    lower: float
    upper: float
    z: float  # signed distance from expected in sigmas; 0 when not judged
    judged: bool  # False while learning or with too few calls


@dataclass(frozen=True)
class AnomalyUpdate:
    """Per key and window: what /metrics shows about its anomaly state."""

    service: str
    operation: str  # "" for the service-level key
    span_kind: int  # -1 for the service-level key
    time: int  # window start, unix ns
    score: float  # max directional |z| / k over judged features (>= 1 means anomalous)
    hst_score: float
    learning: bool
    state: str  # ok, pending, firing
    judgements: tuple[Judgement, ...]


@dataclass(frozen=True)
class AlertEvent:
    service: str
    operation: str
    span_kind: int
    state: str  # pending, firing, resolved
    time: int  # unix ns: start of the window that caused the change
    feature: str
    observed: float
    expected: float
    lower: float
    upper: float
    score: float
    source: str  # "detector" or "rule:<name>"
    trace_ids: tuple[str, ...] = ()
    ranking: tuple[dict, ...] = ()  # with firing: operations contributing most
    reason: str = ""  # with resolved: "expired" (key or service retired), "rule_removed"; else ''

    def to_json(self) -> dict:
        doc = {
            "type": "alert",
            "state": self.state,
            "service": self.service,
            "time": self.time,
            "feature": self.feature,
            "observed": _num(self.observed),
            "expected": _num(self.expected),
            "band": [_num(self.lower), _num(self.upper)],
            "score": _num(self.score),
            "source": self.source,
            "trace_ids": list(self.trace_ids),
        }
        if self.operation:
            doc["operation"] = self.operation
            doc["span_kind"] = kind_name(self.span_kind)
        if self.ranking:
            doc["ranking"] = list(self.ranking)
        if self.reason:
            doc["reason"] = self.reason
        return doc


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else round(x, 9)


def kind_name(kind: int) -> str:
    return SPAN_KINDS[kind] if 0 <= kind < len(SPAN_KINDS) else str(kind)


@dataclass(frozen=True)
class ScalingUpdate:
    """Per service and window: the gauges."""

    service: str
    time: int  # window start, unix ns
    observed: int
    desired: int
    reason: str
    reason_code: str  # low-cardinality: which rule decided (a label on /metrics)
    call_rate: float
    forecast_rate: float


@dataclass(frozen=True)
class ScalingEvent:
    service: str
    time: int
    observed: int
    desired: int
    reason: str
    reason_code: str

    def to_json(self) -> dict:
        return {
            "type": "scaling",
            "service": self.service,
            "time": self.time,
            "observed": self.observed,
            "desired": self.desired,
            "reason": self.reason,
            "reason_code": self.reason_code,
        }
