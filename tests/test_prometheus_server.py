"""A real Prometheus server (Debian's package) scrapes telepipe; PromQL sees the call counts."""

import shutil
import subprocess
import time

import grpc
import httpx
import pytest

from .conftest import free_port, wait_http
from .test_decode import trace_request

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def prometheus(tmp_path):
    def start(scrape_target: str):
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: telepipe\n"
            f"    static_configs:\n      - targets: ['{scrape_target}']\n"
        )
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-remote-write-receiver"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        started.append(proc)
        wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=60, proc=proc)
        return f"http://127.0.0.1:{port}"

    started: list[subprocess.Popen] = []
    yield start
    for p in started:
        p.terminate()
        p.wait(30)


def query(base: str, promql: str):
    r = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (make test installs it as root)")
def test_real_prometheus_scrapes_call_counts(daemon_factory, prometheus):
    d = daemon_factory("[windows]\nidle_timeout_s = 1.0\n")
    channel = grpc.insecure_channel(d.grpc_target)
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None, response_deserializer=None,
    )  # fmt: skip
    now = time.time_ns()
    for i in range(37):
        export(trace_request([{"name": "GET /promql", "start": now - 2_000_000, "end": now}] * 10), timeout=10)
    channel.close()
    prom = prometheus(f"127.0.0.1:{d.http_port}")
    deadline = time.monotonic() + 60
    result = []
    while time.monotonic() < deadline:
        result = query(prom, 'sum(telepipe_calls_total{service_name="checkout",span_name="GET /promql"})')
        if result and float(result[0]["value"][1]) == 370:
            break
        time.sleep(0.5)
    assert result and float(result[0]["value"][1]) == 370
    up = query(prom, 'up{job="telepipe"}')
    assert up and up[0]["value"][1] == "1"
