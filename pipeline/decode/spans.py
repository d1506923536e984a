"""OTLP trace requests -> ``SpanBatch``: protobuf bytes read by the compiled wire reader
(``span_wire``; upb parses what it hands over, with the subset schema of ``span_schema``),
or OTLP/JSON objects. Both fill the same columns, validated once (``_span_batch``)."""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Sequence

import numpy as np
import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from pipeline.decode import span_attributes, span_wire
from pipeline.decode.common import UNKNOWN_SERVICE, Decoded, DecodeLimits, MalformedRequest, _reason_message, parse
from pipeline.decode.span_events import exception_types, json_exception_type, with_exception_types
from pipeline.decode.span_schema import TraceRequestSubset, TraceRequestWithAttributes, TraceResources
from pipeline.model import SpanBatch
from pipeline.sampling import adjusted_count, integer_weights

_COLUMNS = ("name", "start", "end", "kind", "status", "trace_id", "span_id", "parent_span_id", "trace_state")


class _SpanColumns:
    """Accumulates span fields column by column from either wire form, then validates as arrays."""

    def __init__(self, attribute_keys: tuple[str, ...] = ()) -> None:
        self.attribute_keys = attribute_keys
        self.attributes: list[tuple[str | None, ...]] = []  # per span: its value of each key, None: absent
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

    def finish(self, exceptions: list[str | None] | None = None) -> Decoded:
        n = sum(self.spans)
        if n == 0:
            return Decoded(None, 0, 0, "")
        names, starts, ends, kinds, statuses, tids, sids, pids, states = self.cols
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
            adjusted=_adjusted(states),
            attributes=with_exception_types(
                _attribute_columns(self.attribute_keys, self.attributes) if self.attribute_keys else None,
                self.attribute_keys, n, exceptions,
            ),
        )  # fmt: skip


def _attribute_columns(keys: tuple[str, ...], rows: list[tuple[str | None, ...]]):
    """Per-span values of the read attribute keys (None: absent) -> (keys, value table, int32
    indexes [keys, spans], -1 absent)."""
    table: dict[str, int] = {}
    idx = np.full((len(keys), len(rows)), -1, dtype=np.int32)
    for j in range(len(keys)):
        col = [row[j] for row in rows]
        present = [i for i, v in enumerate(col) if v]
        if present:
            idx[j, present] = [table.setdefault(col[i], len(table)) for i in present]  # type: ignore[arg-type]
    return (keys, tuple(table), idx) if table else None  # none present: no columns to carry


def _adjusted(states: list[str]) -> np.ndarray | None:
    """Adjusted counts of spans with these trace states ('' for none); None: all 1."""
    if not any(states):
        return None
    cache: dict[str, float] = {"": 1.0}
    return np.fromiter(
        (cache[t] if t in cache else cache.setdefault(t, adjusted_count(t)) for t in states), np.float64, len(states)
    )


def _span_batch(
    *, services, operations, instances, service_idx, instance_idx, op_idx, kinds, statuses, start, end,
    trace_id, span_id, parent, adjusted=None, attributes=None,
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
    keys, values, attrs = attributes if attributes is not None else ((), (), None)
    if rejected:
        cols = {k: v[ok] for k, v in cols.items()}
        adjusted = None if adjusted is None else adjusted[ok]
        attrs = None if attrs is None else attrs[:, ok]
    if attrs is not None and not (used := (attrs >= 0).any(axis=1)).all():
        # only the keys some span has travel on (an int32 per span each, into the spool too)
        keys, attrs = tuple(k for k, u in zip(keys, used.tolist(), strict=True) if u), attrs[used]
        if not keys:
            keys, values, attrs = (), (), None
    weight = None if adjusted is None else integer_weights(adjusted, cols["span_id"])
    batch = SpanBatch(services=services, operations=operations, instances=instances, weight=weight,
                      attr_keys=keys, attr_values=values, attrs=attrs, **cols)  # fmt: skip
    return Decoded(batch, n, rejected, _reason_message(reasons))


def _known(values: np.ndarray, highest: int) -> np.ndarray:
    """An enum column as int8: values outside 0..highest (open enums: any int32 on the wire,
    e.g. from a newer client) become 0, UNSPECIFIED; the span is kept."""
    values[(values < 0) | (values > highest)] = 0
    return values.astype(np.int8)


def _id_column(ids: Sequence[bytes], width: int, n: int, *, allow_empty: bool):
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
        "parent_span_id", "trace_state",
    )
)  # fmt: skip


