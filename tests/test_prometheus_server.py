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
    def start(scrape_target: str, job_extra: str = ""):
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: telepipe\n"
            f"    static_configs:\n      - targets: ['{scrape_target}']\n" + job_extra
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


# docs/trace-analytics.md: Grafana's service-graph view reads Tempo's names
GRAFANA_NAMES = """    metric_relabel_configs:
      - source_labels: [__name__]
        regex: telepipe_service_graph_(.*)
        target_label: __name__
        replacement: traces_service_graph_$1
"""


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (make test installs it as root)")
def test_service_graph_families_under_the_names_grafana_reads(daemon_factory, prometheus):
    """With the relabelling rule of the docs, the service-graph requests are in Prometheus as
    ``traces_service_graph_*``, the names Grafana's service-graph view queries."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    d = daemon_factory("[windows]\nidle_timeout_s = 1.0\n[servicegraph]\nsample_one_in = 1\n")
    tp = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)))
    tracer = tp.get_tracer("graph")
    for i in range(7):
        tracer.start_span("SELECT orders", kind=trace.SpanKind.CLIENT, attributes={
            "db.system.name": "postgresql", "db.namespace": "orders", "db.query.text": f"SELECT {i}"}).end()  # fmt: skip
    assert tp.force_flush(30_000)
    prom = prometheus(f"127.0.0.1:{d.http_port}", GRAFANA_NAMES)
    promql = 'sum(traces_service_graph_request_total{client="shop",server="orders",connection_type="database"})'
    deadline = time.monotonic() + 60
    result = []
    while time.monotonic() < deadline:
        result = query(prom, promql)
        if result and float(result[0]["value"][1]) == 7:
            break
        time.sleep(0.5)
    assert result and float(result[0]["value"][1]) == 7
    hist = query(prom, 'traces_service_graph_request_server_seconds_count{server="orders"}')
    assert hist and float(hist[0]["value"][1]) == 7
    assert query(prom, "telepipe_service_graph_request_total") == []  # renamed, not copied


class Proxy:
    """Forwards remote-write POSTs to Prometheus; ``script`` holds statuses to answer instead first."""

    def __init__(self, upstream: str) -> None:
        import threading
        from collections import deque
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.script: deque[int] = deque()
        self.answers: list[int] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if state.script:
                    status, data = state.script.popleft(), b"scripted failure"
                else:
                    r = httpx.post(upstream + self.path, content=body, headers={
                        k: self.headers[k] for k in ("Content-Type", "Content-Encoding",
                                                     "X-Prometheus-Remote-Write-Version")})  # fmt: skip
                    status, data = r.status_code, r.content
                state.answers.append(status)
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/api/v1/write"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()


def _export_window(target: str, op: str, spans: int, end_ns: int) -> None:
    channel = grpc.insecure_channel(target)
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=None, response_deserializer=None)  # fmt: skip
    export(trace_request([{"name": op, "start": end_ns - 2_000_000, "end": end_ns - i,
                           "span_id": (i + 1).to_bytes(8, "big")} for i in range(spans)]), timeout=10)  # fmt: skip
    channel.close()


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (make test installs it as root)")
def test_remote_write_to_real_prometheus_survives_an_outage_and_never_retries_400(daemon_factory, prometheus):
    prom = prometheus("127.0.0.1:1")  # nothing to scrape: it only receives remote write
    proxy = Proxy(prom)
    try:
        config = ("[windows]\nidle_timeout_s = 0.5\n[remote_write]\nbatch_max_wait_ms = 100\n"
                  "retry_min_ms = 100\nretry_max_ms = 400\nbreaker_failures = 3\nbreaker_cooldown_s = 0.5\n")  # fmt: skip
        d = daemon_factory(config, ["--remote-write-url", proxy.url])
        proxy.script.extend([503, 503, 503, 503, 500])  # an outage: retried, breaker opens, then catch-up
        now = time.time_ns() // (10 * 10**9) * 10 * 10**9
        _export_window(d.grpc_target, "rw-op", 37, now - 35 * 10**9)  # mid-window: no span on an edge
        time.sleep(1.5)
        _export_window(d.grpc_target, "rw-op", 23, now - 25 * 10**9)
        deadline = time.monotonic() + 60
        total = None
        while time.monotonic() < deadline:
            r = query(prom, 'sum(sum_over_time(telepipe_window_calls{span_name="rw-op"}[5m]))')
            total = float(r[0]["value"][1]) if r else None
            if total == 60:
                break
            time.sleep(0.5)
        assert total == 60, (total, proxy.answers)
        assert proxy.answers[:5] == [503, 503, 503, 503, 500] and 204 in proxy.answers[5:]
        lat = query(prom, 'telepipe_window_latency_seconds{span_name="rw-op",quantile="1"}[5m]')
        assert lat and all(float(v) > 0 for _, v in lat[0]["values"])

        sent_before = len(proxy.answers)
        proxy.script.append(400)
        time.sleep(0.5)
        _export_window(d.grpc_target, "rw-bad", 5, now - 15 * 10**9)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 400 not in proxy.answers[sent_before:]:
            time.sleep(0.2)
        time.sleep(1.0)
        assert proxy.answers[sent_before:].count(400) == 1  # rejected once, never retried
        text = d.metrics_text()
        assert 'telepipe_dropped_total{reason="remote_write_rejected_400"}' in text
    finally:
        proxy.stop()
