"""The real Python SDK's OTLP/HTTP exporter honours our 429 and 503 answers: it waits the
Retry-After we send, retries, and every span arrives exactly once."""

from __future__ import annotations

import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from pipeline.config import LimitsConfig, TierConfig
from sources.guards import TenantLimiter

from .test_http_receiver import make  # noqa: F401  (the fixture)
from .test_receiver import spooled


def _send(url: str, n: int, headers: dict | None = None) -> tuple[float, int]:
    """Export ``n`` spans one request each (SimpleSpanProcessor); (seconds taken, spans)."""
    exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers=headers or {}, timeout=30)
    provider = TracerProvider(resource=Resource.create({"service.name": "retrying"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    start = time.monotonic()
    for i in range(n):
        with tracer.start_as_current_span(f"op-{i % 2}"):
            pass
    provider.shutdown()
    return time.monotonic() - start, n


def _spans(rx) -> int:
    return sum(len(b) for b in spooled(rx.spool))


def test_503_retry_after_is_honoured_and_nothing_is_lost(make):  # noqa: F811
    rx = make()
    asked: list[float] = []  # when each request came; the spool is "over its budget" for the first three

    def over_budget() -> bool:
        asked.append(time.monotonic())
        return len(asked) <= 3

    rx.spool.over_budget = over_budget
    _, n = _send(rx.url, 4)
    assert _spans(rx) == n  # every span exactly once: the refused requests were retried
    assert rx.metrics.counter("refused_requests", "spool_budget") == 3
    assert rx.metrics.counter("requests", "spans", "503") == 3
    # each retry came after our Retry-After of 2 s (1500 ms rounded up), not after the exporter's
    # own first backoff of about 1 s
    gaps = [b - a for a, b in zip(asked, asked[1:4])]
    assert len(gaps) == 3 and min(gaps) >= 1.8


def test_429_retry_after_is_honoured(make):  # noqa: F811
    limits = LimitsConfig(tiers=(TierConfig("std", spans_per_s=1.0, burst=1.0),), default_tier="std")
    rx = make(tenants=TenantLimiter(limits))
    took, n = _send(rx.url, 3, {"X-Scope-OrgID": "team-a"})
    assert _spans(rx) == n
    refused = rx.metrics.counter("requests", "spans", "429")
    assert refused >= 1 and rx.metrics.counter("refused_requests", "tenant_rate") == refused
    assert took >= 1.5  # one span a second: the exporter waited as told


def test_requests_over_max_in_flight_are_503_and_memory_stays_bounded(make):  # noqa: F811
    import threading

    import httpx

    from pipeline.config import OtlpHttpConfig

    from .test_decode import trace_request

    rx = make(OtlpHttpConfig(listen="127.0.0.1:0", server_threads=2, max_in_flight=1))
    body = trace_request([{}] * 3)
    release = threading.Event()

    def slow_body():  # the first request holds its slot while its body trickles in
        yield body[:10]
        release.wait(10)
        yield body[10:]

    first: list = []
    t = threading.Thread(target=lambda: first.append(httpx.post(
        f"{rx.url}/v1/traces", content=slow_body(), headers={"Content-Type": "application/x-protobuf"}, timeout=30)))
    t.start()
    deadline = time.monotonic() + 10
    while rx.rx.in_flight < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = rx.post("/v1/traces", body)
    assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
    assert rx.metrics.counter("refused_requests", "in_flight") == 1
    release.set()
    t.join(20)
    assert first[0].status_code == 200
    assert rx.post("/v1/traces", body).status_code == 200  # the slot is free again
    assert _spans(rx) == 6