class _StatusCodes(dict):
    """Serialized ``Status`` -> its code; the usual forms are looked up, others parsed."""

    def __missing__(self, raw: bytes) -> int:
        try:
            return Status.FromString(raw).code
        except DecodeError as exc:
            raise MalformedRequest(f"malformed span status: {exc}") from exc


# Status is read as bytes (see pipeline/decode/span_schema.py): no Status object per span.
_STATUS_CODE = _StatusCodes({b"": 0, b"\x18\x00": 0, b"\x18\x01": 1, b"\x18\x02": 2}).__getitem__


@functools.lru_cache(maxsize=16)
def _wanted(keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    return span_attributes.wanted_keys(keys)


def decode_traces(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """ExportTraceServiceRequest bytes -> SpanBatch of the valid spans.

    The fields of ``pipeline/decode/span_schema.py`` are read straight from the wire bytes by
    ``pipeline/decode/span_wire.py``; a request it does not handle (malformed ones among them)
    is parsed with upb instead, with the same result or error.
    """
    keys = limits.span_attributes
    walked = span_wire.walk(np.frombuffer(data, dtype=np.uint8), *_wanted(keys))
    if walked[0] != span_wire.OK:
        return decode_traces_upb(data, limits)
    _, ints, times, trace_id, span_id, parent, resources, names, n_names, attrs = walked
    n = ints.shape[1]
    if n == 0:
        return Decoded(None, 0, 0, "")
    services: dict[str, int] = {}
    instances: dict[str, int] = {}
    service_idx, instance_idx = [], []
    for sa, sb, ia, ib, *_ in resources.tolist():
        service = data[sa:sb].decode() or UNKNOWN_SERVICE
        service_idx.append(services.setdefault(service, len(services)))
        instance_idx.append(instances.setdefault(data[ia:ib].decode(), len(instances)))
    counts = resources[:, span_wire.SPANS]
    tid = trace_id.view("S16").ravel()
    sid = span_id.view("S8").ravel()
    pid = parent.view("S8").ravel()
    parent_len = ints[span_wire.PARENT_LEN]
    adjusted = None
    with_state = np.flatnonzero(ints[span_wire.STATE_END] > ints[span_wire.STATE_START])
    if with_state.size:
        bounds = ints[span_wire.STATE_START : span_wire.STATE_END + 1, with_state].T.tolist()
        adjusted = np.ones(n, dtype=np.float64)
        adjusted[with_state] = _adjusted([data[a:b].decode() for a, b in bounds])
    events = limits.exceptions and bool(ints[span_wire.EVENTS].any())  # exceptions are read only then
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
        adjusted=adjusted,
        attributes=with_exception_types(_with_resource_values(
            _walked_attributes(data, keys, attrs), keys, n, _wire_resource_values(data, keys, limits, attrs, resources),
            counts
        ) if keys else None, keys, n, exception_types(data, n) if events else None),
    )  # fmt: skip


def _wire_resource_values(
    data: bytes, keys: tuple[str, ...], limits: DecodeLimits, ranges: np.ndarray, resources: np.ndarray
) -> list:
    """Per resource, its values of the ``resource_attributes`` keys (None for the others), read as
    the wire reader reads attributes; [] when none is needed: every span has its own value of
    each, or none of the keys is in any Resource message (a fast search of their bytes only)."""
    missing = [k.encode() for j, k in enumerate(keys) if k in limits.resource_attributes and (ranges[2 * j] < 0).any()]
    if not missing:
        return []
    spans = resources[:, span_wire.RES_START:span_wire.RES_END + 1].tolist()
    if not any(data.find(k, a, b) >= 0 for a, b in spans for k in missing):
        return []
    req = parse(TraceResources(), data, "ExportTraceServiceRequest")
    return [_fallback_values(_upb_attributes(rs.resource.attributes, keys), keys, limits) for rs in req.resource_spans]


def _fallback_values(found: tuple, keys: tuple[str, ...], limits: DecodeLimits) -> tuple:
    return tuple(v if k in limits.resource_attributes else None for k, v in zip(keys, found, strict=True))


def _with_resource_values(attributes, keys: tuple[str, ...], n: int, per_resource: list[tuple], counts):
    """Spans without a value of a key take their resource's (``per_resource``, one tuple per
    resource in order, ``counts`` its spans)."""
    if not any(any(values) for values in per_resource):
        return attributes
    _, values, idx = attributes if attributes is not None else (keys, (), np.full((len(keys), n), -1, np.int32))
    table = {v: i for i, v in enumerate(values)}
    resource = np.repeat(np.arange(len(per_resource)), counts)
    for r, row in enumerate(per_resource):
        for j, value in enumerate(row):
            if value:
                idx[j, (resource == r) & (idx[j] < 0)] = table.setdefault(value, len(table))
    return keys, tuple(table), idx


def _walked_attributes(data: bytes, keys: tuple[str, ...], ranges: np.ndarray):
    """The wire reader's attribute byte ranges -> (keys, value table, int32 indexes); None when
    no span had any. Values are told apart as bytes in compiled code (``intern_ranges``: most
    spans repeat a few values, routes and environments) and each distinct one is decoded once
    (not UTF-8: with replacement characters)."""
    idx, first = span_attributes.intern_ranges(np.frombuffer(data, dtype=np.uint8), ranges)
    if not first.shape[0]:
        return None  # none present: no columns to carry
    return keys, tuple(data[a:b].decode(errors="replace") for a, b in first.tolist()), idx


def decode_traces_upb(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """``decode_traces`` through upb: parsed with the subset schema of the fields telepipe
    reads (``pipeline/decode/span_schema.py``), each field read from the span objects. The
    reference the wire reader is tested against, and its fallback."""
    keys = limits.span_attributes
    req = parse((TraceRequestWithAttributes if keys else TraceRequestSubset)(), data, "ExportTraceServiceRequest")
    cols = _SpanColumns(keys)
    name, start, end, kind, status, tid, sid, pid, state = _SPAN_GETTERS
    for rs in req.resource_spans:
        service, instance = _resource_ids(rs.resource.attributes)
        scopes = rs.scope_spans
        spans = scopes[0].spans if len(scopes) == 1 else [s for ss in scopes for s in ss.spans]
        spans = list(spans)  # one Python object per span, read by every column below
        columns = (
            map(name, spans), map(start, spans), map(end, spans), map(kind, spans),
            map(_STATUS_CODE, map(status, spans)), map(tid, spans), map(sid, spans), map(pid, spans),
            map(state, spans),
        )  # fmt: skip
        cols.add_resource(service, instance, columns, len(spans))
        if keys:
            own = [_upb_attributes(s.attributes, keys) for s in spans]
            if limits.resource_attributes:
                res = _fallback_values(tuple(_kv_values(rs.resource.attributes, keys)), keys, limits)
                own = [tuple(a or b for a, b in zip(row, res, strict=True)) for row in own]
            cols.attributes.extend(own)
    return cols.finish(exception_types(data, sum(cols.spans)) if limits.exceptions else None)


def _kv_values(attributes, keys: tuple[str, ...]):
    """Parsed KeyValues' (a resource's) values of ``keys``: the last non-empty string of each."""
    found = {kv.key: kv.value.string_value for kv in attributes if kv.key in keys and kv.value.string_value}
    return (found.get(k) for k in keys)


def _upb_attributes(attributes, keys: tuple[str, ...]) -> tuple[str | None, ...]:
    """A span's values of ``keys`` from its attributes' raw KeyValue bytes, read as the wire
    reader reads them (``span_attributes.attribute_value``): the last non-empty string of each."""
    wanted, wanted_at = _wanted(keys)
    found: list[str | None] = [None] * len(keys)
    for raw in attributes:
        j, a, b = span_attributes.attribute_value(np.frombuffer(raw, dtype=np.uint8), wanted, wanted_at)
        if j >= 0:
            found[j] = raw[a:b].decode(errors="replace")
    return tuple(found)


def json_request(data: bytes | str) -> dict:
    """OTLP/JSON bytes -> the request object; not JSON, or not an object: ``MalformedRequest``."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedRequest("an OTLP/JSON request must be a JSON object")
    return obj


def _json_resource_ids(resource: dict) -> tuple[str, str]:
    service, instance = UNKNOWN_SERVICE, ""
    for kv in resource.get("attributes") or ():
        key = kv.get("key")
        if key == "service.name":
            service = _json_str((kv.get("value") or {}).get("stringValue"), "service.name") or UNKNOWN_SERVICE
        elif key == "service.instance.id":
            instance = _json_str((kv.get("value") or {}).get("stringValue"), "service.instance.id")
    return service, instance


def _json_attributes(attributes, keys: tuple[str, ...]) -> tuple[str | None, ...]:
    """An OTLP/JSON span's values of ``keys``: the last non-empty ``stringValue`` of each."""
    found: dict[str, str] = {}
    for kv in attributes or ():
        key = kv.get("key")
        if key in keys:
            value = (kv.get("value") or {}).get("stringValue")
            if value:
                found[key] = _json_str(value, "attribute value")
    return tuple(found.get(k) for k in keys)


def _json_str(value, what: str) -> str:
    """A JSON string field (absent or null: empty); any other JSON type is malformed."""
    if value is None:
        return ""
    if type(value) is not str:
        raise MalformedRequest(f"malformed OTLP/JSON: {what} is not a string")
    return value


def _json_strings(values, what: str) -> None:
    """Every value a string (string tables and columns of a JSON-decoded batch), else malformed."""
    if not all(type(v) is str for v in values):
        raise MalformedRequest(f"malformed OTLP/JSON: a {what} that is not a string")


def _hex(value: str | None) -> bytes:
    """An OTLP/JSON id: hex, either case (absent or empty: no id). Not hex: malformed, as the
    Collector answers; hex of the wrong length is an invalid item, as for protobuf."""
    if not value:
        return b""
    try:
        return bytes.fromhex(value)
    except (ValueError, TypeError):
        raise MalformedRequest(f"malformed OTLP/JSON: id {str(value)[:40]!r} is not a hex string") from None


def decode_traces_json(obj: dict, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """One OTLP/JSON ExportTraceServiceRequest (hex ids, int64 as strings or numbers, unknown
    fields ignored) -> SpanBatch. Structurally wrong input (a list where an object belongs, a
    number where a string belongs, ids that are not hex) raises ``MalformedRequest``."""
    keys = limits.span_attributes
    cols = _SpanColumns(keys)
    exceptions: list[str | None] = []
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
                            _json_str(s.get("traceState"), "traceState"),
                        )
                        for s in ss.get("spans") or ()
                    ]
                )
            columns = zip(*rows, strict=True) if rows else [()] * len(_COLUMNS)
            cols.add_resource(service, instance, columns, len(rows))
            if keys:
                own = [_json_attributes(s.get("attributes"), keys) for ss in rs.get("scopeSpans") or ()
                       for s in ss.get("spans") or ()]  # fmt: skip
                if limits.resource_attributes:
                    res = _fallback_values(_json_attributes((rs.get("resource") or {}).get("attributes"), keys), keys,
                                           limits)  # fmt: skip
                    own = [tuple(a or b for a, b in zip(row, res, strict=True)) for row in own]
                cols.attributes.extend(own)
            if limits.exceptions:
                exceptions.extend(json_exception_type(s.get("events")) for ss in rs.get("scopeSpans") or ()
                                  for s in ss.get("spans") or ())  # fmt: skip
        decoded = cols.finish(exceptions if any(exceptions) else None)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:  # e.g. a kind beyond int64
        raise MalformedRequest(f"malformed OTLP/JSON trace request: {exc}") from exc
    if isinstance(decoded.batch, SpanBatch):
        _json_strings(decoded.batch.operations, "span name")  # the distinct names: cheap
    return decoded
