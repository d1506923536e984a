"""Trace analytics beyond span metrics (issue 15), end to end with the real OpenTelemetry
Python SDK exporters against ``telepipe run``.

Sampling weights: spans whose tracestate carries ``ot=th:<threshold>`` count as the adjusted
count the threshold gives (``th:c``: sampled 1 in 4, each counts 4) in call counts, histogram
counts and percentiles."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import TraceState

from .conftest import samples, wait_for

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
