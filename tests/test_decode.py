import numpy as np
import orjson
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from pipeline.batch_codec import coalesce, decode, encode
from pipeline.decode import MalformedRequest, decode_json_line, decode_logs, decode_logs_json, decode_traces
from pipeline.model import LogBatch, SpanBatch

from .conftest import ONLINEBOUTIQUE, TRAINTICKET


def trace_request(spans, service="checkout", instance="pod-1"):
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = service
    rs.resource.attributes.add(key="service.instance.id").value.string_value = instance
    ss = rs.scope_spans.add()
    for s in spans:
        sp = ss.spans.add()
        sp.trace_id = s.get("trace_id", b"\x01" * 16)
        sp.span_id = s.get("span_id", b"\x02" * 8)
        sp.name = s.get("name", "GET /cart")
        sp.kind = s.get("kind", 2)
        sp.start_time_unix_nano = s.get("start", 1_000_000_000)
        sp.end_time_unix_nano = s.get("end", 1_002_000_000)
        sp.status.code = s.get("status", 0)
    return req.SerializeToString()


def test_valid_spans_become_columns():
    d = decode_traces(trace_request([{}, {"name": "POST /pay", "status": 2, "end": 1_500_000_000}]))
    b = d.batch
    assert isinstance(b, SpanBatch) and len(b) == 2 and d.rejected == 0 and d.message == ""
    assert b.services == ("checkout",) and b.instances == ("pod-1",)
    assert [b.operations[i] for i in b.op_idx] == ["GET /cart", "POST /pay"]
    assert b.duration_ns.tolist() == [2_000_000, 500_000_000]
    assert b.status.tolist() == [0, 2] and b.kind.tolist() == [2, 2]
    assert b.trace_id[0] == b"\x01" * 16


def test_unknown_span_kinds_and_status_codes_are_kept_as_unspecified_and_clamped():
    b = decode_traces(trace_request([{"kind": 300}, {"kind": -4}, {"kind": 5, "status": 300}, {"status": -200}])).batch
    assert b.kind.tolist() == [0, 0, 5, 2] and b.status.tolist() == [0, 0, 2, 0]
    j = decode_json_line(orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "01" * 16, "spanId": "02" * 8, "name": "x", "kind": 1 << 40,
        "startTimeUnixNano": "1", "endTimeUnixNano": "2"}]}]}]}))[0].batch  # fmt: skip
    assert j.kind.tolist() == [0]
    with pytest.raises(MalformedRequest):  # beyond int64: malformed, not an internal error
        decode_json_line(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "' + b"01" * 16
                         + b'", "spanId": "0202020202020202", "kind": "1180591620717411303424"}]}]}]}')  # fmt: skip


def test_invalid_spans_rejected_individually():
    spans = [
        {},
        {"trace_id": b"\x00" * 16},
        {"trace_id": b"\x01" * 15},
        {"span_id": b"\x00" * 8},
        {"start": 5, "end": 4},
        {"name": "ok2"},
    ]
    d = decode_traces(trace_request(spans))
    assert d.received == 6 and d.rejected == 4 and len(d.batch) == 2
    assert "trace_id" in d.message and "span_id" in d.message and "end_time before start_time" in d.message


def test_all_invalid_gives_no_batch():
    d = decode_traces(trace_request([{"trace_id": b""}]))
    assert d.batch is None and d.rejected == 1


def test_empty_request():
    d = decode_traces(b"")
    assert d.batch is None and d.received == 0 and d.rejected == 0


def test_malformed_bytes_raise():
    with pytest.raises(MalformedRequest):
        decode_traces(b"\x0a\xff\xff\xff\xff\x0f garbage")


def test_missing_service_name_is_unknown_service():
    req = ExportTraceServiceRequest()
    sp = req.resource_spans.add().scope_spans.add().spans.add()
    sp.trace_id, sp.span_id, sp.name = b"\x01" * 16, b"\x02" * 8, "x"
    sp.start_time_unix_nano, sp.end_time_unix_nano = 1, 2
    assert decode_traces(req.SerializeToString()).batch.services == ("unknown_service",)


