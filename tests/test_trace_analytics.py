"""Trace analytics beyond span metrics (issue 15), end to end with the real OpenTelemetry
Python SDK exporters against ``telepipe run``.

- Sampling weights: spans whose tracestate carries ``ot=th:<threshold>`` count as the adjusted
  count the threshold gives (``th:c``: sampled 1 in 4, each counts 4) in call counts, histogram
  counts and percentiles.
- Databases: statements normalized and counted, N+1 findings, slow queries, on /metrics, in
  ``--emit-jsonl`` and at a strict Loki receiver.
- Exemplars: trace ids on the duration histogram when the scraper asks for OpenMetrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import TraceState
from prometheus_client.openmetrics import parser as om_parser

from .conftest import samples, total, wait_for
from .loki_server import LokiServer

pytestmark = pytest.mark.integration

CONFIG = """
[windows]
idle_timeout_s = 1.0
"""
WINDOW = 10_000_000_000


class ThresholdSampler(Sampler):
    """Samples every span it is asked about and says so in the tracestate, as a consistent
    probability sampler does for the spans it keeps: ``ot=th:<threshold>``."""

    def __init__(self, threshold: str) -> None:
        self.threshold = threshold

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        state = (trace_state or TraceState()).add("ot", f"th:{self.threshold}")
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)

    def get_description(self) -> str:
        return f"ThresholdSampler({self.threshold})"


def _calls(d, op: str) -> float | None:
    s = samples(d.metrics_text())
    labels = (("service_name", "shop"), ("span_kind", "SPAN_KIND_SERVER"), ("span_name", op),
              ("status_code", "STATUS_CODE_UNSET"))  # fmt: skip
    return s.get(("telepipe_calls_total", labels))


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sampled_spans_count_as_their_adjusted_count(daemon_factory, transport):
    """50 spans with ``ot=th:c`` count 200; 30 with ``th:8`` count 60; 20 without count 20.
    The duration histogram counts the same, and its sum is weighted too."""
    d = daemon_factory(CONFIG)

    def exporter():
        if transport == "grpc":
            return OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)
        return HttpSpanExporter(endpoint=f"http://127.0.0.1:{d.otlp_http_port}/v1/traces")

    base = (time.time_ns() // WINDOW - 6) * WINDOW  # a closed-past window, all spans in it
    for op, threshold, n in (("GET /quarter", "c", 50), ("GET /half", "8", 30), ("GET /all", None, 20)):
        tp = TracerProvider(resource=Resource.create({"service.name": "shop"}),
                            **({"sampler": ThresholdSampler(threshold)} if threshold else {}))  # fmt: skip
        tp.add_span_processor(BatchSpanProcessor(exporter()))
        tracer = tp.get_tracer("weights")
        for i in range(n):
            end = base + 1_000_000_000 + i * 10_000_000
            tracer.start_span(op, kind=trace.SpanKind.SERVER, start_time=end - 20_000_000).end(end_time=end)
        assert tp.force_flush(30_000)
    want = {"GET /quarter": 200, "GET /half": 60, "GET /all": 20}
    got = wait_for(lambda: {op: _calls(d, op) for op in want} if all(_calls(d, op) for op in want) else None)
    assert got == want
    s = samples(d.metrics_text())
    for op, count in want.items():
        labels = (("service_name", "shop"), ("span_kind", "SPAN_KIND_SERVER"), ("span_name", op),
                  ("status_code", "STATUS_CODE_UNSET"))  # fmt: skip
        assert s[("telepipe_duration_seconds_count", labels)] == count
        assert s[("telepipe_duration_seconds_sum", labels)] == pytest.approx(count * 0.02)
    assert s[("telepipe_accepted_spans_total", ())] == 100  # spans received: not weighted


def _db_span(tracer, name, statement, start, duration, system="postgresql", namespace="shop"):
    span = tracer.start_span(name, kind=trace.SpanKind.CLIENT, start_time=start,
                             attributes={"db.system.name": system, "db.query.text": statement,
                                         "db.namespace": namespace, "server.address": "db-1"})  # fmt: skip
    span.end(end_time=start + duration)


def test_database_statements_n_plus_one_and_slow_queries(daemon_factory, tmp_path):
    """20 traces, each a GET /orders whose handler runs SELECT ... WHERE order_id = <n> 8 times
    (10 ms each): 160 calls of one normalized statement and 20 N+1 findings; one 700 ms query:
    one slow query. A handler with 4 repeats, and one with 8 repeats of 2 ms (16 ms in all), are
    no N+1."""
    loki = LokiServer()
    out = tmp_path / "events.jsonl"
    try:
        d = daemon_factory(CONFIG, ["--loki-url", loki.url, "--emit-jsonl", str(out)])
        tp = TracerProvider(resource=Resource.create({"service.name": "shop"}))
        tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)))
        tracer = tp.get_tracer("db")
        ms = 1_000_000
        t = (time.time_ns() // WINDOW - 6) * WINDOW + 100 * ms
        trace_ids = []
        for n in range(20):
            parent = tracer.start_span("GET /orders", kind=trace.SpanKind.SERVER, start_time=t)
            trace_ids.append(format(parent.get_span_context().trace_id, "032x"))
            with trace.use_span(parent):
                for k in range(8):
                    _db_span(tracer, "SELECT items", f"SELECT * FROM items WHERE order_id = {n * 100 + k}",
                             t + ms + k * 11 * ms, 10 * ms)  # fmt: skip
            parent.end(end_time=t + 100 * ms)
            t += 120 * ms
        for name, repeats, each in (("GET /few", 4, 10 * ms), ("GET /quick", 8, 2 * ms)):
            parent = tracer.start_span(name, kind=trace.SpanKind.SERVER, start_time=t)
            with trace.use_span(parent):
                for k in range(repeats):
                    _db_span(tracer, "SELECT users", f"SELECT name FROM users WHERE id = {k}", t + ms + k * 11 * ms, each)
            parent.end(end_time=t + 100 * ms)
            t += 120 * ms
        parent = tracer.start_span("GET /report", kind=trace.SpanKind.SERVER, start_time=t)
        slow_trace = format(parent.get_span_context().trace_id, "032x")
        with trace.use_span(parent):
            _db_span(tracer, "SELECT orders", "SELECT count(*) FROM orders WHERE day = '2026-11-30'", t + ms, 700 * ms)
        parent.end(end_time=t + 800 * ms)
        assert tp.force_flush(30_000)

        items = "SELECT * FROM items WHERE order_id = ?"
        calls = {"service_name": "shop", "db_system": "postgresql", "db_statement": items}

        def arrived():
            text = d.metrics_text()
            return text if total(text, "telepipe_db_calls_total", **calls) >= 160 else None

        text = wait_for(arrived)
        assert total(text, "telepipe_db_calls_total", **calls) == 160
        assert total(text, "telepipe_db_duration_seconds_count", **calls) == 160
        assert total(text, "telepipe_db_duration_seconds_sum", **calls) == pytest.approx(1.6)
        users = {**calls, "db_statement": "SELECT name FROM users WHERE id = ?"}
        assert total(text, "telepipe_db_calls_total", **users) == 12
        assert total(text, "telepipe_n_plus_one_total", service_name="shop", span_name="GET /orders",
                     db_statement=items) == 20  # fmt: skip
        assert total(text, "telepipe_n_plus_one_total") == 20  # GET /few and GET /quick are not N+1
        slow = "SELECT count(*) FROM orders WHERE day = ?"
        assert total(text, "telepipe_slow_queries_total", service_name="shop", db_system="postgresql",
                     db_statement=slow) == 1  # fmt: skip
        assert total(text, "telepipe_slow_queries_total") == 1

        def findings_in_loki():
            found = [json.loads(v[1]) for doc in loki.accepted for st in doc["streams"]
                     if st["stream"].get("kind") == "finding" for v in st["values"]]  # fmt: skip
            return found if len(found) >= 21 else None

        found = wait_for(findings_in_loki)
        n1 = [f for f in found if f["finding"] == "n_plus_one"]
        assert sorted(f["trace_id"] for f in n1) == sorted(trace_ids)
        assert {(f["service"], f["operation"], f["db_statement"], f["repeats"]) for f in n1} == {
            ("shop", "GET /orders", items, 8)}
        assert all(f["duration_s"] == pytest.approx(0.08) for f in n1)
        (slow_finding,) = [f for f in found if f["finding"] == "slow_query"]
        assert slow_finding["trace_id"] == slow_trace and slow_finding["duration_s"] == pytest.approx(0.7)
        assert slow_finding["db_statement"] == slow and slow_finding["operation"] == "SELECT orders"
    finally:
        d.stop()
        loki.stop()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len([x for x in lines if x["type"] == "finding"]) == 21


def test_exemplars_on_the_duration_histogram_when_the_scraper_asks_for_openmetrics(daemon_factory):
    """The slowest spans of each window become exemplars (trace ids) of the bucket they fall in,
    on /metrics in OpenMetrics: the whole page parses with prometheus_client's OpenMetrics
    parser, and Grafana can jump from a latency bucket to the trace. The classic text format,
    asked for or not, stays as it was (no exemplars)."""
    d = daemon_factory(CONFIG)
    tp = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)))
    tracer = tp.get_tracer("exemplars")
    base = (time.time_ns() // WINDOW - 6) * WINDOW
    slow = {}
    for i in range(40):
        dur = (300 if i in (7, 23) else 5) * 1_000_000  # two slow requests among fast ones
        end = base + 1_000_000_000 + i * 50_000_000
        span = tracer.start_span("GET /cart", kind=trace.SpanKind.SERVER, start_time=end - dur)
        if dur > 5_000_000:
            slow[format(span.get_span_context().trace_id, "032x")] = dur / 1e9
        span.end(end_time=end)
    assert tp.force_flush(30_000)
    wait_for(lambda: _calls(d, "GET /cart"))
    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    resp = httpx.get(d.url("/metrics"), headers={"Accept": accept}, timeout=5)
    assert resp.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in om_parser.text_string_to_metric_families(resp.text)}
    assert families["telepipe_calls"].type == "counter"
    buckets = [s for s in families["telepipe_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["span_name"] == "GET /cart"]  # fmt: skip
    marked = {float(s.labels["le"]): s.exemplar for s in buckets if s.exemplar}
    # the bucket the two slow spans fall in (0.2, 0.4] shows one of them (the newest kept per
    # bucket); the fast ones' bucket (0.004, 0.006] one of the fast spans among the window's slowest
    assert marked[0.4].labels["trace_id"] in slow and marked[0.4].value == pytest.approx(0.3)
    assert marked[0.006].labels["trace_id"] not in slow and marked[0.006].value == pytest.approx(0.005)
    assert set(marked) == {0.4, 0.006}
    plain = httpx.get(d.url("/metrics"), timeout=5)
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4") and "# {" not in plain.text


def test_service_graph_requests_with_virtual_nodes_for_a_database_and_an_uninstrumented_peer(daemon_factory):
    """A shop calls its database (3 queries), a payment gateway nobody instruments (2 calls, one
    failed) and an instrumented inventory service (1 call): the requests show as Tempo's and the
    Collector's service-graph families do, the database and the gateway as virtual nodes."""
    d = daemon_factory(CONFIG + "[servicegraph]\nsample_one_in = 1\nttl_s = 10\n")

    def provider(service):
        tp = TracerProvider(resource=Resource.create({"service.name": service}))
        tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)))
        return tp

    shop, inventory = provider("shop"), provider("inventory")
    tracer, inv = shop.get_tracer("graph"), inventory.get_tracer("graph")
    ms = 1_000_000
    t = (time.time_ns() // WINDOW - 6) * WINDOW + 100 * ms
    root = tracer.start_span("POST /checkout", kind=trace.SpanKind.SERVER, start_time=t)
    with trace.use_span(root):
        for k in range(3):
            _db_span(tracer, "SELECT orders", f"SELECT * FROM orders WHERE id = {k}", t + (1 + k) * ms, ms,
                     namespace="orders")  # fmt: skip
        for k in range(2):
            call = tracer.start_span("POST /charge", kind=trace.SpanKind.CLIENT, start_time=t + (5 + k) * ms,
                                     attributes={"peer.service": "payments-gateway", "server.address": "pay.example"})
            if k:
                call.set_status(trace.Status(trace.StatusCode.ERROR))
            call.end(end_time=t + (6 + k) * ms)
        stock = tracer.start_span("GET /stock", kind=trace.SpanKind.CLIENT, start_time=t + 10 * ms,
                                  attributes={"server.address": "inventory.svc"})  # fmt: skip
        served = inv.start_span("GET /stock", kind=trace.SpanKind.SERVER, start_time=t + 11 * ms,
                                context=trace.set_span_in_context(stock))  # fmt: skip
        served.end(end_time=t + 14 * ms)
        stock.end(end_time=t + 15 * ms)
    root.end(end_time=t + 20 * ms)
    assert inventory.force_flush(30_000) and shop.force_flush(30_000)  # the child first, as SDKs mostly do
    # database calls count at once; the others wait for a child for the ttl (of event time, from
    # the batch they came in): a minute later by the spans' clocks, in a later batch, the calls
    # that waited in vain are virtual nodes
    wait_for(lambda: total(d.metrics_text(), "telepipe_service_graph_request_total", connection_type="database"))
    now = time.time_ns()
    tracer.start_span("GET /health", kind=trace.SpanKind.SERVER, start_time=now - ms).end(end_time=now)
    assert shop.force_flush(30_000)

    def requests(text, name="telepipe_service_graph_request_total", **labels):
        return total(text, name, **labels)

    def arrived():
        text = d.metrics_text()
        return text if requests(text, client="shop", server="payments-gateway") else None

    text = wait_for(arrived)
    assert requests(text, client="shop", server="orders", connection_type="database") == 3
    assert requests(text, client="shop", server="payments-gateway", connection_type="virtual_node") == 2
    assert requests(text, "telepipe_service_graph_request_failed_total", server="payments-gateway") == 1
    assert requests(text, client="shop", server="inventory", connection_type="") == 1
    assert requests(text) == 6  # nothing else: the inventory call, answered, is no virtual node
    s = samples(text)
    inv_labels = (("client", "shop"), ("connection_type", ""), ("server", "inventory"))
    assert s[("telepipe_service_graph_request_server_seconds_count", inv_labels)] == 1
    assert s[("telepipe_service_graph_request_server_seconds_sum", inv_labels)] == pytest.approx(0.003)


def test_dimensions_from_resource_and_span_attributes_are_separate_series(daemon_factory, tmp_path):
    """``deployment.environment`` (a resource attribute) and ``http.route`` (a span attribute) as
    dimensions: prod and staging spans are separate series with exact counts, a span without a
    route takes the configured default, and --emit-jsonl names the dimensions of each window."""
    out = tmp_path / "windows.jsonl"
    d = daemon_factory("[windows]\nidle_timeout_s = 1.0\ndimensions = [\"deployment.environment\", \"http.route\"]\n"
                       "dimension_default = \"n/a\"\n", ["--emit-jsonl", str(out)])  # fmt: skip
    base = (time.time_ns() // WINDOW - 6) * WINDOW
    for env, routed, unrouted in (("prod", 30, 0), ("staging", 12, 8)):
        tp = TracerProvider(resource=Resource.create({"service.name": "shop", "deployment.environment": env}))
        tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)))
        tracer = tp.get_tracer("dims")
        for i in range(routed + unrouted):
            end = base + 1_000_000_000 + i * 10_000_000
            attrs = {"http.route": "/items/{id}"} if i < routed else {}
            tracer.start_span("GET /items", kind=trace.SpanKind.SERVER, start_time=end - 5_000_000,
                              attributes=attrs).end(end_time=end)  # fmt: skip
        assert tp.force_flush(30_000)

    def count(env, route):
        return total(d.metrics_text(), "telepipe_calls_total", service_name="shop", span_name="GET /items",
                     deployment_environment=env, http_route=route)  # fmt: skip

    want = {("prod", "/items/{id}"): 30, ("staging", "/items/{id}"): 12, ("staging", "n/a"): 8}
    got = wait_for(lambda: g if (g := {k: count(*k) for k in want}) == want else None)
    assert got == want
    assert total(d.metrics_text(), "telepipe_calls_total", service_name="shop") == 50
    d.stop()
    windows = [json.loads(line) for line in out.read_text().splitlines()]
    dims = {(w["dimensions"]["deployment.environment"], w["dimensions"]["http.route"]): w["count"]
            for w in windows if w["type"] == "window" and w["operation"] == "GET /items"}  # fmt: skip
    assert dims == want


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_exceptions_recorded_by_the_sdk_are_counted_by_type(daemon_factory, transport):
    """Spans that record exceptions (``span.record_exception``, as instrumentations do on an
    unhandled error) count in telepipe_exceptions_total by span name and exception type."""
    d = daemon_factory(CONFIG)
    exporter = (OTLPSpanExporter(endpoint=d.grpc_target, insecure=True) if transport == "grpc" else
                HttpSpanExporter(endpoint=f"http://127.0.0.1:{d.otlp_http_port}/v1/traces"))  # fmt: skip
    tp = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    tp.add_span_processor(BatchSpanProcessor(exporter))
    tracer = tp.get_tracer("exceptions")
    for i in range(10):
        span = tracer.start_span("POST /pay", kind=trace.SpanKind.SERVER)
        if i < 3:
            span.record_exception(TimeoutError("gateway"))
        elif i < 5:
            span.record_exception(KeyError("card"))
        span.end()
    assert tp.force_flush(30_000)

    def counts():
        text = d.metrics_text()
        got = {t: total(text, "telepipe_exceptions_total", service_name="shop", span_name="POST /pay",
                        exception_type=t) for t in ("TimeoutError", "KeyError")}  # fmt: skip
        return got if got == {"TimeoutError": 3, "KeyError": 2} else None

    assert wait_for(counts) == {"TimeoutError": 3, "KeyError": 2}
    assert total(d.metrics_text(), "telepipe_exceptions_total") == 5
