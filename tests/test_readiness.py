"""/readyz follows the dataflow, and nothing the dataflow thread does waits on a child process."""

import threading
import time

import grpc
import httpx

from pipeline import flow
from pipeline.config import Config, HttpConfig, OtlpConfig, RecoveryConfig, SpoolConfig
from telepipe import daemon

from .conftest import wait_for
from .test_decode import trace_request


def test_readyz_is_503_while_the_flow_is_stuck_with_a_backlog(tmp_path, monkeypatch):
    gate = threading.Event()
    real = flow.preaggregate

    def stuck(batch, spec):
        gate.wait(60)  # the dataflow thread is stuck here until the test opens the gate
        return real(batch, spec)

    monkeypatch.setattr(flow, "preaggregate", stuck)
    cfg = Config(otlp=OtlpConfig(grpc_listen="127.0.0.1:0"), http=HttpConfig(listen="127.0.0.1:0", ready_stall_s=1.0),
                 spool=SpoolConfig(data_dir=str(tmp_path / "data")), recovery=RecoveryConfig(enabled=False))  # fmt: skip
    d = daemon.Daemon(cfg)
    runner = threading.Thread(target=d.run, daemon=True)
    runner.start()
    readyz = f"http://127.0.0.1:{d.http.port}/readyz"
    try:
        wait_for(lambda: httpx.get(readyz).status_code == 200)
        channel = grpc.insecure_channel(f"127.0.0.1:{d.receiver.port}")
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)  # fmt: skip
        now = time.time_ns()
        export(trace_request([{"start": now - 10**6, "end": now}]), timeout=5)  # read, then stuck in the flow
        time.sleep(0.5)
        export(trace_request([{"start": now - 10**6, "end": now}]), timeout=5)  # acknowledged, waits in the spool
        stalled = wait_for(lambda: (r := httpx.get(readyz)).status_code == 503 and r.text, timeout=10)
        assert "dataflow stalled" in stalled and "bytes waiting in the spool" in stalled
        gate.set()
        wait_for(lambda: httpx.get(readyz).status_code == 200, timeout=10)  # it moves again: ready
        channel.close()
    finally:
        gate.set()
        d.shutdown()
        runner.join(30)


def test_committed_snapshots_are_read_off_the_calling_thread(tmp_path, monkeypatch):
    from telepipe import recovery

    threads = []

    class Done:
        stdout = b'{"shard-000": 7}'

    def slow_child(*args, **kwargs):
        threads.append(threading.current_thread().name)
        time.sleep(0.5)  # a slow disk, a stuck child: the caller must not wait for it
        return Done()

    monkeypatch.setattr(recovery.subprocess, "run", slow_child)
    committed = recovery.CommittedSnapshots(tmp_path, refresh_s=0.05)
    try:
        assert committed.spool_segment("shard-000") is None  # nothing known yet, and no waiting for it
        assert wait_for(lambda: committed.spool_segment("shard-000"), timeout=10) == 7
        assert threads and threading.current_thread().name not in threads
    finally:
        committed.close()