def test_batch_bytes_round_trip():
    b = decode_traces(trace_request([{}, {"name": "b", "status": 2}])).batch
    back = decode(encode(b))
    for col in ("service_idx", "op_idx", "kind", "status", "end_ns", "duration_ns", "trace_id", "span_id"):
        assert np.array_equal(getattr(back, col), getattr(b, col))
    assert back.operations == b.operations


def test_coalesce_merges_the_span_batches_of_a_step_across_log_batches():
    spans = [decode_traces(trace_request([{"name": f"op{i}"}] * (i + 1), service=f"s{i % 2}")).batch for i in range(4)]
    logs = [decode_logs(log_request([{}])).batch for _ in range(2)]
    out = coalesce([spans[0], logs[0], spans[1], spans[2], logs[1], spans[3]])
    assert [type(b) for b in out] == [SpanBatch, LogBatch, LogBatch] and out[1] is logs[0] and out[2] is logs[1]
    merged = out[0]
    assert [merged.operations[i] for i in merged.op_idx] == [f"op{i}" for i in range(4) for _ in range(i + 1)]
    assert [merged.services[i] for i in merged.service_idx] == [f"s{i % 2}" for i in range(4) for _ in range(i + 1)]
    limited = coalesce(spans, max_spans=5)  # 1 + 2, then 3, then 4 spans
    assert [len(b) for b in limited] == [3, 3, 4]


def test_recording_lines_decode_to_every_span():
    spans = 0
    for line in ONLINEBOUTIQUE.open("rb"):
        for d in decode_json_line(line):
            assert d.rejected == 0
            spans += len(d.batch)
    assert spans == 22969


def test_json_and_protobuf_forms_agree():
    line = ONLINEBOUTIQUE.open("rb").readline()
    obj = orjson.loads(line)
    from_json = decode_json_line(line)[0].batch
    # build the same request as protobuf, ids from hex
    req = ExportTraceServiceRequest()
    for rs_obj in obj["resourceSpans"]:
        rs = req.resource_spans.add()
        for kv in rs_obj["resource"]["attributes"]:
            rs.resource.attributes.add(key=kv["key"]).value.string_value = kv["value"]["stringValue"]
        for ss_obj in rs_obj["scopeSpans"]:
            ss = rs.scope_spans.add()
            for s in ss_obj["spans"]:
                sp = ss.spans.add()
                sp.trace_id, sp.span_id = bytes.fromhex(s["traceId"]), bytes.fromhex(s["spanId"])
                sp.parent_span_id = bytes.fromhex(s.get("parentSpanId", ""))
                sp.name, sp.kind = s["name"], s["kind"]
                sp.start_time_unix_nano = int(s["startTimeUnixNano"])
                sp.end_time_unix_nano = int(s["endTimeUnixNano"])
    from_pb = decode_traces(req.SerializeToString()).batch
    for col in ("op_idx", "kind", "status", "end_ns", "duration_ns", "trace_id", "span_id", "parent_span_id"):
        assert np.array_equal(getattr(from_pb, col), getattr(from_json, col)), col


def log_request(records):
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.add(key="service.name").value.string_value = "cart"
    sl = rl.scope_logs.add()
    for r in records:
        lr = sl.log_records.add()
        lr.time_unix_nano = r.get("time", 1_700_000_000_000_000_000)
        lr.severity_number = r.get("severity", 17)
        lr.severity_text = "ERROR"
        lr.body.string_value = r.get("body", "boom")
        lr.trace_id = r.get("trace_id", b"\xab" * 16)
        lr.span_id = r.get("span_id", b"\xcd" * 8)
        for k, v in r.get("attrs", {}).items():
            lr.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
    return req.SerializeToString()


def test_logs_decode_and_limits():
    attrs = {f"k{i}": "v" * 10 for i in range(40)}
    d = decode_logs(log_request([{"attrs": attrs}, {"trace_id": b"\x01" * 3}, {"time": 0}]))
    assert d.received == 3 and d.rejected == 2
    b = d.batch
    assert isinstance(b, LogBatch) and len(b) == 1
    assert b.trace_id == ["ab" * 16] and b.span_id == ["cd" * 8] and b.body == ["boom"]
    assert len(b.attributes[0]) == 16  # bounded set of attributes
    back = decode(encode(b))
    assert back.body == b.body and back.time_ns.tolist() == b.time_ns.tolist()


