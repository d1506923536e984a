"""A client built from the same proto, behaving as KEDA does, reads telepipe's desired replicas."""

import math
import time

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from sinks.keda import externalscaler_pb2 as pb
from sinks.keda import externalscaler_pb2_grpc as pb_grpc

from .conftest import ROOT, free_port

pytestmark = pytest.mark.integration

CONFIG = """
[windows]
idle_timeout_s = 1.0
allowed_lateness_s = 0.0

[scaling]
target_rps_per_replica = 5.0
forecast_horizon_s = 0.0
"""


def request(service, pods, calls, end_ns):
    req = ExportTraceServiceRequest()
    for p in range(pods):
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = service
        rs.resource.attributes.add(key="service.instance.id").value.string_value = f"{service}-{p}"
        ss = rs.scope_spans.add()
        for i in range(calls // pods):
            sp = ss.spans.add()
            sp.trace_id, sp.span_id = (p * 1000 + i + 1).to_bytes(16, "big"), (i + 1).to_bytes(8, "big")
            sp.name, sp.kind = "GET /", 2
            sp.start_time_unix_nano, sp.end_time_unix_nano = end_ns - 1_000_000, end_ns - i
    return req.SerializeToString()


def gauges(text, name):
    return {s.labels["service_name"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}  # fmt: skip


def keda_replicas(stub, service):
    """What KEDA's HPA does with an external scaler: spec, metrics, ceil(value / target)."""
    ref = pb.ScaledObjectRef(name=f"so-{service}", namespace="default", scalerMetadata={"service": service})
    spec = stub.GetMetricSpec(ref, timeout=5).metricSpecs[0]
    value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName), timeout=5)
    metric = value.metricValues[0]
    target = spec.targetSizeFloat or spec.targetSize
    current = metric.metricValueFloat or metric.metricValue
    return math.ceil(current / target)


def test_keda_client_reads_desired_replicas_equal_to_the_gauge(daemon_factory):
    keda_port = free_port()
    d = daemon_factory(CONFIG, ["--keda", f"127.0.0.1:{keda_port}"])
    channel = grpc.insecure_channel(d.grpc_target)
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None, response_deserializer=None,
    )  # fmt: skip
    now = time.time_ns() // 10**10 * 10**10 - 10**10
    export(request("cart", pods=2, calls=180, end_ns=now + 5 * 10**9), timeout=10)  # 18/s: 4 replicas
    export(request("ads", pods=3, calls=30, end_ns=now + 5 * 10**9), timeout=10)  # 3/s: 1 replica
    channel.close()

    deadline = time.monotonic() + 30
    desired = {}
    while time.monotonic() < deadline and set(desired) != {"cart", "ads"}:
        desired = gauges(d.metrics_text(), "telepipe_desired_replicas")
        time.sleep(0.2)
    assert desired == {"cart": 4.0, "ads": 1.0}
    observed = gauges(d.metrics_text(), "telepipe_observed_replicas")
    assert observed == {"cart": 2.0, "ads": 3.0}

    keda = grpc.insecure_channel(f"127.0.0.1:{keda_port}")
    stub = pb_grpc.ExternalScalerStub(keda)
    for service, want in desired.items():
        assert keda_replicas(stub, service) == want
        ref = pb.ScaledObjectRef(name="x", scalerMetadata={"service": service})
        assert stub.IsActive(ref, timeout=5).result is True
        stream = stub.StreamIsActive(ref, timeout=5)
        assert next(stream).result is True
        stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=pb.ScaledObjectRef(scalerMetadata={"service": "nope"})))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.IsActive(pb.ScaledObjectRef(name="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    keda.close()


def test_checked_in_stubs_match_the_proto(tmp_path):
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(ROOT / "sinks/keda/externalscaler.proto")])  # fmt: skip
    assert rc == 0
    for name in ("externalscaler_pb2.py", "externalscaler_pb2_grpc.py"):
        assert (tmp_path / "sinks/keda" / name).read_text() == (ROOT / "sinks/keda" / name).read_text(), name
