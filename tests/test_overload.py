"""Overload with the real OTel SDK exporter: the daemon refuses with UNAVAILABLE + RetryInfo, the
SDK retries, and at the end every span sent is counted; the daemon's memory stays under its limit."""

import threading
import time

import psutil
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RSS_LIMIT = 600 * 2**20
# Capacity cut down for the test: 192 KiB of spool, emptied only behind a committed snapshot every
# second, is a few thousand spans a second; one SDK process offers several times that.
CONFIG = f"""
[spool]
segment_bytes = 8192
budget_bytes = 196608
retry_after_ms = 200
[recovery]
snapshot_interval_s = 1.0
[windows]
idle_timeout_s = 8.0
[limits]
max_rss_bytes = {RSS_LIMIT}
"""


def test_sdk_overload_everything_sent_is_counted(daemon_factory):
    d = daemon_factory(CONFIG)
    proc = psutil.Process(d.proc.pid)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.wait(0.1):
            peak[0] = max(peak[0], proc.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    exporter = OTLPSpanExporter(endpoint=d.grpc_target, insecure=True, timeout=120)
    tp = TracerProvider(resource=Resource.create({"service.name": "overload"}))
    tp.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=200_000, max_export_batch_size=512,
                                             schedule_delay_millis=50))  # fmt: skip
    tracer = tp.get_tracer("overload")
    sent = 20_000
    base = (time.time_ns() // 10**10 - 6) * 10**10
    t0 = time.monotonic()
    for i in range(sent):
        end = base + 1_000_000_000 + i * 1_000_000  # 20 s of event time, in order
        tracer.start_span("GET /busy", start_time=end - 1_000_000).end(end_time=end)
    assert tp.force_flush(180_000)
    tp.shutdown()
    offered = time.monotonic() - t0

    def counted():
        for fam in text_string_to_metric_families(d.metrics_text()):
            for s in fam.samples:
                if s.name == "telepipe_calls_total" and s.labels.get("span_name") == "GET /busy":
                    return s.value
        return 0

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and counted() < sent:
        time.sleep(0.5)
    stop.set()
    text = d.metrics_text()
    refused = sum(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("telepipe_refused_requests_total{reason=\"spool_"))  # fmt: skip
    assert refused > 0, "the test did not overload the daemon"
    assert counted() == sent, (counted(), sent, offered)
    assert "telepipe_late_spans_total 0.0" in text
    assert peak[0] < RSS_LIMIT