def _ld(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    n, varint = len(payload), b""
    while True:
        byte, n = n & 0x7F, n >> 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return bytes([field << 3 | 2]) + varint + payload


def nested_log_request(depth: int) -> bytes:
    value = _ld(1, b"x")  # AnyValue{string_value}
    for _ in range(depth):
        value = _ld(5, _ld(1, value))  # AnyValue{array_value{values: [value]}}
    record = bytes([1 << 3 | 1]) + (1).to_bytes(8, "little") + _ld(5, value)  # time + body
    return _ld(1, _ld(2, _ld(2, record)))  # resource_logs.scope_logs.log_records


@pytest.mark.parametrize("depth", [40, 200])
def test_nesting_bomb_is_malformed(depth):
    # 40 levels parse in upb but exceed our limit; 200 levels are refused by upb itself.
    with pytest.raises(MalformedRequest):
        decode_logs(nested_log_request(depth))


def test_moderate_nesting_is_rendered():
    d = decode_logs(nested_log_request(3))
    assert d.batch.body == ['[[["x"]]]']


def test_trainticket_logs_decode():
    logs = 0
    for line in TRAINTICKET.open("rb"):
        for d in decode_json_line(line):
            if isinstance(d.batch, LogBatch):
                logs += len(d.batch)
                assert all(len(t) in (0, 32) for t in d.batch.trace_id)
    assert logs == 2489


def test_long_attribute_values_are_cut_with_a_warning():
    from pipeline.decode import DecodeLimits

    d = decode_logs(log_request([{"attrs": {"big": "x" * 10_000, "small": "y"}}]), DecodeLimits(16, 100))
    assert d.rejected == 0 and d.batch.attributes[0] == {"big": "x" * 100, "small": "y"}
    assert "longer than 100 characters" in d.message


def test_protobuf_backend_is_upb_and_checked_at_startup(monkeypatch):
    from telepipe import daemon

    assert daemon.protobuf_backend() == "upb"
    daemon.check_protobuf_backend()
    monkeypatch.setattr(daemon, "protobuf_backend", lambda: "python")
    with pytest.raises(RuntimeError, match="needs 'upb'"):
        daemon.check_protobuf_backend()


def test_log_attribute_nesting_bomb_and_malformed_json_attributes_are_malformed():
    req = ExportLogsServiceRequest()
    lr = req.resource_logs.add().scope_logs.add().log_records.add(time_unix_nano=1)
    value = AnyValue(string_value="leaf")
    for _ in range(40):  # deeper than MAX_ANYVALUE_DEPTH (32), within upb's own limit
        outer = AnyValue()
        outer.array_value.values.append(value)
        value = outer
    lr.attributes.add(key="deep").value.CopyFrom(value)
    with pytest.raises(MalformedRequest):
        decode_logs(req.SerializeToString())
    obj = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "1", "attributes": [1]}]}]}]}
    with pytest.raises(MalformedRequest):
        decode_logs_json(obj)


def test_status_with_a_message_and_several_scopes_are_read():
    req = ExportTraceServiceRequest.FromString(trace_request([{"status": 2}, {"status": 1}]))
    req.resource_spans[0].scope_spans[0].spans[0].status.message = "upstream timed out"
    extra = req.resource_spans[0].scope_spans.add().spans.add()
    extra.CopyFrom(req.resource_spans[0].scope_spans[0].spans[1])
    extra.name = "second scope"
    b = decode_traces(req.SerializeToString()).batch
    assert b.status.tolist() == [2, 1, 1]
    assert [b.operations[i] for i in b.op_idx] == ["GET /cart", "GET /cart", "second scope"]


def test_span_attributes_are_skipped_not_parsed():
    """The subset schema: attribute contents are not read (documented in docs/otlp.md),
    but a garbled span is still a malformed request."""
    req = ExportTraceServiceRequest.FromString(trace_request([{}]))
    span = req.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.add(key="k").value.string_value = "v"
    body = req.SerializeToString()
    bad_utf8 = body.replace(b"\x0a\x01v", b"\x0a\x01\xff")  # the attribute's string value
    assert bad_utf8 != body
    assert len(decode_traces(bad_utf8).batch) == 1
    with pytest.raises(MalformedRequest):
        decode_traces(body[:-3])  # truncated
