"""Loki sink: encoder tests (no network) and delivery to a strict in-test push server."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time

import httpx
import numpy as np
import pytest
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main

from pipeline.config import LokiConfig
from pipeline.model import LogBatch
from pipeline.selfmetrics import SelfMetrics
from sinks.loki import (
    LokiClient,
    LokiSink,
    RetryPolicy,
    encode_push,
    encode_streams,
    level_of,
    metadata_key,
    push_url,
)

from .loki_server import LokiServer, check_push

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def make_batch(rows: list[dict]) -> LogBatch:
    """rows: dicts with t, body and optional sev, text, trace, span, service, instance, attrs."""
    return LogBatch(
        time_ns=np.array([r["t"] for r in rows], dtype=np.int64),
        severity=np.array([r.get("sev", 9) for r in rows], dtype=np.int8),
        severity_text=[r.get("text", "") for r in rows],
        body=[r["body"] for r in rows],
        trace_id=[r.get("trace", "") for r in rows],
        span_id=[r.get("span", "") for r in rows],
        service=[r.get("service", "checkout") for r in rows],
        instance=[r.get("instance", "") for r in rows],
        attributes=[r.get("attrs", {}) for r in rows],
    )


def lines_batch(start: int, n: int) -> LogBatch:
    t0 = 1_700_000_000_000_000_000
    return make_batch([{"t": t0 + i, "body": f"line {i}"} for i in range(start, start + n)])


# --- strict Loki push server ----------------------------------------------------------


@pytest.fixture
def server():
    srv = LokiServer()
    yield srv
    srv.stop()
    assert srv.violations == []


def make_client(
    server: LokiServer, metrics: SelfMetrics, sleeps: list | None = None, clock=time.monotonic, **cfg
) -> LokiClient:
    cfg.setdefault("retry_min_ms", 10)
    cfg.setdefault("retry_max_ms", 100)
    cfg.setdefault("batch_max_wait_ms", 10_000)  # tests flush explicitly unless they test age
    sleep = None if sleeps is None else sleeps.append
    return LokiClient(LokiConfig(url=server.url, **cfg), metrics, sleep=sleep, clock=clock, rng=random.Random(7))


# --- encoder ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "text", "level"),
    [
        (1, "", "trace"), (4, "", "trace"), (5, "", "debug"), (8, "", "debug"),
        (9, "", "info"), (12, "", "info"), (13, "", "warn"), (16, "", "warn"),
        (17, "", "error"), (20, "", "error"), (21, "", "fatal"), (24, "", "fatal"),
        (9, "ERROR", "info"),  # the number wins
        (0, "WARNING", "warn"), (0, "Error", "error"), (0, "INFO2", "info"),
        (0, "critical", "fatal"), (0, "", "unknown"), (0, "loud", "unknown"), (30, "", "unknown"),
    ],
)  # fmt: skip
def test_level_of(number, text, level):
    assert level_of(number, text) == level


def test_encode_streams_labels_and_metadata():
    batch = make_batch(
        [
            {"t": 30, "body": "paid", "sev": 9, "trace": TRACE, "span": SPAN, "instance": "pod-1",
             "attrs": {"http.method": "POST", "order-id": "42", "9lives": "x"}},
            {"t": 10, "body": "card declined", "sev": 17, "trace": TRACE, "span": SPAN},
            {"t": 20, "body": "no context", "sev": 10, "service": ""},
        ]
    )  # fmt: skip
    streams = encode_streams(batch, 1024)
    by_labels = {(s["stream"]["service"], s["stream"]["level"]): s for s in streams}
    assert set(by_labels) == {("checkout", "info"), ("checkout", "error"), ("unknown_service", "info")}
    for s in streams:
        assert set(s["stream"]) == {"service", "level"}
        assert TRACE not in json.dumps(s["stream"])
    assert by_labels[("checkout", "info")]["values"] == [
        ["30", "paid", {"http_method": "POST", "order_id": "42", "_9lives": "x",
                        "trace_id": TRACE, "span_id": SPAN, "service_instance_id": "pod-1"}],
    ]  # fmt: skip
    assert by_labels[("checkout", "error")]["values"] == [
        ["10", "card declined", {"trace_id": TRACE, "span_id": SPAN}]
    ]
    assert by_labels[("unknown_service", "info")]["values"] == [["20", "no context"]]


def test_encode_streams_sorted_and_stable():
    rows = [{"t": t, "body": b} for t, b in [(5, "e"), (1, "a"), (3, "c1"), (3, "c2"), (2, "b"), (3, "c3")]]
    [stream] = encode_streams(make_batch(rows), 1024)
    assert [v[1] for v in stream["values"]] == ["a", "b", "c1", "c2", "c3", "e"]


def test_encode_streams_truncates_lines_and_labels():
    metrics = SelfMetrics()
    body = "ab€€€"  # 2 + 3*3 bytes; a 6-byte cut must not split a euro sign
    batch = make_batch(
        [{"t": 1, "body": body}, {"t": 2, "body": "short"}, {"t": 3, "body": "x" * 6, "service": "é" * 2000}]
    )
    streams = encode_streams(batch, 6, metrics=metrics)
    lines = [v[1] for s in streams for v in s["values"]]
    assert lines == ["ab€", "short", "x" * 6]
    assert metrics.counter("dropped", "loki_line_truncated") == 1
    long_service = [s["stream"]["service"] for s in streams if s["stream"]["service"] != "checkout"][0]
    assert long_service == "é" * 1024 and len(long_service.encode()) == 2048


def test_encode_push_is_gzip_json_the_server_accepts():
    batch = make_batch([{"t": 2, "body": "b", "trace": TRACE}, {"t": 1, "body": "a"}])
    body = encode_push(encode_streams(batch, 1024))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    doc = check_push("POST", "/loki/api/v1/push", headers, body)
    assert doc["streams"][0]["values"] == [["1", "a"], ["2", "b", {"trace_id": TRACE}]]


def test_metadata_key_and_push_url():
    assert metadata_key("k8s.pod.name") == "k8s_pod_name"
    assert metadata_key("") == "_"
    assert str(push_url("http://loki:3100")) == "http://loki:3100/loki/api/v1/push"
    assert str(push_url("http://loki:3100/")) == "http://loki:3100/loki/api/v1/push"
    assert str(push_url("https://gw/tenant/a/push")) == "https://gw/tenant/a/push"


@pytest.mark.parametrize(
    ("status", "retry"),
    [(None, True), (429, True), (500, True), (502, True), (503, True), (599, True),
     (400, False), (401, False), (403, False), (404, False), (413, False), (422, False), (301, False)],
)  # fmt: skip
def test_retry_policy_table(status, retry):
    assert RetryPolicy.retryable(status) is retry


def test_retry_policy_backoff_capped_with_jitter():
    policy = RetryPolicy(500, 4000, random.Random(1))
    waits = [policy.backoff(a) for a in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(0.5 <= w <= cap for w, cap in zip(waits, caps, strict=True))
    again = RetryPolicy(500, 4000, random.Random(1))
    assert waits == [again.backoff(a) for a in range(8)]  # seeded: reproducible
    assert len(set(waits[3:])) > 1  # jittered, not a fixed cap


# --- delivery -----------------------------------------------------------------------


def test_delivers_batch_with_labels_metadata_and_tenant(server):
    metrics = SelfMetrics()
    client = make_client(server, metrics, tenant="team-a")
    client.push(
        make_batch(
            [
                {"t": 2, "body": "paid", "trace": TRACE, "span": SPAN},
                {"t": 1, "body": "declined", "sev": 17, "trace": TRACE},
                {"t": 3, "body": "shipped", "service": "shipping"},
            ]
        )
    )
    assert client.close(5)
    [doc] = server.accepted
    got = {(s["stream"]["service"], s["stream"]["level"]): s["values"] for s in doc["streams"]}
    assert got == {
        ("checkout", "info"): [["2", "paid", {"trace_id": TRACE, "span_id": SPAN}]],
        ("checkout", "error"): [["1", "declined", {"trace_id": TRACE}]],
        ("shipping", "info"): [["3", "shipped"]],
    }
    assert server.headers[0]["X-Scope-OrgID"] == "team-a"
    assert metrics.counter("sink_sent", "loki") == 3
    assert metrics.counter("dropped", "loki_line_truncated") == 0


def test_merges_batches_into_one_request_sorted_per_stream(server):
    client = make_client(server, SelfMetrics())
    client.push(make_batch([{"t": 5, "body": "late"}]))
    client.push(make_batch([{"t": 1, "body": "early"}]))
    assert client.close(5)
    assert len(server.accepted) == 1 and server.lines() == ["early", "late"]
    assert "X-Scope-OrgID" not in server.headers[0]


def test_retries_500_and_429_then_delivers_everything_once_in_order(server):
    server.script.extend([(500, "ingester down"), (429, "rate limited")])
    metrics, sleeps = SelfMetrics(), []
    client = make_client(server, metrics, sleeps, batch_max_bytes=300)  # a few lines per request
    for start in range(0, 40, 4):
        client.push(lines_batch(start, 4))
    assert client.close(5)
    assert server.lines() == [f"line {i}" for i in range(40)]
    assert len(server.accepted) > 3
    assert server.requests == len(server.accepted) + 2
    assert metrics.counter("sink_errors", "loki", "http_500") == 1
    assert metrics.counter("sink_errors", "loki", "http_429") == 1
    assert metrics.counter("sink_sent", "loki") == 40
    assert metrics.counter("dropped", "loki_retries_exhausted") == 0
    assert len(sleeps) == 2 and 0.01 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02


def test_400_is_dropped_with_reason_and_not_retried(server, caplog):
    server.script.append((400, "entry for stream has timestamp too old"))
    metrics, sleeps = SelfMetrics(), []
    client = make_client(server, metrics, sleeps)
    with caplog.at_level(logging.WARNING, logger="telepipe"):
        client.push(lines_batch(0, 3))
        assert client.close(5)
    assert server.requests == 1 and sleeps == []
    assert metrics.counter("dropped", "loki_rejected_400") == 3
    assert metrics.counter("sink_errors", "loki", "http_400") == 1
    assert metrics.counter("sink_sent", "loki") == 0
    assert "timestamp too old" in caplog.text


def test_retries_exhausted_is_counted(server):
    server.script.extend([(503, "unavailable")] * 3)
    metrics, sleeps = SelfMetrics(), []
    client = make_client(server, metrics, sleeps, max_retries=2)
    client.push(lines_batch(0, 5))
    assert client.close(5)
    assert server.requests == 3 and len(sleeps) == 2 and server.accepted == []
    assert metrics.counter("dropped", "loki_retries_exhausted") == 5


def test_queue_full_drops_oldest_pending_request(server):
    server.script.append((500, "down"))
    entered, release = threading.Event(), threading.Event()

    def sleep(_seconds: float) -> None:  # holds the sender in its first backoff
        entered.set()
        release.wait(5)

    metrics = SelfMetrics()
    cfg = LokiConfig(
        url=server.url, batch_max_bytes=64, queue_max_batches=2, retry_min_ms=10, batch_max_wait_ms=10_000
    )
    client = LokiClient(cfg, metrics, sleep=sleep, rng=random.Random(0))
    client.push(lines_batch(0, 1))
    client.flush(0)  # seal it so the sender takes it
    assert entered.wait(5)
    for i in range(1, 6):  # each push seals the one before: lines 1..5 become five requests
        client.push(lines_batch(i, 1))
    assert client.flush(0) is False  # seal line 5 too, still blocked
    assert metrics.counter("dropped", "loki_queue_full") == 3  # lines 1, 2, 3
    assert metrics.gauge("loki_queue_batches") == 2
    release.set()
    assert client.close(5)
    assert server.lines() == ["line 0", "line 4", "line 5"]
    assert metrics.counter("sink_sent", "loki") == 3
    assert metrics.gauge("loki_queue_batches") == 0


def test_sends_by_age_without_flush(server):
    client = make_client(server, SelfMetrics(), batch_max_wait_ms=20)
    client.push(lines_batch(0, 2))
    deadline = time.monotonic() + 3
    while not server.accepted and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.lines() == ["line 0", "line 1"]
    client.close(5)


def test_connection_error_is_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        check_push(request.method, request.url.path, request.headers, request.content)
        return httpx.Response(204)

    metrics = SelfMetrics()
    cfg = LokiConfig(url="http://loki:3100", retry_min_ms=10)
    client = LokiClient(cfg, metrics, transport=httpx.MockTransport(handler), sleep=lambda s: None)
    client.push(lines_batch(0, 2))
    assert client.close(5)
    assert len(calls) == 2
    assert metrics.counter("sink_errors", "loki", "connection") == 1
    assert metrics.counter("sink_sent", "loki") == 2


def test_close_interrupts_backoff_and_counts_unsent(server):
    server.script.extend([(500, "down")] * 100)
    metrics = SelfMetrics()
    # sleeps=None: the client's own backoff sleep, which close() interrupts
    client = make_client(server, metrics, None, retry_min_ms=5000, retry_max_ms=5000)
    client.push(lines_batch(0, 3))
    started = time.monotonic()
    assert client.close(0.3) is False
    assert time.monotonic() - started < 2
    assert metrics.counter("dropped", "loki_closed") == 3
    client.push(lines_batch(3, 1))
    assert metrics.counter("dropped", "loki_closed") == 4


def test_bytewax_sink_delivers_and_closes_client(server):
    metrics = SelfMetrics()
    clients = []

    def factory() -> LokiClient:
        clients.append(make_client(server, metrics))
        return clients[-1]

    flow = Dataflow("loki_test")
    logs = op.input("in", flow, TestingSource([lines_batch(0, 2), lines_batch(2, 3)]))
    op.output("loki", logs, LokiSink(factory))
    run_main(flow)
    assert len(clients) == 1
    assert server.lines() == [f"line {i}" for i in range(5)]
    assert not clients[0].queue.sender_alive()


def test_stream_limit_sends_further_label_sets_to_the_overflow_stream(server):
    metrics = SelfMetrics()
    client = make_client(server, metrics, max_streams=2)
    for service in ("a", "b", "c", "d"):
        client.push(make_batch([{"t": 1_700_000_000_000_000_000, "service": service, "body": f"from {service}"}]))
    assert client.flush(5)
    client.close(5)
    labels = {st["stream"]["service"] for doc in server.accepted for st in doc["streams"]}
    assert labels == {"a", "b", "__overflow__"}
    assert sorted(server.lines()) == ["from a", "from b", "from c", "from d"]
    assert metrics.counter("sink_overflow_lines", "loki") == 2


def test_idle_label_sets_stop_counting_toward_the_stream_limit(server):
    metrics, now = SelfMetrics(), [0.0]
    client = make_client(server, metrics, clock=lambda: now[0], max_streams=3, stream_idle_s=60.0)

    def push(service: str) -> None:
        client.push(make_batch([{"t": 1_700_000_000_000_000_000, "service": service, "body": f"{service}@{now[0]:g}"}]))

    for service in ("a", "b", "c"):
        push(service)
    now[0] = 10.0
    push("d")  # the limit is reached: overflow
    assert client.flush(5)
    now[0] = 50.0
    push("a")  # a stays in use
    now[0] = 100.0  # b, c and the overflow stream unused for over 60 s: they no longer count
    push("d")
    push("e")
    push("f")  # a, d, e in use: overflow again
    assert client.flush(5)
    client.close(5)
    got = {v[1]: st["stream"]["service"] for doc in server.accepted for st in doc["streams"] for v in st["values"]}
    assert got == {"a@0": "a", "b@0": "b", "c@0": "c", "d@10": "__overflow__",
                   "a@50": "a", "d@100": "d", "e@100": "e", "f@100": "__overflow__"}  # fmt: skip
    assert metrics.counter("sink_overflow_lines", "loki") == 2
    assert list(client._streams) == [(("level", "info"), ("service", s)) for s in ("a", "d", "e", "__overflow__")]


def test_sender_survives_an_unexpected_error_and_sends_the_next_requests():
    lines = []

    def handler(request: httpx.Request) -> httpx.Response:
        doc = check_push(request.method, request.url.path, request.headers, request.content)
        if not lines:
            lines.append(None)
            raise RuntimeError("a bug nobody planned for")
        lines.extend(v[1] for st in doc["streams"] for v in st["values"])
        return httpx.Response(204)

    metrics = SelfMetrics()
    client = LokiClient(LokiConfig(url="http://loki:3100"), metrics, transport=httpx.MockTransport(handler))
    for start in (0, 2, 4):
        client.push(lines_batch(start, 2))
        assert client.flush(3)
    assert client.close(3)
    assert lines == [None, "line 2", "line 3", "line 4", "line 5"]
    assert metrics.counter("dropped", "loki_internal_error") == 2
    assert metrics.counter("thread_errors", "loki-sender") == 1
    assert metrics.counter("sink_sent", "loki") == 4


def test_a_request_that_cannot_be_built_costs_only_itself(server):
    metrics = SelfMetrics()
    client = make_client(server, metrics, batch_max_wait_ms=20)  # sealed by age, in the sender thread
    client.push_streams([{"stream": {"service": "x", "level": "info"}, "values": [["not a time", "bad"]]}], 1)
    deadline = time.monotonic() + 5
    while not metrics.counter("dropped", "loki_internal_error") and time.monotonic() < deadline:
        time.sleep(0.005)
    assert metrics.counter("dropped", "loki_internal_error") == 1
    client.push(lines_batch(0, 2))
    assert client.flush(5)  # would not return if the sender had died
    assert client.close(5)
    assert server.lines() == ["line 0", "line 1"]


class _Event:
    def __init__(self, kind: str, t: int) -> None:
        self.kind, self.t = kind, t

    def to_json(self) -> dict:
        if self.kind == "broken":
            raise ValueError("cannot render this event")
        return {"type": self.kind, "time": self.t, "service": "checkout"}


def test_write_batch_drops_an_item_that_cannot_be_encoded_and_carries_on(server):
    metrics = SelfMetrics()
    client = make_client(server, metrics)
    partition = LokiSink(client).build("loki", 0, 1)
    bad = make_batch([{"t": 1, "body": "ok"}, {"t": 2, "body": None}, {"t": 3, "body": "ok"}])  # None: not a str
    partition.write_batch([lines_batch(0, 2), bad, _Event("alert", 5), _Event("broken", 6), lines_batch(2, 2)])
    partition.write_batch([lines_batch(4, 1), _Event("scaling", 7)])
    partition.close()  # the last partition: closes (flushes) the client
    assert not client.queue.sender_alive()
    events = [json.dumps(_Event(k, t).to_json(), separators=(",", ":")) for k, t in (("alert", 5), ("scaling", 7))]
    assert sorted(server.lines()) == sorted([f"line {i}" for i in range(5)] + events)
    assert metrics.counter("dropped", "loki_internal_error") == 3 + 1  # the bad batch's lines, the broken event
    assert metrics.counter("sink_sent", "loki") == 7
