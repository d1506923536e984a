"""OTLP log requests -> ``LogBatch``: protobuf (upb, the full schema) or OTLP/JSON objects.
Attributes are bounded per record (``DecodeLimits``); AnyValue nesting is bounded too."""

from __future__ import annotations

import base64
import operator
from collections import Counter

import numpy as np
import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from pipeline.decode.common import (
    MAX_ANYVALUE_DEPTH,
    Decoded,
    DecodeLimits,
    MalformedRequest,
    _reason_message,
    parse,
)
from pipeline.decode.spans import _hex, _json_resource_ids, _json_str, _json_strings, _resource_ids
from pipeline.model import LogBatch


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
        columns = (time_ns, observed_ns, severity, severity_text, bodies, tids, sids, attrs)
        for name, values in zip(self._NAMES, columns):
            raw[name].extend(values)
        n = len(raw["time"]) - len(raw["service"])
        raw["service"].extend([service] * n)
        raw["instance"].extend([instance] * n)

    def _attributes(self, attributes) -> dict[str, str]:
        limit = self.limits.max_attribute_value_bytes
        kept: dict[str, str] = {}
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
    req = parse(ExportLogsServiceRequest(), data, "ExportLogsServiceRequest")
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
    return _json_str(kv.get("key"), "attribute key"), _json_anyvalue_to_python(kv.get("value"))


def decode_logs_json(obj: dict, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """One OTLP/JSON ExportLogsServiceRequest -> LogBatch. Structurally wrong input raises
    ``MalformedRequest`` (see ``decode_traces_json``)."""
    cols = _LogColumns(limits, _json_attribute)
    try:
        for rl in obj.get("resourceLogs") or ():
            service, instance = _json_resource_ids(rl.get("resource") or {})
            for sl in rl.get("scopeLogs") or ():
                recs = sl.get("logRecords") or ()
                severity_text = [r.get("severityText", "") for r in recs]
                _json_strings(severity_text, "severityText")
                cols.add_scope(
                    service, instance,
                    [int(r.get("timeUnixNano") or 0) for r in recs],
                    [int(r.get("observedTimeUnixNano") or 0) for r in recs],
                    [int(r.get("severityNumber") or 0) for r in recs],
                    severity_text,
                    [render_value(_json_anyvalue_to_python(r.get("body"))) for r in recs],
                    [_hex(r.get("traceId")) for r in recs], [_hex(r.get("spanId")) for r in recs],
                    [_json_list(r.get("attributes")) for r in recs],
                )  # fmt: skip
        return cols.finish()  # renders the attributes
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise MalformedRequest(f"malformed OTLP/JSON log request: {exc}") from exc


def _json_list(value) -> list | tuple:
    if not value:
        return ()
    if type(value) is not list:
        raise MalformedRequest("malformed OTLP/JSON: attributes is not a list")
    return value
