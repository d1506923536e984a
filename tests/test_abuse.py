"""Abuse against a running daemon: a 2 GiB gzip bomb and a million attributes; a good client is
served meanwhile and the daemon's memory does not grow."""

import threading

import grpc
import psutil
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from .test_decode import trace_request
from .test_flow import letters
from .test_receiver import _varint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def test_2gib_gzip_bomb_is_refused_without_inflating(daemon_factory):
    d = daemon_factory()
    proc = psutil.Process(d.proc.pid)
    before = proc.memory_info().rss
    inner = bytes(2**31 - 64)
    bomb = b"\x0a" + _varint(len(inner)) + inner
    del inner
    good = []

    def good_client():
        with grpc.insecure_channel(d.grpc_target) as ch:
            export = ch.unary_unary(TRACES, request_serializer=None, response_deserializer=None)
            for _ in range(20):
                export(trace_request([{}] * 10), timeout=10)
                good.append(1)

    with grpc.insecure_channel(d.grpc_target, options=[("grpc.max_send_message_length", -1)]) as ch:
        export = ch.unary_unary(TRACES, request_serializer=None, response_deserializer=None)
        t = threading.Thread(target=good_client)
        t.start()
        with pytest.raises(grpc.RpcError) as err:
            export(bomb, timeout=120, compression=grpc.Compression.Gzip)
        t.join(60)
    del bomb
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(good) == 20
    growth = proc.memory_info().rss - before
    assert growth < 50 * 2**20, growth / 2**20


def test_a_million_attributes_are_capped_with_a_warning(daemon_factory):
    d = daemon_factory("[otlp]\nmax_message_bytes = 67108864\nmax_log_attributes = 8\n")
    req = ExportLogsServiceRequest()
    lr = req.resource_logs.add().scope_logs.add().log_records.add()
    lr.time_unix_nano = 1_700_000_000_000_000_000
    lr.body.string_value = "many attributes"
    for i in range(1_000_000):
        kv = lr.attributes.add()
        kv.key = f"k{i}"
        kv.value.string_value = "v"
    body = req.SerializeToString()
    with grpc.insecure_channel(d.grpc_target, options=[("grpc.max_send_message_length", -1)]) as ch:
        export = ch.unary_unary(LOGS, request_serializer=None, response_deserializer=None)
        resp = ExportLogsServiceResponse.FromString(export(body, timeout=60))
    assert resp.partial_success.rejected_log_records == 0
    assert "more than 8 attributes" in resp.partial_success.error_message
    assert 'telepipe_accepted_logs_total 1.0' in d.metrics_text()


def test_a_million_unique_span_names_keep_series_and_memory_bounded(daemon_factory):
    """A million names without ids in them (no template folds them): 200 series and the
    overflow series, memory flat."""
    d = daemon_factory("[windows]\nmax_operations_per_service = 200\nidle_timeout_s = 1.0\n")
    proc = psutil.Process(d.proc.pid)
    import time

    base = (time.time_ns() // 10**10 - 30) * 10**10
    rss = []
    with grpc.insecure_channel(d.grpc_target) as ch:
        export = ch.unary_unary(TRACES, request_serializer=None, response_deserializer=None)
        for k in range(2000):  # 2,000 requests x 500 spans, every span name different
            spans = [{"name": f"GET /user/{letters(k * 500 + i)}", "start": base + k * 10**7, "end": base + k * 10**7 + 10**6,
                      "span_id": (k * 500 + i + 1).to_bytes(8, "big")} for i in range(500)]  # fmt: skip
            export(trace_request(spans), timeout=30)
            if k % 250 == 0:
                rss.append(proc.memory_info().rss)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "telepipe_processed_spans_total 1e+06" not in d.metrics_text():
        time.sleep(1)
    text = d.metrics_text()
    assert "telepipe_processed_spans_total 1e+06" in text
    names = {line.split('span_name="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("telepipe_calls_total{")}  # fmt: skip
    assert len(names) == 201 and "__overflow__" in names
    assert "telepipe_overflow_spans_total 999800.0" in text
    assert max(rss) - rss[1] < 100 * 2**20, [r / 2**20 for r in rss]  # flat after warm-up
