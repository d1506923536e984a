"""Decode OTLP requests (protobuf bytes or OTLP/JSON objects) into columnar batches.

Decoding is a pure function whose errors are data: a malformed request raises
``MalformedRequest`` (the receiver answers INVALID_ARGUMENT), while individual
invalid spans or log records are left out of the batch and reported as a
rejected count with a message (the receiver puts them in ``partial_success``).

Both wire forms fill the same column builders, so validation is written once.
"""

from __future__ import annotations

import base64
import dataclasses
import operator
from collections import Counter
from dataclasses import dataclass

import numpy as np
import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from pipeline import span_wire
from pipeline.model import LogBatch, SpanBatch
from pipeline.span_schema import TraceRequestSubset

UNKNOWN_SERVICE = "unknown_service"
MAX_ANYVALUE_DEPTH = 32


class MalformedRequest(ValueError):
    """The request bytes are not a valid OTLP message."""


@dataclass(frozen=True)
class Decoded:
    """Outcome of decoding one request."""

    batch: SpanBatch | LogBatch | None  # None when no item was valid (or the request was empty)
    received: int
    rejected: int
    message: str  # why items were rejected, or warnings about kept ones ('' when neither)
    future: int = 0  # of ``rejected``: items ending too far ahead of the receiver's clock


def accept_times(decoded: Decoded, now_ns: int, max_future_ns: int) -> Decoded:
    """Stamp the batch with its acceptance time and reject the items that end more than
    ``max_future_ns`` after ``now_ns`` (the receiver's clock): one client with a wrong clock must
    not move event time for everybody. Old items are kept (see README, Operations)."""
    batch = decoded.batch
    if batch is None:
        return decoded
    times = batch.end_ns if isinstance(batch, SpanBatch) else batch.time_ns
    ahead = times > now_ns + max_future_ns
    future = int(np.count_nonzero(ahead))
    if not future:
        return dataclasses.replace(decoded, batch=dataclasses.replace(batch, received_ns=now_ns))
    what = "spans" if isinstance(batch, SpanBatch) else "log records"
    why = f"{future} {what} ending more than {max_future_ns / 1e9:g} s after the receiver's clock"
    kept = batch.select(~ahead) if future < len(batch) else None
    return Decoded(
        batch=None if kept is None else dataclasses.replace(kept, received_ns=now_ns),
        received=decoded.received,
        rejected=decoded.rejected + future,
        message="; ".join(m for m in (decoded.message, why) if m),
        future=future,
    )


@dataclass(frozen=True)
class DecodeLimits:
    max_log_attributes: int = 16
    max_attribute_value_bytes: int = 4096


def _reason_message(reasons: Counter[str]) -> str:
    return "; ".join(f"{n} {what}" for what, n in sorted(reasons.items()))


# ---------------------------------------------------------------------------------- spans


_COLUMNS = ("name", "start", "end", "kind", "status", "trace_id", "span_id", "parent_span_id")


class _SpanColumns:
    """Accumulates span fields column by column from either wire form, then validates as arrays."""

    def __init__(self) -> None:
        self.services: dict[str, int] = {}
        self.instances: dict[str, int] = {}
        self.operations: dict[str, int] = {}
        self.service_idx: list[int] = []  # per resource
        self.instance_idx: list[int] = []
        self.spans: list[int] = []
        self.cols: tuple[list, ...] = tuple([] for _ in _COLUMNS)

    def add_resource(self, service: str, instance: str, columns, n: int) -> None:
        """``columns``: one iterable per name in ``_COLUMNS``, ``n`` spans each."""
        self.service_idx.append(self.services.setdefault(service, len(self.services)))
        self.instance_idx.append(self.instances.setdefault(instance, len(self.instances)))
        self.spans.append(n)
        for col, values in zip(self.cols, columns, strict=True):
            col.extend(values)

    def finish(self) -> Decoded:
        n = sum(self.spans)
        if n == 0:
            return Decoded(None, 0, 0, "")
        names, starts, ends, kinds, statuses, tids, sids, pids = self.cols
        ops = self.operations
        for name in dict.fromkeys(names):  # the distinct names, in order (C speed)
            ops.setdefault(name, len(ops))
        return _span_batch(
            services=tuple(self.services),
            operations=tuple(ops),
            instances=tuple(self.instances),
            service_idx=np.repeat(np.array(self.service_idx, dtype=np.int32), self.spans),
            instance_idx=np.repeat(np.array(self.instance_idx, dtype=np.int32), self.spans),
            op_idx=np.fromiter(map(ops.__getitem__, names), np.int32, n),
            kinds=np.fromiter(kinds, np.int64, n),
            statuses=np.fromiter(statuses, np.int64, n),
            start=np.fromiter(starts, np.uint64, n),
            end=np.fromiter(ends, np.uint64, n),
            trace_id=_id_column(tids, 16, n, allow_empty=False),
            span_id=_id_column(sids, 8, n, allow_empty=False),
            parent=_id_column(pids, 8, n, allow_empty=True),
        )


