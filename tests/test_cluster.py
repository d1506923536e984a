"""Scale-out: ``--processes 2`` gives the same window results as one process, and a live
two-process cluster shares the OTLP port, splits services between its /metrics, loses nothing,
and serves every service's scaling signal from process 0's KEDA endpoint."""

import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sinks.keda import externalscaler_pb2_grpc as pb_grpc
from telepipe.cli import main as cli_main
from telepipe.daemon import local_shards

from .conftest import ONLINEBOUTIQUE, ROOT, TRAINTICKET, ZIPKIN, free_port, wait_http
from .test_keda import keda_replicas, request

TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.mark.integration
def test_replay_on_two_processes_gives_the_same_results_as_one(tmp_path):
    outs = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}.jsonl"
        subprocess.run(
            [sys.executable, "-m", "telepipe.cli", "replay", str(ONLINEBOUTIQUE), str(TRAINTICKET), str(ZIPKIN),
             "--emit-jsonl", str(out), "--processes", str(processes)],
            cwd=ROOT, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        outs.append(out.read_bytes())
    assert outs[0].count(b"\n") > 1000
    assert outs[0] == outs[1]


def _series(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get("service_name", "")] = out.get(s.labels.get("service_name", ""), 0) + s.value
    return out


@pytest.mark.integration
def test_two_processes_share_the_port_split_the_services_and_lose_nothing(tmp_path):
    grpc_port, http_port, keda_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "telepipe.toml"
    cfg.write_text("[windows]\nidle_timeout_s = 1.0\nallowed_lateness_s = 0.0\n\n"
                   "[scaling]\ntarget_rps_per_replica = 5.0\nforecast_horizon_s = 0.0\n")  # fmt: skip
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "telepipe.cli", "run", "--config", str(cfg), "--processes", "2",
         "--otlp-grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
         "--otlp-http", f"127.0.0.1:{free_port()}",
         "--keda", f"127.0.0.1:{keda_port}", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for i in range(2):
            wait_http(f"http://127.0.0.1:{http_port + i}/readyz", proc=supervisor)
        services = [f"svc-{k}" for k in range(12)]
        sent = 0
        end_ns = time.time_ns() - 2_000_000_000
        for k, service in enumerate(services * 2):  # a new connection per request: spread by the kernel
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                ch.unary_unary(TRACES, request_serializer=None, response_deserializer=None)(
                    request(service, 2, 20, end_ns + k), timeout=10
                )
            sent += 20
        shards = sorted(p.name for p in (tmp_path / "data" / "spool").iterdir())
        assert shards == ["shard-000", "shard-001"]

        def totals(name):
            return [_series(httpx.get(f"http://127.0.0.1:{http_port + i}/metrics").text, name) for i in range(2)]

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            processed = sum(t.get("", 0) for t in totals("telepipe_processed_spans_total"))
            if processed >= sent:
                break
            time.sleep(0.5)
        accepted = sum(t.get("", 0) for t in totals("telepipe_accepted_spans_total"))
        assert accepted == sent and processed == sent
        assert all(t.get("", 0) > 0 for t in totals("telepipe_accepted_spans_total"))  # both receivers took some
        calls = totals("telepipe_calls_total")
        assert set(calls[0]) | set(calls[1]) == set(services)
        assert not set(calls[0]) & set(calls[1])  # each service's state lives on one process
        assert calls[0] and calls[1]
        with grpc.insecure_channel(f"127.0.0.1:{keda_port}") as ch:  # process 0 answers for every service
            stub = pb_grpc.ExternalScalerStub(ch)
            for service in services:
                assert keda_replicas(stub, service) >= 1
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0, supervisor.stderr.read().decode()[-3000:]


def test_a_smaller_cluster_reads_the_shards_a_larger_one_left(tmp_path):
    spool = tmp_path / "spool"
    for i in range(5):
        (spool / f"shard-{i:03d}").mkdir(parents=True)
    assert local_shards(spool, 0, 2) == ["shard-000", "shard-002", "shard-004"]
    assert local_shards(spool, 1, 2) == ["shard-001", "shard-003"]
    assert local_shards(spool, 0, 1) == [f"shard-{i:03d}" for i in range(5)]
    assert local_shards(tmp_path / "none", 0, 1) == ["shard-000"]


@pytest.mark.parametrize("args", [
    ["--process-id", "0"], ["--addresses", "127.0.0.1:1"], ["--process-id", "2", "--addresses", "a:1,b:2"],
    ["--processes", "2", "--process-id", "0", "--addresses", "a:1,b:2"],
])  # fmt: skip
def test_cluster_flags_are_checked(args, capsys):
    assert cli_main(["run", *args]) == 2
    assert "telepipe:" in capsys.readouterr().err
