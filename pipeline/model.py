"""Domain records: columnar span and log batches, window results.

One OTLP request becomes one batch. Spans are kept as numpy columns plus small
string tables, so that every later stage works on arrays, not per-span objects.
Batches serialize to a compact binary form (``to_bytes``/``from_bytes``) that is
what the spool stores, so the receiver decodes each request exactly once.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

# OTLP span kinds and status codes as they appear on the wire.
SPAN_KINDS = (
    "SPAN_KIND_UNSPECIFIED",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_CONSUMER",
)
STATUS_CODES = ("STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR")
STATUS_ERROR = 2
KIND_SERVER = 2
KIND_CLIENT = 3

# Operation name that stands for every operation over a service's cardinality limit.
OVERFLOW_OPERATION = "__overflow__"

_SPAN_COLUMNS = (
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

_MAGIC_SPANS = b"TPS1"
_MAGIC_LOGS = b"TPL1"
_HEADER = struct.Struct("<4sII")  # magic, header json length, row count


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
    # Set by the source, not stored: (partition, step number) of the read step this
    # batch came in. Watermarks advance only between steps (see pipeline/windows.py).
    step: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.end_ns.shape[0])

    def to_bytes(self) -> bytes:
        head = {"s": self.services, "o": self.operations, "i": self.instances}
        if self.received_ns:
            head["r"] = self.received_ns
        head = orjson.dumps(head)
        parts = [_HEADER.pack(_MAGIC_SPANS, len(head), len(self)), head]
        for name, _dtype in _SPAN_COLUMNS:
            parts.append(getattr(self, name).tobytes())
        return b"".join(parts)

    @staticmethod
    def from_bytes(data: bytes | memoryview) -> SpanBatch:
        magic, hlen, n = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC_SPANS:
            raise ValueError("not a span batch")
        pos = _HEADER.size
        head = orjson.loads(bytes(data[pos : pos + hlen]))
        pos += hlen
        cols = {}
        for name, dtype in _SPAN_COLUMNS:
            dt = np.dtype(dtype)
            size = dt.itemsize * n
            if pos + size > len(data):
                raise ValueError("truncated span batch")
            cols[name] = np.frombuffer(data, dtype=dt, count=n, offset=pos)
            pos += size
        batch = SpanBatch(
            services=tuple(head["s"]),
            operations=tuple(head["o"]),
            instances=tuple(head["i"]),
            received_ns=int(head.get("r", 0)),
            **cols,
        )
        batch.check()
        return batch

    def select(self, keep: np.ndarray) -> SpanBatch:
        """The spans where ``keep`` (a boolean mask) is true; string tables kept as they are."""
        return dataclasses.replace(self, **{name: getattr(self, name)[keep] for name, _ in _SPAN_COLUMNS})

    def check(self) -> None:
        """Raise ValueError unless every index points into its string table."""
        for col, table in (("service_idx", self.services), ("op_idx", self.operations),
                           ("instance_idx", self.instances)):  # fmt: skip
            idx = getattr(self, col)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(table)):
                raise ValueError(f"span batch: {col} outside its table of {len(table)}")

    @staticmethod
    def concat(batches: list[SpanBatch]) -> SpanBatch:
        """One batch of several (order kept), string tables merged.

        Fewer, larger batches mean less per-batch overhead downstream (the
        recordings and many SDKs send a few dozen spans per request).
        """
        if len(batches) == 1:
            return batches[0]
        tables: dict[str, dict[str, int]] = {"services": {}, "operations": {}, "instances": {}}
        cols: dict[str, list[np.ndarray]] = {name: [] for name, _ in _SPAN_COLUMNS}
        remap = {"services": "service_idx", "operations": "op_idx", "instances": "instance_idx"}
        for b in batches:
            for table, col in remap.items():
                merged = tables[table]
                mapping = np.fromiter(
                    (merged.setdefault(x, len(merged)) for x in getattr(b, table)), np.int32, len(getattr(b, table))
                )
                cols[col].append(mapping[getattr(b, col)] if len(b) else getattr(b, col))
            for name, _ in _SPAN_COLUMNS:
                if name not in remap.values():
                    cols[name].append(getattr(b, name))
        return SpanBatch(
            services=tuple(tables["services"]),
            operations=tuple(tables["operations"]),
            instances=tuple(tables["instances"]),
            received_ns=max(b.received_ns for b in batches),
            **{name: np.concatenate(parts) for name, parts in cols.items()},
        )

    def last_end_ns(self) -> int:
        return int(self.end_ns.max()) if len(self) else 0


def progress_ns(event_ns: int, received_ns: int) -> int:
    """How far a batch whose newest event time is ``event_ns`` moves event time (watermarks, the
    service graph's generations): never past the moment it was accepted. A client whose clock
    runs ahead (by less than ``otlp.max_future_s``: more is rejected at the door) then keeps its
    own windows open until real time reaches them, instead of making everyone else's spans late."""
    return min(event_ns, received_ns) if received_ns else event_ns


class Steps:
    """Numbers the steps of one source partition and stamps them on its span batches."""

    def __init__(self, partition: int, next_seq: int = 0) -> None:
        self.partition = partition
        self.next_seq = next_seq

    def stamp(self, step: list[SpanBatch | LogBatch]) -> list[SpanBatch | LogBatch]:
        mark = (self.partition, self.next_seq)
        self.next_seq += 1
        return [dataclasses.replace(b, step=mark) for b in step]


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
        lists = {name: [getattr(self, name)[i] for i in rows] for name in _LOG_LISTS}
        if self.attributes:
            lists["attributes"] = [self.attributes[i] for i in rows]
        return dataclasses.replace(self, time_ns=self.time_ns[keep], severity=self.severity[keep], **lists)

    def to_bytes(self) -> bytes:
        head = orjson.dumps(
            {
                "st": self.severity_text,
                "b": self.body,
                "t": self.trace_id,
                "sp": self.span_id,
                "s": self.service,
                "i": self.instance,
                "a": self.attributes,
                **({"r": self.received_ns} if self.received_ns else {}),
            }
        )
        return b"".join(
            (
                _HEADER.pack(_MAGIC_LOGS, len(head), len(self)),
                head,
                self.time_ns.astype(np.int64).tobytes(),
                self.severity.astype(np.int8).tobytes(),
            )
        )

    @staticmethod
    def from_bytes(data: bytes | memoryview) -> LogBatch:
        magic, hlen, n = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC_LOGS:
            raise ValueError("not a log batch")
        pos = _HEADER.size
        head = orjson.loads(bytes(data[pos : pos + hlen]))
        pos += hlen
        if pos + 9 * n > len(data):
            raise ValueError("truncated log batch")
        time_ns = np.frombuffer(data, dtype=np.int64, count=n, offset=pos)
        severity = np.frombuffer(data, dtype=np.int8, count=n, offset=pos + 8 * n)
        return LogBatch(
            time_ns=time_ns,
            severity=severity,
            severity_text=head["st"],
            body=head["b"],
            trace_id=head["t"],
            span_id=head["sp"],
            service=head["s"],
            instance=head["i"],
            attributes=head["a"],
            received_ns=int(head.get("r", 0)),
        )


_LOG_LISTS = ("severity_text", "body", "trace_id", "span_id", "service", "instance")


def coalesce(batches: list[SpanBatch | LogBatch], max_spans: int = 8192) -> list[SpanBatch | LogBatch]:
    """The span batches of one read step merged (up to ``max_spans`` each, order kept), then its
    log batches as they came.

    Spans and logs take separate paths and a step is one unit for watermarks, so their order
    within a step changes nothing downstream; merging across interleaved log requests (the
    recordings alternate them) made the x16 replay's span batches 3 requests long instead of
    16, and every downstream step pays per batch (the service graph join: 353 against 130 ns
    per span)."""
    out: list[SpanBatch | LogBatch] = []
    run: list[SpanBatch] = []
    size = 0
    for b in batches:
        if not isinstance(b, SpanBatch):
            continue
        if run and size + len(b) > max_spans:
            out.append(SpanBatch.concat(run))
            run, size = [], 0
        run.append(b)
        size += len(b)
    if run:
        out.append(SpanBatch.concat(run))
    out.extend(b for b in batches if not isinstance(b, SpanBatch))
    return out


def batch_from_bytes(data: bytes | memoryview) -> SpanBatch | LogBatch:
    """Decode a spooled batch of either kind."""
    magic = bytes(data[:4])
    if magic == _MAGIC_SPANS:
        return SpanBatch.from_bytes(data)
    if magic == _MAGIC_LOGS:
        return LogBatch.from_bytes(data)
    raise ValueError(f"unknown batch type {magic!r}")


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
    silent_run: int = 0  # windows in a row, this one included, in which the service sent nothing

    @property
    def calls(self) -> int:
        """Spans of every operation of the service in this window."""
        return sum(r.count for r in self.results)


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
