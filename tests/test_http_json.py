"""OTLP/JSON decoding as OTLP/HTTP receives it: hex ids in either case, int64 as strings or
numbers, integer enums, unknown fields ignored, and structurally wrong input a
``MalformedRequest`` (answered 400), never another exception."""

import copy

import pytest

from pipeline.batch_codec import encode
from pipeline.decode import MalformedRequest, decode_logs_json, decode_traces_json
from pipeline.model import LogBatch, SpanBatch

TRACES = {"resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}},
                                {"key": "service.instance.id", "value": {"stringValue": "i1"}}]},
    "scopeSpans": [{"scope": {"name": "x"}, "spans": [{
        "traceId": "0102030405060708090A0B0C0D0E0F10", "spanId": "0102030405060708", "parentSpanId": "",
        "name": "op", "kind": 2, "startTimeUnixNano": "1000", "endTimeUnixNano": 2000, "status": {"code": 2},
        "attributes": [{"key": "a", "value": {"intValue": "3"}}], "droppedEventsCount": 0, "newField": [1]}]}]}]}
LOGS = {"resourceLogs": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
    "scopeLogs": [{"logRecords": [{
        "timeUnixNano": "1000", "observedTimeUnixNano": 1000, "severityNumber": 9, "severityText": "INFO",
        "body": {"kvlistValue": {"values": [{"key": "k", "value": {"arrayValue": {"values": [{"intValue": 1}]}}}]}},
        "traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708",
        "attributes": [{"key": "a", "value": {"stringValue": "x"}}, {"key": "b", "value": {"boolValue": True}}]}]}]}]}
# fmt: skip

ODD_VALUES = [None, 1, -1, 1.5, float("nan"), 2**70, "s", "zz", True, [], {}, [1], {"a": 1}, ["x"], [{}],
              "0102030405060708"]  # fmt: skip


def test_valid_json_decodes_with_either_case_of_hex_and_int64_as_string_or_number():
    d = decode_traces_json(TRACES)
    b = d.batch
    assert isinstance(b, SpanBatch) and d.rejected == 0
    assert b.trace_id.tolist() == [bytes(range(1, 17))] and b.duration_ns.tolist() == [1000]
    assert b.services == ("svc",) and b.instances == ("i1",) and b.operations == ("op",)
    logs = decode_logs_json(LOGS).batch
    assert isinstance(logs, LogBatch) and logs.trace_id == ["0102030405060708090a0b0c0d0e0f10"]
    assert logs.body == ['{"k":[1]}'] and logs.attributes == [{"a": "x", "b": "true"}]


def test_snake_case_keys_are_unknown_fields_ignored():
    assert decode_traces_json({"resource_spans": TRACES["resourceSpans"]}).received == 0


def test_ids_that_are_not_hex_are_malformed_wrong_length_hex_is_a_rejected_span():
    bad = copy.deepcopy(TRACES)
    bad["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "AQIDBAUGBwgJCgsMDQ4PEA=="  # base64
    with pytest.raises(MalformedRequest, match="hex"):
        decode_traces_json(bad)
    short = copy.deepcopy(TRACES)
    short["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "abcd"
    d = decode_traces_json(short)
    assert d.batch is None and d.rejected == 1 and "span_id" in d.message


def _paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*path, i))


def _replaced(obj, path, value):
    out = copy.deepcopy(obj)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("base, decode", [(TRACES, decode_traces_json), (LOGS, decode_logs_json)])
def test_any_node_of_any_json_type_decodes_or_is_malformed(base, decode):
    """Every node of a valid request replaced by every kind of JSON value: the result is either
    ``MalformedRequest`` or a batch whose string tables are strings and which encodes."""
    for value in ODD_VALUES:
        if isinstance(value, dict):
            assert decode(value).received == 0
        else:
            with pytest.raises(MalformedRequest):
                decode(value)
    for path in [p for p in _paths(base) if p]:
        for value in ODD_VALUES:
            try:
                d = decode(_replaced(base, path, value))
            except MalformedRequest:
                continue
            b = d.batch
            if b is None:
                continue
            encode(b)
            tables = (b.services, b.instances, b.operations) if isinstance(b, SpanBatch) else (
                b.service, b.instance, b.severity_text, b.body, [k for a in b.attributes for k in a])
            assert all(isinstance(s, str) for t in tables for s in t), (path, value)
