"""Exceptions from span events: decoded alike by every decoder, counted per (service, span, type)."""

import numpy as np
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pipeline.decode import decode_traces, decode_traces_json, decode_traces_upb
from pipeline.decode.common import DecodeLimits
from pipeline.decode.span_events import EXCEPTION_TYPE
from pipeline.exceptions import count_exceptions


def _request() -> bytes:
    """Five spans: ValueError; KeyError then TimeoutError (the last counts); an exception event
    without a type; a span with another event only; a span without events."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "shop"
    spans = rs.scope_spans.add().spans
    for i, events in enumerate(([("exception", "ValueError")], [("exception", "KeyError"), ("exception", "TimeoutError")],
                                [("exception", None)], [("retry", "x")], [])):  # fmt: skip
        span = spans.add(trace_id=bytes([i + 1]) * 16, span_id=bytes([i + 1]) * 8, name="GET /a" if i < 3 else "GET /b",
                         kind=2, start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 10**6)  # fmt: skip
        for name, typ in events:
            ev = span.events.add(name=name, time_unix_nano=10**18)
            ev.attributes.add(key="exception.message").value.string_value = "boom"
            if typ:
                ev.attributes.add(key="exception.type").value.string_value = typ
    return req.SerializeToString()


def _types(decoded) -> list:
    col = decoded.batch.attribute(EXCEPTION_TYPE)
    return [None if v < 0 else decoded.batch.attr_values[v] for v in col.tolist()]


def test_every_decoder_reads_the_last_exception_type():
    body = _request()
    obj = MessageToDict(ExportTraceServiceRequest.FromString(body), use_integers_for_enums=True)
    for i, span in enumerate(obj["resourceSpans"][0]["scopeSpans"][0]["spans"]):
        span.update(traceId=f"{i + 1:02x}" * 16, spanId=f"{i + 1:02x}" * 8)
    want = ["ValueError", "TimeoutError", "unknown", None, None]
    for keys in ((), ("server.address",)):
        limits = DecodeLimits(span_attributes=keys, exceptions=True)
        for decoded in (decode_traces(body, limits), decode_traces_upb(body, limits), decode_traces_json(obj, limits)):
            assert _types(decoded) == want
    assert decode_traces(body, DecodeLimits()).batch.attrs is None  # not asked: not read


def test_counted_per_service_span_and_type_weighted():
    batch = decode_traces(_request(), DecodeLimits(exceptions=True)).batch
    got = {(c.service, c.operation, c.exception_type): c.count for c in count_exceptions(batch)}
    assert got == {("shop", "GET /a", "ValueError"): 1, ("shop", "GET /a", "TimeoutError"): 1,
                   ("shop", "GET /a", "unknown"): 1}  # fmt: skip
    import dataclasses

    weighted = dataclasses.replace(batch, weight=np.full(len(batch), 4, np.int32))
    assert sum(c.count for c in count_exceptions(weighted)) == 12
