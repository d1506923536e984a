"""OTLP metrics over both transports: gRPC MetricsService/Export and HTTP /v1/metrics (protobuf
and JSON), spooled as MetricBatch, counted as metric points, partial_success as for spans."""

import json
import time

import grpc
import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from pipeline.config import OtlpConfig
from pipeline.metric_model import MetricBatch
from pipeline.selfmetrics import SelfMetrics
from sources.otlp_grpc import OtlpReceiver
from sources.spool import Spool

from .conftest import free_port
from .test_http_receiver import JS, PB, Rx
from .test_metrics_in import gauge, request
from .test_receiver import METRICS, call, spooled

T = time.time_ns() - 10**9


def cpu_request(*values: float, name="container.cpu.utilization") -> dict:
    return request("cart", "cart-1", [gauge(name, T, v) for v in values])


def proto(obj: dict) -> bytes:
    return json_format.Parse(json.dumps(obj), ExportMetricsServiceRequest()).SerializeToString()


@pytest.fixture
def grpc_rx(tmp_path):
    metrics = SelfMetrics()
    spool = Spool(tmp_path / "spool", fsync="never", metrics=metrics)
    rx = OtlpReceiver(OtlpConfig(grpc_listen=f"127.0.0.1:{free_port()}"), spool, metrics)
    rx.start()
    channel = grpc.insecure_channel(rx.cfg.grpc_listen)
    yield spool, metrics, channel
    channel.close()
    rx.stop(0)
    spool.close()


def test_grpc_metrics_service_export(grpc_rx):
    spool, metrics, ch = grpc_rx
    resp = ExportMetricsServiceResponse.FromString(call(ch, METRICS, proto(cpu_request(0.9, 0.5))))
    assert not resp.HasField("partial_success")
    (batch,) = spooled(spool)
    assert isinstance(batch, MetricBatch) and batch.value.tolist() == [0.9, 0.5]
    assert batch.names == ("container.cpu.utilization",) and batch.services == ("cart",)
    assert metrics.counter("accepted_metric_points") == 2 and metrics.counter("requests", "metrics", "OK") == 1
    nameless = proto(cpu_request(0.9, name=""))
    resp = ExportMetricsServiceResponse.FromString(call(ch, METRICS, nameless))
    assert resp.partial_success.rejected_data_points == 1
    assert metrics.counter("rejected_metric_points", "invalid") == 1
    with pytest.raises(grpc.RpcError) as err:
        call(ch, METRICS, b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def rx(tmp_path):
    r = Rx(tmp_path)
    yield r
    r.close()


def test_http_metrics_protobuf_and_json(rx):
    r = rx.post("/v1/metrics", proto(cpu_request(0.9)))
    assert r.status_code == 200 and not ExportMetricsServiceResponse.FromString(r.content).HasField("partial_success")
    r = rx.post("/v1/metrics", orjson.dumps(cpu_request(0.7, 0.8)), headers=JS)
    assert r.status_code == 200 and r.json() == {}
    first, second = rx.spooled()
    assert first.value.tolist() == [0.9] and second.value.tolist() == [0.7, 0.8]
    assert second.instances == ("cart-1",) and second.time_ns.tolist() == [T, T]
    assert rx.metrics.counter("accepted_metric_points") == 3 and rx.metrics.counter("received_metric_points") == 3
    assert rx.metrics.counter("requests", "metrics", "200") == 2


def test_http_metrics_partial_success_and_malformed(rx):
    r = rx.post("/v1/metrics", orjson.dumps(cpu_request(0.9, name="")), headers=JS)
    assert r.status_code == 200 and int(r.json()["partialSuccess"]["rejectedDataPoints"]) == 1
    r = rx.post("/v1/metrics", proto(cpu_request(0.9, name="")), headers=PB)
    assert ExportMetricsServiceResponse.FromString(r.content).partial_success.rejected_data_points == 1
    assert rx.post("/v1/metrics", b'{"resourceMetrics": 5}', headers=JS).status_code == 400
    assert rx.post("/v1/metrics", b"\x0a\xff\xff\xff\xff\x0f", headers=PB).status_code == 400
    assert rx.post("/v1/metrics", b"", headers=PB).status_code == 200
    assert rx.metrics.counter("rejected_metric_points", "invalid") == 2 and rx.spooled() == []
