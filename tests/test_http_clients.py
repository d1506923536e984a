"""Real OTLP/HTTP clients against ``telepipe run``: the Python SDK's http/protobuf exporters (traces, logs,
metrics), the Node SDK's trace exporters (JSON and protobuf, run by ``node``), and a headless Chromium page
that posts OTLP/JSON cross-origin (CORS preflight included). Counts are checked exactly on /metrics, logs at
a strict Loki receiver with their trace ids.

Node packages and Chromium are installed by ``make clients`` (part of ``make test``); a test that needs one
that is missing fails when root (make should have installed it) and skips otherwise.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .conftest import DaemonProc, total, wait_for
from .loki_server import LokiServer

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parent / "clients" / "node"
WINDOW_NS = 10_000_000_000


def need(what: str, present: bool) -> None:
    """Fail when root (``make clients`` installs it), skip otherwise."""
    if present:
        return
    if os.geteuid() == 0:
        pytest.fail(f"{what} is missing although running as root: `make clients` installs it")
    pytest.skip(f"{what} is missing and not root: run `make clients` as root to install it")


def node() -> str:
    exe = shutil.which("node")
    need("node (Debian's nodejs)", exe is not None)
    need("tests/clients/node/node_modules (npm ci)", (NODE_DIR / "node_modules" / "@opentelemetry").is_dir())
    return exe


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium (Debian's chromium)", exe is not None)
    return exe


def past_window_ns() -> int:
    """Start of a window well in the past: spans there close as soon as the service goes idle."""
    return (time.time_ns() // WINDOW_NS - 6) * WINDOW_NS


@pytest.fixture(scope="module")
def telepipe(tmp_path_factory):
    """One ``telepipe run`` for this module (each test sends its own services and counts deltas): OTLP/HTTP on
    a free loopback port, pages from ``http://127.0.0.1:*`` allowed with an ``X-Client`` header, logs to a
    strict Loki receiver. Yields (daemon, receiver base URL, Loki receiver)."""
    loki = LokiServer()
    config = """
[windows]
idle_timeout_s = 1.0

