"""OTLP/gRPC receiver: every status the protocol asks for, and nothing else lost."""

import gzip
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from pipeline.batch_codec import decode as batch_from_bytes
from pipeline.config import OtlpConfig
from pipeline.selfmetrics import SelfMetrics
from sources.spool import Spool, list_segments, read_records

from .conftest import free_port
from .test_decode import log_request, trace_request

TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
METRICS = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


@pytest.fixture
def receiver(tmp_path):
    from sources.otlp_grpc import OtlpReceiver

    metrics = SelfMetrics()
    spool = Spool(tmp_path / "spool", segment_bytes=1 << 16, budget_bytes=1 << 20, fsync="never", metrics=metrics)
    cfg = OtlpConfig(grpc_listen=f"127.0.0.1:{free_port()}", max_message_bytes=1 << 20)
    rx = OtlpReceiver(cfg, spool, metrics, retry_after_ms=1500)
    rx.start()
    channel = grpc.insecure_channel(cfg.grpc_listen)
    yield rx, spool, metrics, channel
    channel.close()
    rx.stop(0)
    spool.close()


def call(channel, method, body, **kw):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)(body, timeout=10, **kw)


def spooled(spool):
    out = []
    for seq in list_segments(spool.dir):
        path = spool.path_of(seq)
        with open(path, "rb") as f:
            out += [batch_from_bytes(p) for p in read_records(f, 0, path.stat().st_size, 10_000, 1 << 26).payloads]
    return out


def test_valid_request_is_spooled_before_ok(receiver):
    rx, spool, metrics, ch = receiver
    resp = ExportTraceServiceResponse.FromString(call(ch, TRACES, trace_request([{}, {"name": "b"}])))
    assert not resp.HasField("partial_success")
    assert sum(len(b) for b in spooled(spool)) == 2
    assert metrics.counter("accepted_spans") == 2


def test_partial_success_for_invalid_spans(receiver):
    rx, spool, metrics, ch = receiver
    body = trace_request([{}, {"trace_id": b"\x00" * 16}, {"start": 9, "end": 1}])
    resp = ExportTraceServiceResponse.FromString(call(ch, TRACES, body))
    assert resp.partial_success.rejected_spans == 2
    assert "trace_id" in resp.partial_success.error_message
    assert sum(len(b) for b in spooled(spool)) == 1
    assert metrics.counter("rejected_spans", "invalid") == 2


def test_empty_request_ok_without_partial_success(receiver):
    _, spool, _, ch = receiver
    resp = ExportTraceServiceResponse.FromString(call(ch, TRACES, b""))
    assert not resp.HasField("partial_success")
    assert spooled(spool) == []


def test_malformed_is_invalid_argument_and_server_keeps_serving(receiver):
    _, spool, metrics, ch = receiver
    with pytest.raises(grpc.RpcError) as err:
        call(ch, TRACES, b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in err.value.details()
    call(ch, TRACES, trace_request([{}]))
    assert metrics.counter("requests", "spans", "INVALID_ARGUMENT") == 1
    assert sum(len(b) for b in spooled(spool)) == 1


def test_oversize_is_resource_exhausted(receiver):
    _, _, _, ch = receiver
    with pytest.raises(grpc.RpcError) as err:
        call(ch, TRACES, trace_request([{"name": "x" * (2 << 20)}]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_gzip_accepted(receiver):
    _, spool, _, ch = receiver
    call(ch, TRACES, trace_request([{}] * 10), compression=grpc.Compression.Gzip)
    assert sum(len(b) for b in spooled(spool)) == 10


def test_gzip_bomb_refused_without_inflating(receiver):
    _, _, _, ch = receiver
    # 64 MiB of zeros inside a protobuf bytes field compress to ~64 KiB; the limit is 1 MiB.
    inner = b"\x00" * (64 << 20)
    bomb = b"\x0a" + _varint(len(inner)) + inner
    with pytest.raises(grpc.RpcError) as err:
        call(ch, TRACES, bomb, compression=grpc.Compression.Gzip)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(gzip.compress(inner)) < 1 << 20


def _varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def test_metrics_service_answers_an_empty_request(receiver):
    _, _, _, ch = receiver
    assert call(ch, METRICS, b"") == b""  # success, no partial_success (tests/test_http_metrics.py: the rest)


def test_logs_export_and_partial_success(receiver):
    _, spool, metrics, ch = receiver
    resp = ExportLogsServiceResponse.FromString(call(ch, LOGS, log_request([{}, {"span_id": b"\x01"}])))
    assert resp.partial_success.rejected_log_records == 1
    assert [b.body for b in spooled(spool)] == [["boom"]]
    assert metrics.counter("accepted_logs") == 1


def test_spool_over_budget_is_unavailable_with_retryinfo(receiver):
    _, spool, metrics, ch = receiver
    big = trace_request([{"name": "n%d" % i} for i in range(2000)])
    refused = None
    for _ in range(200):
        try:
            call(ch, TRACES, big)
        except grpc.RpcError as exc:
            refused = exc
            break
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(refused)
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    assert info.retry_delay.seconds == 1 and info.retry_delay.nanos == 500_000_000
    # everything acknowledged is in the spool; nothing refused is
    acked = metrics.counter("accepted_spans")
    assert sum(len(b) for b in spooled(spool)) == acked > 0
    assert spool.total_bytes() <= spool.budget_bytes


def test_bad_clients_do_not_disturb_a_good_one(receiver):
    _, spool, _, ch = receiver
    stop = threading.Event()

    def abuse():
        bad = grpc.insecure_channel(f"127.0.0.1:{_port(receiver)}")
        while not stop.is_set():
            for body in (b"\xff\xff\xff", trace_request([{"span_id": b""}]), b""):
                try:
                    call(bad, TRACES, body)
                except grpc.RpcError:
                    pass
        bad.close()

    threads = [threading.Thread(target=abuse) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(50):
            resp = ExportTraceServiceResponse.FromString(call(ch, TRACES, trace_request([{}] * 4)))
            assert not resp.HasField("partial_success")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert sum(len(b) for b in spooled(spool)) == 200


def _port(receiver):
    return receiver[0].port


def test_nesting_bomb_is_invalid_argument_from_our_decode(receiver):
    from .test_decode import nested_log_request

    _, spool, _, ch = receiver
    for depth in (40, 200):  # ours refuses past 32 levels; upb refuses ~100+
        with pytest.raises(grpc.RpcError) as err:
            call(ch, LOGS, nested_log_request(depth))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert spooled(spool) == []