def _span_batch(
    *, services, operations, instances, service_idx, instance_idx, op_idx, kinds, statuses, start, end,
    trace_id, span_id, parent,
) -> Decoded:
    """Validates span columns (ids as ``(fixed-width array, valid mask)``) and makes the batch
    of the valid ones; both decoders end here."""
    n = len(start)
    trace_id, tid_ok = trace_id
    span_id, sid_ok = span_id
    parent, pid_ok = parent
    time_ok = end >= start
    ok = tid_ok & sid_ok & pid_ok & time_ok
    rejected = int(n - np.count_nonzero(ok))
    reasons: Counter[str] = Counter()
    if rejected:
        reasons["spans with trace_id not 16 non-zero bytes"] = int(n - tid_ok.sum())
        reasons["spans with span_id not 8 non-zero bytes"] = int(n - sid_ok.sum())
        reasons["spans with parent_span_id not empty or 8 bytes"] = int(n - pid_ok.sum())
        reasons["spans with end_time before start_time"] = int(n - time_ok.sum())
        reasons = Counter({k: v for k, v in reasons.items() if v})
    if rejected == n:
        return Decoded(None, n, n, _reason_message(reasons))
    cols = {
        "service_idx": service_idx,
        "op_idx": op_idx,
        "instance_idx": instance_idx,
        "kind": _known(kinds, 5),
        # unknown status codes (newer clients) are kept, clamped into our tables' range
        "status": np.clip(statuses, 0, 2).astype(np.int8),
        "end_ns": end.astype(np.int64),
        "duration_ns": (end - start).astype(np.int64),
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent,
    }
    if rejected:
        cols = {k: v[ok] for k, v in cols.items()}
    batch = SpanBatch(services=services, operations=operations, instances=instances, **cols)
    return Decoded(batch, n, rejected, _reason_message(reasons))


def _known(values: np.ndarray, highest: int) -> np.ndarray:
    """An enum column as int8: values outside 0..highest (open enums: any int32 on the wire,
    e.g. from a newer client) become 0, UNSPECIFIED; the span is kept."""
    values[(values < 0) | (values > highest)] = 0
    return values.astype(np.int8)


def _id_column(ids: tuple[bytes, ...], width: int, n: int, *, allow_empty: bool):
    """Fixed-width id array and a validity mask: the right length and not all zero, or for
    parent ids (``allow_empty``) empty or the right length (empty and all-zero both mean root)."""
    lengths = set(map(len, ids))
    if lengths == {width}:  # the common case, without a per-id array of lengths
        arr = np.frombuffer(b"".join(ids), dtype=f"S{width}").copy()
        # numpy compares fixed-width bytes without trailing NULs: all-zero ids == b""
        return arr, np.ones(n, dtype=bool) if allow_empty else arr != b""
    if allow_empty and lengths <= {0, width}:  # parent ids: roots have none
        zero = bytes(width)
        return np.frombuffer(b"".join([i or zero for i in ids]), dtype=f"S{width}").copy(), np.ones(n, dtype=bool)
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    right = lens == width
    arr = np.array([i if len(i) == width else b"" for i in ids], dtype=f"S{width}")
    if allow_empty:
        return arr, (lens == 0) | right
    return arr, right & (arr != b"")