[otlp_http]
allowed_origins = ["http://127.0.0.1:*"]
allowed_headers = ["X-Client"]
"""
    d = DaemonProc(tmp_path_factory.mktemp("telepipe"), config, ["--loki-url", loki.url])
    base = f"http://127.0.0.1:{d.otlp_http_port}"  # DaemonProc gives OTLP/HTTP a free port
    try:
        empty = httpx.post(f"{base}/v1/traces", content=b"", headers={"Content-Type": "application/x-protobuf"})
        assert empty.status_code == 200  # an empty request is a success
        yield d, base, loki
    finally:
        d.stop()  # before the Loki receiver goes: the daemon flushes its sinks on the way out
        loki.stop()


def metric(d, name: str, **labels: str) -> float:
    return total(d.metrics_text(), name, **labels)


def since(d, name: str):
    """How much the counter ``name`` has grown since this call."""
    start = metric(d, name)
    return lambda: metric(d, name) - start


def wait_value(get, want: float, timeout: float = 30.0) -> None:
    """Wait until ``get()`` reaches ``want``; then it must be exactly ``want``."""
    try:
        wait_for(lambda: get() >= want, timeout)
    except TimeoutError:
        pass
    assert get() == want


def wait_metric(d, name: str, want: float, **labels: str) -> None:
    wait_value(lambda: metric(d, name, **labels), want)


# ---------------------------------------------------------------------------------------------------------
# A recording OTLP/HTTP endpoint and page server (checks the clients themselves, and serves the browser page)

PROTO = {"traces": ExportTraceServiceRequest, "logs": ExportLogsServiceRequest, "metrics": ExportMetricsServiceRequest}


def count_items(signal: str, content_type: str, body: bytes) -> int:
    """Spans, log records or metric data points in an OTLP request body."""
    if content_type == "application/json":
        doc = json.loads(body)
        if signal == "traces":
            return sum(len(s.get("spans", [])) for r in doc.get("resourceSpans", []) for s in r.get("scopeSpans", []))
        return sum(len(s.get("logRecords", [])) for r in doc.get("resourceLogs", []) for s in r.get("scopeLogs", []))
    req = PROTO[signal].FromString(body)
    if signal == "traces":
        return sum(len(s.spans) for r in req.resource_spans for s in r.scope_spans)
    if signal == "logs":
        return sum(len(s.log_records) for r in req.resource_logs for s in r.scope_logs)
    n = 0
    for m in (m for r in req.resource_metrics for s in r.scope_metrics for m in s.metrics):
        n += len(getattr(m, m.WhichOneof("data")).data_points)
    return n


class Recorder:
    """Serves ``pages`` on GET; records OTLP POSTs as (path, content type, items, headers), answers ``status``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.status = 200
        self.pages: dict[str, str] = {}
        self.posts: list[tuple[str, str, int, dict]] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = state.pages.get(self.path)
                self._answer(200 if page else 404, "text/html", (page or "not found").encode())

            def do_POST(self) -> None:
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ctype = self.headers.get("Content-Type", "")
                n = count_items(self.path.rsplit("/", 1)[-1], ctype, body)
                state.posts.append((self.path, ctype, n, dict(self.headers)))
                self._answer(state.status, ctype, b"{}" if ctype == "application/json" else b"")

            def _answer(self, status: int, ctype: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.base = f"http://{host}:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recorder():
    started: list[Recorder] = []

    def start(host: str = "127.0.0.1") -> Recorder:
        started.append(Recorder(host))
        return started[-1]

    yield start
    for r in started:
        r.stop()


# ---------------------------------------------------------------------------------------------------------
# Clients


def run_node(endpoint: str, protocol: str, service: str, count: int, end_ms: int) -> dict:
    """send_spans.js: exits 0 only when every span was exported; prints what it exported."""
    cmd = [node(), str(NODE_DIR / "send_spans.js"), endpoint, protocol, service, str(count), str(end_ms)]
    p = subprocess.run(cmd, cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (protocol, p.returncode, p.stdout, p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


SERVICES = {"frontend": ("GET /", "GET /cart"), "checkout": ("POST /checkout", "GET /quote"), "cart": ("GET /items",)}


def python_traces_and_logs(base: str, per_op: int, log_every: int) -> tuple[dict, list[str], list[str]]:
    """Spans from three services (one TracerProvider each, like three processes) over http/protobuf; every
    ``log_every``-th checkout span logs an error inside it. Returns ({(service, op): n}, log lines, trace ids)."""
    t0 = past_window_ns() + 1_000_000_000
    sent: dict[tuple[str, str], int] = {}
    lines, trace_ids, providers = [], [], []
    lp = LoggerProvider(resource=Resource.create({"service.name": "checkout", "service.instance.id": "checkout-1"}))
    lp.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{base}/v1/logs")))
    pylog = logging.getLogger("http-clients-app")
    pylog.propagate = False
    pylog.handlers[:] = [LoggingHandler(logger_provider=lp)]
    pylog.setLevel(logging.INFO)
    for service, ops in SERVICES.items():
        tp = TracerProvider(resource=Resource.create({"service.name": service, "service.instance.id": f"{service}-1"}))
        tp.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"), max_export_batch_size=64)
        )
        providers.append(tp)
        tracer = tp.get_tracer("http-clients")
        for op in ops:
            for i in range(per_op):
                end = t0 + i * 10_000_000
                span = tracer.start_span(op, kind=trace.SpanKind.SERVER, start_time=end - 3_000_000 - i * 1000)
                if service == "checkout" and i % log_every == 0:
                    with trace.use_span(span):
                        pylog.error("%s failed for order %d", op, i)
                    lines.append(f"{op} failed for order {i}")
                    trace_ids.append(format(span.get_span_context().trace_id, "032x"))
                span.end(end_time=end)
            sent[(service, op)] = per_op
    for tp in providers:
        assert tp.force_flush(30_000)
        tp.shutdown()
    assert lp.force_flush(30_000)
    lp.shutdown()
    return sent, lines, trace_ids


def python_metrics(base: str, flushes: int) -> int:
    """A gauge with two attribute sets, a counter and a histogram (one set each), collected ``flushes``
    times by force_flush: 4 data points per export. Returns the points sent."""

    def cpu(_options):
        return [Observation(0.9, {"cpu": "0"}), Observation(0.7, {"cpu": "1"})]

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), export_interval_millis=3_600_000
    )
    resource = Resource.create({"service.name": "payments", "service.instance.id": "payments-1"})
    mp = MeterProvider(resource=resource, metric_readers=[reader])
    meter = mp.get_meter("http-clients")
    meter.create_observable_gauge("container.cpu.utilization", callbacks=[cpu], unit="1")
    requests = meter.create_counter("http.server.requests")
    latency = meter.create_histogram("http.server.duration", unit="s")
    for i in range(flushes):
        requests.add(3, {"route": "/pay"})
        latency.record(0.01 * (i + 1), {"route": "/pay"})
        assert mp.force_flush(30_000)
    mp.shutdown()  # cumulative temporality: the shutdown collects and exports once more
    return 4 * (flushes + 1)


