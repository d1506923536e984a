"""Time sanity at the door: a client whose clock runs ahead cannot move event time for everyone."""

import time

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from pipeline.decode import accept_times, decode_logs, decode_traces

from .conftest import total, wait_for
from .test_decode import log_request, trace_request

S = 1_000_000_000
NOW = 1_700_000_000 * S


def test_items_ending_too_far_ahead_are_rejected_and_the_rest_stamped():
    ends = [{"end": NOW + 10 * S}, {"end": NOW + 301 * S, "name": "x"}, {"end": NOW - 3600 * S}]
    d = decode_traces(trace_request(ends))
    got = accept_times(d, NOW, 300 * S)
    assert (got.received, got.rejected, got.future) == (3, 1, 1)
    assert "1 spans ending more than 300 s after the receiver's clock" in got.message
    assert got.batch.end_ns.tolist() == [NOW + 10 * S, NOW - 3600 * S]  # old data is kept
    assert got.batch.received_ns == NOW
    assert [got.batch.operations[i] for i in got.batch.op_idx] == ["GET /cart", "GET /cart"]
    none_left = accept_times(decode_traces(trace_request([{"end": NOW + 3600 * S}])), NOW, 300 * S)
    assert none_left.batch is None and none_left.rejected == 1
    logs = decode_logs(log_request([{"time": NOW}, {"time": NOW + 3600 * S}, {"time": NOW + 5 * S}]))
    got = accept_times(logs, NOW, 300 * S)
    assert got.future == 1 and got.batch.time_ns.tolist() == [NOW, NOW + 5 * S] and len(got.batch.body) == 2


def test_the_acceptance_time_survives_the_spool_and_merging():
    from pipeline.batch_codec import coalesce, decode, encode
    from pipeline.model import SpanBatch

    a = accept_times(decode_traces(trace_request([{"end": NOW}])), NOW, 300 * S).batch
    b = accept_times(decode_traces(trace_request([{"end": NOW}])), NOW + S, 300 * S).batch
    back = decode(encode(a))
    assert back.received_ns == NOW
    (merged,) = coalesce([back, decode(encode(b))])
    assert isinstance(merged, SpanBatch) and merged.received_ns == NOW + S
    assert decode(encode(decode_traces(trace_request([{}])).batch)).received_ns == 0  # unknown


@pytest.mark.integration
def test_a_span_from_a_clock_an_hour_ahead_is_rejected_and_the_next_2000_are_counted(daemon_factory):
    d = daemon_factory("[windows]\nlength_s = 1.0\nallowed_lateness_s = 0.5\nidle_timeout_s = 2.0\n")
    channel = grpc.insecure_channel(d.grpc_target)
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)  # fmt: skip

    def spans(n, ahead_s=0.0, first=0):
        end = time.time_ns() + int(ahead_s * S)
        return trace_request([{"start": end - 10**6, "end": end, "span_id": (first + i + 1).to_bytes(8, "big")}
                              for i in range(n)], service="cart")  # fmt: skip

    hour = export(spans(1, ahead_s=3600), timeout=5)
    assert hour.partial_success.rejected_spans == 1 and "after the receiver's clock" in hour.partial_success.error_message
    # 200 s ahead is inside otlp.max_future_s: accepted, but it moves event time no further than now
    assert not export(spans(1, ahead_s=200), timeout=5).HasField("partial_success")
    for k in range(20):
        assert not export(spans(100, first=1000 + 100 * k), timeout=5).HasField("partial_success")
        time.sleep(0.1)
    channel.close()
    text = wait_for(lambda: t if total(t := d.metrics_text(), "telepipe_calls_total") >= 2001 else None)
    assert total(text, "telepipe_rejected_spans_total", reason="future_timestamp") == 1
    assert total(text, "telepipe_calls_total", service_name="cart") == 2001
    assert total(text, "telepipe_late_spans_total") == 0
    assert np.isclose(total(text, "telepipe_accepted_spans_total"), 2001)