def _resource_ids(attributes) -> tuple[str, str]:
    service, instance = UNKNOWN_SERVICE, ""
    for kv in attributes:
        if kv.key == "service.name":
            service = kv.value.string_value or UNKNOWN_SERVICE
        elif kv.key == "service.instance.id":
            instance = kv.value.string_value
    return service, instance


# Each column is read with one C-level attrgetter over the span objects: reading all fields of
# a span at once and transposing with zip(*rows) cost 0.32 us per span more (bench/replay_bench).
_SPAN_GETTERS = tuple(
    operator.attrgetter(f) for f in (
        "name", "start_time_unix_nano", "end_time_unix_nano", "kind", "status", "trace_id", "span_id",
        "parent_span_id",
    )
)  # fmt: skip


class _StatusCodes(dict):
    """Serialized ``Status`` -> its code; the usual forms are looked up, others parsed."""

    def __missing__(self, raw: bytes) -> int:
        try:
            return Status.FromString(raw).code
        except DecodeError as exc:
            raise MalformedRequest(f"malformed span status: {exc}") from exc


# Status is read as bytes (see pipeline/span_schema.py): no Status object per span.
_STATUS_CODE = _StatusCodes({b"": 0, b"\x18\x00": 0, b"\x18\x01": 1, b"\x18\x02": 2}).__getitem__


def decode_traces(data: bytes) -> Decoded:
    """ExportTraceServiceRequest bytes -> SpanBatch of the valid spans.

    The fields of ``pipeline/span_schema.py`` are read straight from the wire bytes by
    ``pipeline/span_wire.py``; a request it does not handle (malformed ones among them)
    is parsed with upb instead, with the same result or error.
    """
    walked = span_wire.walk(np.frombuffer(data, dtype=np.uint8))
    if walked[0] != span_wire.OK:
        return decode_traces_upb(data)
    _, ints, times, trace_id, span_id, parent, resources, names, n_names = walked
    n = ints.shape[1]
    if n == 0:
        return Decoded(None, 0, 0, "")
    services: dict[str, int] = {}
    instances: dict[str, int] = {}
    service_idx, instance_idx = [], []
    for sa, sb, ia, ib, _spans in resources.tolist():
        service = data[sa:sb].decode() or UNKNOWN_SERVICE
        service_idx.append(services.setdefault(service, len(services)))
        instance_idx.append(instances.setdefault(data[ia:ib].decode(), len(instances)))
    counts = resources[:, span_wire.SPANS]
    tid = trace_id.view("S16").ravel()
    sid = span_id.view("S8").ravel()
    pid = parent.view("S8").ravel()
    parent_len = ints[span_wire.PARENT_LEN]
    return _span_batch(
        services=tuple(services),
        operations=tuple(data[a:b].decode() for a, b in names[:n_names].tolist()),
        instances=tuple(instances),
        service_idx=np.repeat(np.array(service_idx, dtype=np.int32), counts),
        instance_idx=np.repeat(np.array(instance_idx, dtype=np.int32), counts),
        op_idx=ints[span_wire.NAME].astype(np.int32),
        kinds=ints[span_wire.KIND],
        statuses=ints[span_wire.STATUS],
        start=times[0],
        end=times[1],
        # numpy compares fixed-width bytes without trailing NULs: an all-zero id == b""
        trace_id=(tid, (ints[span_wire.TRACE_LEN] == 16) & (tid != b"")),
        span_id=(sid, (ints[span_wire.SPAN_LEN] == 8) & (sid != b"")),
        parent=(pid, (parent_len == 0) | (parent_len == 8)),
    )