# ---------------------------------------------------------------------------------------------------------
# The clients themselves, against the recorder (independent of the receiver)


def test_clients_send_what_they_count(recorder):
    """Each client, as used below, sends exactly what the tests expect, in the content type expected."""
    rec = recorder()
    sent, lines, _ = python_traces_and_logs(rec.base, per_op=10, log_every=5)
    points = python_metrics(rec.base, flushes=2)

    def got(path: str, ctype: str) -> int:
        return sum(n for p, c, n, _ in rec.posts if p == path and c == ctype)

    assert got("/v1/traces", "application/x-protobuf") == sum(sent.values()) == 50
    assert got("/v1/logs", "application/x-protobuf") == len(lines) == 4
    assert got("/v1/metrics", "application/x-protobuf") == points == 12
    rec.posts.clear()
    end_ms = past_window_ns() // 1_000_000
    assert run_node(f"{rec.base}/v1/traces", "json", "node-json", 300, end_ms)["exported"] == 300
    assert run_node(f"{rec.base}/v1/traces", "proto", "node-proto", 300, end_ms)["exported"] == 300
    assert got("/v1/traces", "application/json") == 300 and got("/v1/traces", "application/x-protobuf") == 300
    # Node's exporters stream their bodies (Transfer-Encoding: chunked, no Content-Length): receivers must cope.
    assert {h.get("Transfer-Encoding") for *_, h in rec.posts} == {"chunked"}
    # a refused export (400: not retried) is a non-zero exit, not a log line
    rec.status = 400
    p = subprocess.run([node(), str(NODE_DIR / "send_spans.js"), f"{rec.base}/v1/traces", "proto", "x", "3"],
                       cwd=NODE_DIR, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 1 and json.loads(p.stdout.splitlines()[-1])["exported"] == 0


# ---------------------------------------------------------------------------------------------------------
# The clients against ``telepipe run``


def test_python_sdk_traces_and_logs_over_http_protobuf(telepipe):
    d, base, loki = telepipe
    spans, logs = since(d, "telepipe_accepted_spans_total"), since(d, "telepipe_accepted_logs_total")
    processed, late = since(d, "telepipe_processed_spans_total"), since(d, "telepipe_late_spans_total")
    sent, lines, trace_ids = python_traces_and_logs(base, per_op=60, log_every=10)
    n = sum(sent.values())
    assert n == 300 and len(lines) == 12
    assert spans() == n and logs() == len(lines)  # acknowledged = appended: exact at once
    wait_value(processed, n)
    for (service, op), k in sent.items():
        wait_metric(d, "telepipe_calls_total", k, service_name=service, span_name=op)
    assert late() == 0

    def log_entries():
        streams = [st for doc in loki.accepted for st in doc["streams"] if "level" in st["stream"]]
        got = [v for st in streams if st["stream"]["service"] == "checkout" for v in st["values"]]
        return got if len(got) >= len(lines) else None

    entries = wait_for(log_entries)
    assert sorted(v[1] for v in entries) == sorted(lines)
    assert sorted(v[2]["trace_id"] for v in entries) == sorted(trace_ids)
    assert logs() == len(lines) and loki.violations == []


def test_python_sdk_metrics_over_http_protobuf(telepipe):
    d, base, _ = telepipe
    accepted, rejected = (
        since(d, "telepipe_accepted_metric_points_total"),
        since(d, "telepipe_rejected_metric_points_total"),
    )
    points = python_metrics(base, flushes=3)
    assert points == 16
    assert accepted() == points and rejected() == 0


def test_node_sdk_exporters_json_and_protobuf(telepipe):
    d, base, _ = telepipe
    processed = since(d, "telepipe_processed_spans_total")
    end_ms = (past_window_ns() + 1_000_000_000) // 1_000_000
    for protocol, count in (("json", 301), ("proto", 257)):
        accepted = since(d, "telepipe_accepted_spans_total")
        out = run_node(f"{base}/v1/traces", protocol, f"node-{protocol}", count, end_ms)
        assert out["exported"] == count and out["requests"] == -(-count // 128)
        assert accepted() == count, protocol
    for protocol, count in (("json", 301), ("proto", 257)):
        wait_metric(d, "telepipe_calls_total", (count + 1) // 2, service_name=f"node-{protocol}", span_name="GET /a")
        wait_metric(d, "telepipe_calls_total", count // 2, service_name=f"node-{protocol}", span_name="GET /b")
    assert processed() == 301 + 257


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>OTLP/JSON from a page</title></head><body>
<div id="status">pending</div>
<script>
const request = %s;
fetch("%s/v1/traces", {
  method: "POST",
  headers: {"Content-Type": "application/json", "X-Client": "browser-page"},
  body: JSON.stringify(request),
}).then(r => r.text().then(() => { document.getElementById("status").textContent = "status " + r.status; }))
  .catch(e => { document.getElementById("status").textContent = "error " + e.name; });
</script></body></html>
"""


def browser_request(service: str, k: int) -> dict:
    """An ExportTraceServiceRequest as a browser exporter writes it in JSON: hex ids, integer enums,
    lowerCamelCase keys, 64-bit times as strings."""
    t0 = past_window_ns() + 1_000_000_000
    spans = [{
        "traceId": f"{0xB0 + i:032x}", "spanId": f"{i + 1:016x}", "name": "documentLoad" if i % 3 == 0 else "fetch",
        "kind": 3 if i % 3 else 1, "startTimeUnixNano": str(t0 + i * 1_000_000),
        "endTimeUnixNano": str(t0 + i * 1_000_000 + 250_000), "attributes": [], "status": {"code": 0},
    } for i in range(k)]  # fmt: skip
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": service}},
                               {"key": "telemetry.sdk.language", "value": {"stringValue": "webjs"}}]}  # fmt: skip
    scope = {"scope": {"name": "@opentelemetry/sdk-trace-web"}, "spans": spans}
    return {"resourceSpans": [{"resource": resource, "scopeSpans": [scope]}]}


def load_page(url: str, profile: Path) -> str:
    """What the page wrote into its status element, as headless Chromium's DOM dump shows it."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
           "--dump-dom", "--virtual-time-budget=10000", url]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    m = re.search(r'<div id="status">([^<]*)</div>', p.stdout)
    assert m, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    return m.group(1)


def test_browser_page_posts_otlp_json_cross_origin(telepipe, recorder, tmp_path):
    """Chromium loads a page from one origin that POSTs OTLP/JSON to the receiver on another origin (the
    custom header and the JSON content type make it a preflighted request). An allowed origin gets 200 and
    every span counted; an origin outside ``allowed_origins`` is stopped by the browser, nothing counted."""
    d, base, _ = telepipe
    allowed, other = recorder("127.0.0.1"), recorder("127.0.0.2")  # two origins; only the first matches
    k = 37
    for rec, service in ((allowed, "browser-app"), (other, "blocked-app")):
        rec.pages["/page.html"] = PAGE % (json.dumps(browser_request(service, k)), base)

    accepted = since(d, "telepipe_accepted_spans_total")
    assert load_page(f"{allowed.base}/page.html", tmp_path / "profile-a") == "status 200"
    assert accepted() == k
    assert load_page(f"{other.base}/page.html", tmp_path / "profile-b") == "error TypeError"
    assert accepted() == k
    wait_metric(d, "telepipe_calls_total", (k + 2) // 3, service_name="browser-app", span_name="documentLoad")
    wait_metric(d, "telepipe_calls_total", k - (k + 2) // 3, service_name="browser-app", span_name="fetch")
    assert metric(d, "telepipe_calls_total", service_name="blocked-app") == 0
    assert allowed.posts == [] and other.posts == []  # the page went to the receiver, not back to its origin
