"""End to end with the real OpenTelemetry Python SDK exporters against ``telepipe run``.

Spans with known durations go in over OTLP/gRPC; /metrics must show exact call
counts and p50/p95/p99 within 1 % of the exact rank-based values; logs must
arrive at a strict Loki-protocol receiver with the right labels, lines and
trace ids.
"""

import logging
import math
import time

import httpx
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .conftest import samples, wait_for
from .loki_server import LokiServer

pytestmark = pytest.mark.integration

CONFIG = """
[windows]
idle_timeout_s = 1.0
"""


def test_sdk_spans_and_logs_end_to_end(daemon_factory):
    loki = LokiServer()
    try:
        d = daemon_factory(CONFIG, ["--loki-url", loki.url])
        resource = Resource.create({"service.name": "checkout", "service.instance.id": "checkout-1"})
        tp = TracerProvider(resource=resource)
        tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=d.grpc_target, insecure=True)))
        lp = LoggerProvider(resource=resource)
        lp.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(endpoint=d.grpc_target, insecure=True)))
        tracer = tp.get_tracer("e2e")
        pylog = logging.getLogger("e2e-app")
        pylog.propagate = False
        pylog.addHandler(LoggingHandler(logger_provider=lp))
        pylog.setLevel(logging.INFO)

        rng = np.random.default_rng(42)
        window = 10_000_000_000
        base = (time.time_ns() // window - 6) * window  # a closed-past window, all spans in it
        sent = {"GET /cart": [], "POST /checkout": []}
        trace_ids = []
        for op, n in (("GET /cart", 1500), ("POST /checkout", 700)):
            for i in range(n):
                dur = int(rng.lognormal(-4.5, 1.0) * 1e9) + 1000
                end = base + 1_000_000_000 + int(i * 5_000_000)
                span = tracer.start_span(op, kind=trace.SpanKind.SERVER, start_time=end - dur)
                if i % 250 == 0:
                    with trace.use_span(span):
                        pylog.error("payment failed for order %d", i)
                    trace_ids.append(format(span.get_span_context().trace_id, "032x"))
                span.end(end_time=end)
                sent[op].append(dur / 1e9)
        assert tp.force_flush(30_000) and lp.force_flush(30_000)

        def counts():
            s = samples(d.metrics_text())
            got = {
                op: s.get(("telepipe_calls_total", (("service_name", "checkout"), ("span_kind", "SPAN_KIND_SERVER"),
                                                    ("span_name", op), ("status_code", "STATUS_CODE_UNSET"))))  # fmt: skip
                for op in sent
            }
            return (s, got) if all(got.values()) else None

        s, got = wait_for(counts)
        assert got == {op: len(v) for op, v in sent.items()}
        for op, values in sent.items():
            values = sorted(values)
            for q in ("0.5", "0.95", "0.99"):
                key = (
                    "telepipe_window_latency_seconds",
                    (("quantile", q), ("service_name", "checkout"), ("span_kind", "SPAN_KIND_SERVER"), ("span_name", op)),
                )
                exact = values[math.floor(float(q) * (len(values) - 1))]
                assert abs(s[key] - exact) <= 0.01 * exact, (op, q, s[key], exact)
        assert s[("telepipe_accepted_spans_total", ())] == 2200
        assert s[("telepipe_read_spans_total", ())] == 2200  # all read from the spool: no backlog left

        def log_streams():
            return [st for doc in loki.accepted for st in doc["streams"] if "level" in st["stream"]]

        def log_lines():
            lines = [v[1] for st in log_streams() for v in st["values"]]
            return lines if len(lines) >= len(trace_ids) else None

        lines = wait_for(log_lines)
        assert sorted(lines) == sorted(f"payment failed for order {i}" for i in (0, 250, 500, 750, 1000, 1250, 0, 250, 500))
        streams = log_streams()
        assert {tuple(sorted(st["stream"].items())) for st in streams} == {(("level", "error"), ("service", "checkout"))}
        got_ids = sorted(v[2]["trace_id"] for st in streams for v in st["values"])
        assert got_ids == sorted(trace_ids)
        # telepipe's own events (here: the scaling signal) go to Loki labelled source, kind, service
        want = {"source": "telepipe", "kind": "scaling", "service": "checkout"}
        assert wait_for(lambda: want in [st["stream"] for doc in loki.accepted for st in doc["streams"]])
        tp.shutdown()
        lp.shutdown()
        assert loki.violations == []
    finally:
        loki.stop()


def test_make_run_defaults_answer_healthz(daemon_factory):
    d = daemon_factory()
    assert httpx.get(d.url("/healthz")).text == "ok\n"
    assert httpx.get(d.url("/readyz")).status_code == 200
    text = d.metrics_text()
    assert "telepipe_received_spans_total 0.0" in text
    d.proc.terminate()
    assert d.proc.wait(30) == 0