def decode_traces_upb(data: bytes) -> Decoded:
    """``decode_traces`` through upb: parsed with the subset schema of the fields telepipe
    reads (``pipeline/span_schema.py``), each field read from the span objects. The
    reference the wire reader is tested against, and its fallback."""
    req = TraceRequestSubset()
    try:
        req.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise MalformedRequest(f"malformed ExportTraceServiceRequest: {exc}") from exc
    cols = _SpanColumns()
    name, start, end, kind, status, tid, sid, pid = _SPAN_GETTERS
    for rs in req.resource_spans:
        service, instance = _resource_ids(rs.resource.attributes)
        scopes = rs.scope_spans
        spans = scopes[0].spans if len(scopes) == 1 else [s for ss in scopes for s in ss.spans]
        spans = list(spans)  # one Python object per span, read by every column below
        columns = (
            map(name, spans), map(start, spans), map(end, spans), map(kind, spans),
            map(_STATUS_CODE, map(status, spans)), map(tid, spans), map(sid, spans), map(pid, spans),
        )  # fmt: skip
        cols.add_resource(service, instance, columns, len(spans))
    return cols.finish()


def _json_resource_ids(resource: dict) -> tuple[str, str]:
    service, instance = UNKNOWN_SERVICE, ""
    for kv in resource.get("attributes") or ():
        key = kv.get("key")
        if key == "service.name":
            service = (kv.get("value") or {}).get("stringValue") or UNKNOWN_SERVICE
        elif key == "service.instance.id":
            instance = (kv.get("value") or {}).get("stringValue") or ""
    return service, instance


def _hex(value: str | None) -> bytes:
    if not value:
        return b""
    try:
        return bytes.fromhex(value)
    except ValueError:
        return b"\x00"  # wrong length on purpose: rejected as an invalid id


def decode_traces_json(obj: dict) -> Decoded:
    """One OTLP/JSON ExportTraceServiceRequest (hex ids, int64 as strings) -> SpanBatch."""
    cols = _SpanColumns()
    try:
        for rs in obj.get("resourceSpans") or ():
            service, instance = _json_resource_ids(rs.get("resource") or {})
            rows = []
            for ss in rs.get("scopeSpans") or ():
                rows.extend(
                    [  # one row per span, transposed into columns below
                        (
                            s.get("name", ""),
                            int(s.get("startTimeUnixNano") or 0),
                            int(s.get("endTimeUnixNano") or 0),
                            int(s.get("kind") or 0),
                            int((s.get("status") or {}).get("code") or 0),
                            _hex(s.get("traceId")),
                            _hex(s.get("spanId")),
                            _hex(s.get("parentSpanId")),
                        )
                        for s in ss.get("spans") or ()
                    ]
                )
            columns = zip(*rows, strict=True) if rows else [()] * len(_COLUMNS)
            cols.add_resource(service, instance, columns, len(rows))
        return cols.finish()
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:  # e.g. a kind beyond int64
        raise MalformedRequest(f"malformed OTLP/JSON trace request: {exc}") from exc


# ----------------------------------------------------------------------------------- logs


def anyvalue_to_python(value, depth: int = 0):
    """protobuf AnyValue -> plain Python value (nested arrays/kvlists become lists/dicts)."""
    if depth > MAX_ANYVALUE_DEPTH:
        raise MalformedRequest(f"AnyValue nested deeper than {MAX_ANYVALUE_DEPTH} levels")
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [anyvalue_to_python(v, depth + 1) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: anyvalue_to_python(kv.value, depth + 1) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, which)


def _json_anyvalue_to_python(value: dict | None, depth: int = 0):
    if depth > MAX_ANYVALUE_DEPTH:
        raise MalformedRequest(f"AnyValue nested deeper than {MAX_ANYVALUE_DEPTH} levels")
    if not value:
        return None
    if "arrayValue" in value:
        return [_json_anyvalue_to_python(v, depth + 1) for v in value["arrayValue"].get("values") or ()]
    if "kvlistValue" in value:
        return {
            kv.get("key", ""): _json_anyvalue_to_python(kv.get("value"), depth + 1)
            for kv in value["kvlistValue"].get("values") or ()
        }
    if "intValue" in value:
        return int(value["intValue"])
    for key in ("stringValue", "boolValue", "doubleValue", "bytesValue"):
        if key in value:
            return value[key]
    return None


