"""A client built from the same proto, behaving as KEDA does, reads telepipe's desired replicas.

The daemon test goes end to end; the rest run the server in process on a board the test owns, with a real gRPC
client: open StreamIsActive streams must not starve the unary calls, their number is bounded, stop() ends them.
"""

import logging
import math
import queue
import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.model import ScalingUpdate
from sinks.keda import KedaScaler
from sinks.keda import externalscaler_pb2 as pb
from sinks.keda import externalscaler_pb2_grpc as pb_grpc
from sinks.keda import scaler as scaler_module
from sinks.keda.signals import ScalingSignals

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


# The server in process, on a board the test owns: streams, their limit and stop().

BOARD = {"checkout": (3, 2.5), "idle": (1, 0.0)}


def ref(service):
    return pb.ScaledObjectRef(name=f"so-{service}", namespace="default", scalerMetadata={"service": service})


class Watch:
    """One StreamIsActive call held open as KEDA's external-push trigger holds it, read on its own thread."""

    def __init__(self, stub, service="checkout"):
        self.call = stub.StreamIsActive(ref(service), timeout=60)
        self.got = queue.Queue()  # IsActive results, then the status code the stream ended with
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for message in self.call:
                self.got.put(message.result)
            self.got.put(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            self.got.put(e.code())

    def next(self, timeout=5.0):
        """The next result or end status; None when nothing came within ``timeout`` (a liveness bound)."""
        try:
            return self.got.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        self.call.cancel()
        self.thread.join(5)


@pytest.fixture
def scaler():
    started = []

    def make(max_streams=1000, lookup=BOARD.get):
        s = KedaScaler("127.0.0.1:0", lookup, max_streams=max_streams)
        s.start()
        started.append(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        started.append(channel)
        return s, pb_grpc.ExternalScalerStub(channel)

    yield make
    for s in started:
        if isinstance(s, grpc.Channel):
            s.close()
        else:
            s.stop(grace=0)  # a second stop() (the test's own) is nothing


def test_open_streams_do_not_starve_the_unary_calls(scaler):
    # The old server had 4 threads, each open stream held one: GetMetrics queued behind them until its deadline.
    _, stub = scaler(max_streams=8)
    watches = [Watch(stub) for _ in range(8)]
    first = [w.next() for w in watches]
    value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref("checkout")), timeout=2)  # old: DEADLINE_EXCEEDED
    assert value.metricValues[0].metricValue == 3
    assert stub.IsActive(ref("checkout"), timeout=2).result is True
    assert stub.IsActive(ref("idle"), timeout=2).result is False
    assert stub.GetMetricSpec(ref("checkout"), timeout=2).metricSpecs[0].targetSize == 1
    # ... while all 8 were open on the server: each had its first message, none has ended.
    assert first == [True] * 8, f"only {first.count(True)} of 8 streams were served"
    assert [w.got.empty() for w in watches] == [True] * 8
    for w in watches:
        w.close()


def test_streams_past_max_streams_are_refused_until_one_closes(scaler, caplog):
    _, stub = scaler(max_streams=8)
    watches = [Watch(stub) for _ in range(8)]
    assert [w.next() for w in watches] == [True] * 8
    with caplog.at_level(logging.WARNING, logger="telepipe.keda"):
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                next(stub.StreamIsActive(ref("checkout"), timeout=5))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "8" in err.value.details() and "keda.max_streams" in err.value.details()
    warnings = [r for r in caplog.records if r.name == "telepipe.keda" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keda.max_streams" in warnings[0].getMessage()  # once a minute, not per refusal

    watches.pop().close()
    # The server counts the stream closed once gRPC has cancelled its handler: retry briefly, as KEDA would.
    deadline = time.monotonic() + 10
    while True:
        w = Watch(stub)
        got = w.next()
        if got is True or time.monotonic() > deadline:
            break
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.05)
    assert got is True
    watches.append(w)
    for w in watches:
        w.close()


def test_stream_sends_changes_only_and_ends_when_the_service_is_gone(scaler, monkeypatch):
    monkeypatch.setattr(scaler_module, "STREAM_POLL_S", 0.05)
    board = dict(BOARD)
    _, stub = scaler(lookup=board.get)
    w = Watch(stub, "checkout")
    assert w.next() is True
    board["checkout"] = (3, 0.0)
    assert w.next() is False  # polls in between sent nothing: the activeness did not change
    del board["checkout"]
    assert w.next() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        next(stub.StreamIsActive(pb.ScaledObjectRef(name="x"), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stop_returns_with_streams_open_and_ends_them(scaler):
    s, stub = scaler(max_streams=8)
    watches = [Watch(stub) for _ in range(8)]
    assert [w.next() for w in watches] == [True] * 8
    stopper = threading.Thread(target=s.stop, kwargs={"grace": 1.0}, daemon=True)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() hung on open streams"
    assert [w.next() for w in watches] == [grpc.StatusCode.OK] * 8  # ended by the server, not cut off
    with pytest.raises(grpc.RpcError):
        stub.IsActive(ref("checkout"), timeout=2)
    s.stop()  # again: nothing


def test_scaler_built_but_never_started_stops():
    s = KedaScaler("127.0.0.1:0", BOARD.get)
    assert s.port > 0
    s.stop()


def update(service, desired, rate):
    return ScalingUpdate(service, 0, 1, desired, "test", "test", rate, rate)


def test_signals_expire_when_not_updated():
    now = [1000.0]
    board = ScalingSignals(stale_after_s=60.0, clock=lambda: now[0])
    board.update([update("a", 3, 2.0), "not an update", update("b", 1, 0.0)])
    assert board.lookup("a") == (3, 2.0) and board.lookup("b") == (1, 0.0) and board.lookup("c") is None

    now[0] += 30
    board.update(iter([update("a", 4, 2.5)]))  # any iterable
    now[0] += 45  # b: 75 s without an update, a: 45 s
    assert board.lookup("b") is None  # checked on lookup, between sweeps too
    assert board.lookup("a") == (4, 2.5)

    now[0] += 20  # a: 65 s
    board.update([])
    assert board._latest == {}  # swept out, not only hidden: the memory is what expiry is for

    board.update([update("a", 2, 1.0)])
    assert board.lookup("a") == (2, 1.0)  # back once updated again


def test_signals_sweep_at_most_once_a_second():
    now = [0.0]
    board = ScalingSignals(stale_after_s=10.0, clock=lambda: now[0])
    board.update([update("a", 1, 1.0)])  # sweeps (the first update does)
    now[0] = 9.8
    board.update([update("b", 1, 1.0)])  # sweeps: a is 9.8 s old, kept
    now[0] = 10.3
    board.update([])  # 0.5 s after the last sweep: none, a (10.3 s) is still held
    assert set(board._latest) == {"a", "b"}
    now[0] = 10.9
    board.update([])  # 1.1 s after it: a is swept out
    assert set(board._latest) == {"b"}


def test_signals_forget():
    board = ScalingSignals()
    board.update([update("a", 3, 2.0), update("b", 1, 1.0)])
    board.forget("a")
    board.forget("never-seen")
    assert board.lookup("a") is None and board.lookup("b") == (1, 1.0)
    board.update([update("a", 5, 3.0)])
    assert board.lookup("a") == (5, 3.0)