def render_value(value) -> str:
    """Plain Python value -> the string telepipe shows (strings as they are, the rest as JSON)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return orjson.dumps(value).decode()


class _LogColumns:
    """Accumulates log records a scope at a time into columns, validated as arrays at the end."""

    _NAMES = ("time", "observed", "severity", "severity_text", "body", "trace_id", "span_id", "attrs")

    def __init__(self, limits: DecodeLimits, attribute) -> None:
        """``attribute``: one attribute of the wire form -> (key, python value)."""
        self.limits = limits
        self.attribute = attribute
        self.warnings: Counter[str] = Counter()  # kept, but not whole: told to the client, count 0
        self.raw: dict[str, list] = {k: [] for k in (*self._NAMES, "service", "instance")}

    def add_scope(self, service, instance, time_ns, observed_ns, severity, severity_text, bodies, tids, sids, attrs):
        """One scope's records as equal-length iterables: times and severity numbers as ints,
        ``bodies`` rendered, ids as bytes, ``attrs`` one list of attributes per record (of which
        at most ``max_log_attributes`` are read)."""
        raw = self.raw
        for name, values in zip(self._NAMES, (time_ns, observed_ns, severity, severity_text, bodies, tids, sids, attrs)):
            raw[name].extend(values)
        n = len(raw["time"]) - len(raw["service"])
        raw["service"].extend([service] * n)
        raw["instance"].extend([instance] * n)

    def _attributes(self, attributes) -> dict[str, str]:
        limit = self.limits.max_attribute_value_bytes
        kept = {}
        for attribute in attributes:
            if len(kept) >= self.limits.max_log_attributes:
                break
            key, val = self.attribute(attribute)
            text = render_value(val)
            if len(text) > limit:
                self.warnings[f"log attribute values longer than {limit} characters (cut)"] += 1
                text = text[:limit]
            kept[key] = text
        return kept

    def finish(self) -> Decoded:
        raw = self.raw
        n = len(raw["time"])
        if n == 0:
            return Decoded(None, 0, 0, "")
        reasons: Counter[str] = Counter()
        limit_n = self.limits.max_log_attributes
        over = int(np.count_nonzero(np.fromiter(map(len, raw["attrs"]), np.int64, n) > limit_n))
        if over:
            self.warnings[f"log records with more than {limit_n} attributes (the rest dropped)"] = over
        t = np.fromiter(raw["time"], np.uint64, n)
        t = np.where(t != 0, t, np.fromiter(raw["observed"], np.uint64, n))
        tl = np.fromiter(map(len, raw["trace_id"]), np.int64, n)
        sl = np.fromiter(map(len, raw["span_id"]), np.int64, n)
        ids_ok = ((tl == 0) | (tl == 16)) & ((sl == 0) | (sl == 8))
        ok = ids_ok & (t != 0)
        cols = {k: raw[k] for k in ("severity", "severity_text", "body", "trace_id", "span_id", "attrs", "service",
                                    "instance")}  # fmt: skip
        if not ok.all():
            bad_ids = int(n - ids_ok.sum())
            if bad_ids:
                reasons["log records with trace_id/span_id of the wrong length"] = bad_ids
            if int(n - ok.sum()) > bad_ids:
                reasons["log records with neither time_unix_nano nor observed_time_unix_nano"] = int(
                    n - ok.sum() - bad_ids
                )
            keep = np.flatnonzero(ok).tolist()
            t = t[ok]
            cols = {k: [v[i] for i in keep] for k, v in cols.items()}
        kept = len(t)
        if not kept:
            return Decoded(None, n, n, _reason_message(reasons + self.warnings))
        batch = LogBatch(
            time_ns=t.astype(np.int64),
            severity=np.clip(np.fromiter(cols["severity"], np.int64, kept), 0, 24).astype(np.int8),
            severity_text=cols["severity_text"],
            body=cols["body"],
            trace_id=[h if h.strip("0") else "" for h in map(bytes.hex, cols["trace_id"])],
            span_id=[h if h.strip("0") else "" for h in map(bytes.hex, cols["span_id"])],
            service=cols["service"],
            instance=cols["instance"],
            attributes=[self._attributes(a) if len(a) else {} for a in cols["attrs"]],
        )
        msg = _reason_message(reasons + self.warnings)  # attribute values cut while rendering
        return Decoded(batch, n, n - kept, msg)


_LOG_GETTERS = tuple(
    operator.attrgetter(f) for f in (
        "time_unix_nano", "observed_time_unix_nano", "severity_number", "severity_text", "body", "trace_id",
        "span_id", "attributes",
    )
)  # fmt: skip
_WHICH_VALUE = operator.methodcaller("WhichOneof", "value")


def _proto_attribute(kv) -> tuple[str, object]:
    return kv.key, anyvalue_to_python(kv.value)


def decode_logs(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """ExportLogsServiceRequest bytes -> LogBatch of the valid records."""
    req = ExportLogsServiceRequest()
    try:
        req.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise MalformedRequest(f"malformed ExportLogsServiceRequest: {exc}") from exc
    cols = _LogColumns(limits, _proto_attribute)
    time_, observed, sev, sev_text, body, tid, sid, attrs = _LOG_GETTERS
    try:
        for rl in req.resource_logs:
            service, instance = _resource_ids(rl.resource.attributes)
            for sl in rl.scope_logs:
                recs = list(sl.log_records)  # one Python object per record, read by every column
                bodies = list(map(body, recs))
                rendered = [
                    b.string_value if w == "string_value" else render_value(anyvalue_to_python(b))
                    for b, w in zip(bodies, map(_WHICH_VALUE, bodies))
                ]
                cols.add_scope(
                    service, instance, map(time_, recs), map(observed, recs), map(sev, recs), map(sev_text, recs),
                    rendered, map(tid, recs), map(sid, recs), map(attrs, recs),
                )  # fmt: skip
        return cols.finish()  # renders the attributes
    except RecursionError as exc:
        raise MalformedRequest("AnyValue nested too deeply") from exc


def _json_attribute(kv: dict) -> tuple[str, object]:
    return kv.get("key", ""), _json_anyvalue_to_python(kv.get("value"))


def decode_logs_json(obj: dict, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """One OTLP/JSON ExportLogsServiceRequest -> LogBatch."""
    cols = _LogColumns(limits, _json_attribute)
    try:
        for rl in obj.get("resourceLogs") or ():
            service, instance = _json_resource_ids(rl.get("resource") or {})
            for sl in rl.get("scopeLogs") or ():
                recs = sl.get("logRecords") or ()
                cols.add_scope(
                    service, instance,
                    [int(r.get("timeUnixNano") or 0) for r in recs],
                    [int(r.get("observedTimeUnixNano") or 0) for r in recs],
                    [int(r.get("severityNumber") or 0) for r in recs],
                    [r.get("severityText", "") for r in recs],
                    [render_value(_json_anyvalue_to_python(r.get("body"))) for r in recs],
                    [_hex(r.get("traceId")) for r in recs], [_hex(r.get("spanId")) for r in recs],
                    [r.get("attributes") or () for r in recs],
                )  # fmt: skip
        return cols.finish()  # renders the attributes
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise MalformedRequest(f"malformed OTLP/JSON log request: {exc}") from exc


def decode_json_line(line: bytes, limits: DecodeLimits = DecodeLimits()) -> list[Decoded]:
    """One line of the Collector's file exporter: a trace and/or logs request."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedRequest("an OTLP/JSON line must be a JSON object")
    out = []
    if "resourceSpans" in obj:
        out.append(decode_traces_json(obj))
    if "resourceLogs" in obj:
        out.append(decode_logs_json(obj, limits))
    return out
