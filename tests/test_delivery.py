"""Shared delivery (retry, circuit breaker), the remote-write encoder, and the remote-write
client's survival of unexpected errors (sender thread and dataflow side)."""

import dataclasses
import struct
import threading

import cramjam
import httpx

from pipeline.config import DEFAULT_BUCKETS, RemoteWriteConfig
from pipeline.selfmetrics import SelfMetrics
from sinks.delivery import CircuitBreaker, Delivery, RetryPolicy
from sinks.remote_write import (
    STALE_NAN,
    RemoteWriteClient,
    RemoteWriteSink,
    encode_write_request,
    labels_of,
    samples_of,
)

from .factories import result


def test_breaker_opens_after_failures_then_probes():
    now = [0.0]
    b = CircuitBreaker(3, 10.0, clock=lambda: now[0])
    for _ in range(3):
        assert b.wait() == 0.0
        b.record(False)
    assert b.state == "open" and b.wait() == 10.0
    now[0] = 10.0
    assert b.state == "half_open" and b.wait() == 0.0
    b.record(False)  # the probe failed: open again
    assert b.state == "open"
    now[0] = 20.0
    b.record(True)
    assert b.state == "closed"


def test_delivery_holds_the_request_while_open_and_delivers_it_after():
    answers = iter([503] * 6 + [204])
    seen = []

    def handler(request):
        seen.append(request.content)
        return httpx.Response(next(answers))

    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    metrics = SelfMetrics()
    d = Delivery("rw", httpx.Client(transport=httpx.MockTransport(handler)), "http://x/write",
                 RetryPolicy(100, 100), metrics, 20, sleep, threading.Event(),
                 CircuitBreaker(3, 5.0, clock=lambda: now[0]))  # fmt: skip
    assert d.deliver(b"body", 7) is True
    assert len(seen) == 7 and metrics.counter("sink_sent", "rw") == 7
    assert any(s > 4.5 for s in sleeps)  # waited out the open breaker (5 s) instead of sending
    assert metrics.counter("sink_errors", "rw", "http_503") == 6


def _parse(buf: bytes):
    """Minimal protobuf reader: list of (field, wiretype, value)."""
    out, i = [], 0
    while i < len(buf):
        key, i = _uvarint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 2:
            n, i = _uvarint(buf, i)
            out.append((field, wt, buf[i : i + n]))
            i += n
        elif wt == 1:
            out.append((field, wt, buf[i : i + 8]))
            i += 8
        elif wt == 0:
            v, i = _uvarint(buf, i)
            out.append((field, wt, v))
    return out


def _uvarint(b, i):
    shift = v = 0
    while True:
        byte = b[i]
        i += 1
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return v, i


def test_write_request_encoding_sorted_labels_ordered_samples_stale_marker():
    labels = labels_of("telepipe_window_calls", span_name="GET /", service_name="svc", span_kind="SPAN_KIND_SERVER")
    assert [k for k, _ in labels] == sorted(k for k, _ in labels) and labels[0] == ("__name__", "telepipe_window_calls")
    body = encode_write_request([(labels, [(2000, 5.0), (1000, 3.0), (3000, STALE_NAN)])])
    raw = bytes(cramjam.snappy.decompress_raw(body))
    (ts,) = [v for f, _, v in _parse(raw) if f == 1]
    fields = _parse(ts)
    names = [dict((f, v) for f, _, v in _parse(v))[1].decode() for f, _, v in fields if f == 1]
    assert names == [k for k, _ in labels]
    samples = []
    for f, _, v in fields:
        if f == 2:
            s = dict((ff, vv) for ff, _, vv in _parse(v))
            samples.append((s[2], struct.unpack("<Q", s[1])[0]))
    assert [t for t, _ in samples] == [1000, 2000, 3000]
    assert samples[-1][1] == 0x7FF0000000000002


def test_samples_of_a_window():
    r = result("GET /", count=42, errors=2)
    got = {dict(labels)["__name__"] + dict(labels).get("quantile", ""): v for labels, t, v in samples_of(r)}
    assert got["telepipe_window_calls"] == 42 and got["telepipe_window_errors"] == 2
    assert got["telepipe_window_latency_seconds1"] == r.max
    assert len(DEFAULT_BUCKETS) > 0


# --- remote-write client: nothing unexpected stops it ----------------------------------

PER_RESULT = len(samples_of(result()))  # samples of one window result


def operations(body: bytes) -> set[str]:
    """The span_name labels of the series in a WriteRequest body."""
    names = set()
    for f, _, ts in _parse(bytes(cramjam.snappy.decompress_raw(body))):
        assert f == 1
        labels = [dict((ff, vv) for ff, _, vv in _parse(v)) for ff, _, v in _parse(ts) if ff == 1]
        names |= {lb[2].decode() for lb in labels if lb[1] == b"span_name"}
    return names


def rw_client(handler) -> tuple[RemoteWriteClient, SelfMetrics]:
    metrics = SelfMetrics()
    cfg = RemoteWriteConfig(url="http://prometheus:9090/api/v1/write", batch_max_wait_ms=60_000, retry_min_ms=1,
                            retry_max_ms=2)  # fmt: skip
    return RemoteWriteClient(cfg, metrics, transport=httpx.MockTransport(handler)), metrics


def test_remote_write_sender_survives_an_unexpected_error_and_sends_the_next_requests():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 2:
            raise RuntimeError("a bug nobody planned for")
        return httpx.Response(204)

    client, metrics = rw_client(handler)
    try:
        for op in ("GET /1", "GET /2", "GET /3", "GET /4"):
            client.push([result(op)])
            assert client.flush(3)  # a dead sender would never take GET /3
    finally:
        client.close(3)
    assert [operations(b) for b in bodies] == [{"GET /1"}, {"GET /2"}, {"GET /3"}, {"GET /4"}]
    assert metrics.counter("dropped", "remote_write_internal_error") == PER_RESULT
    assert metrics.counter("thread_errors", "remote-write") == 1
    assert metrics.counter("sink_sent", "remote_write") == 3 * PER_RESULT
    assert client.queue.idle()


def test_remote_write_sink_drops_an_item_that_cannot_be_encoded_and_carries_on():
    bodies = []
    client, metrics = rw_client(lambda request: bodies.append(request.content) or httpx.Response(204))
    partition = RemoteWriteSink(client).build("remote_write", 0, 1)
    no_end = dataclasses.replace(result("GET /no-end"), window_end=None)  # samples_of raises TypeError
    no_p50 = dataclasses.replace(result("GET /no-p50"), p50=None)  # float(None): fails before the encoder
    try:
        partition.write_batch([result("GET /1"), no_end, no_p50, result("GET /2")])
        partition.write_batch([result("GET /3")])
        assert client.flush(3)
    finally:
        client.close(3)
    assert set().union(*map(operations, bodies)) == {"GET /1", "GET /2", "GET /3"}
    assert metrics.counter("dropped", "remote_write_internal_error") == 2  # one per bad item
    assert metrics.counter("sink_sent", "remote_write") == 3 * PER_RESULT


def test_remote_write_a_series_that_cannot_be_encoded_costs_only_its_samples():
    bodies = []
    client, metrics = rw_client(lambda request: bodies.append(request.content) or httpx.Response(204))
    try:
        # A lone surrogate passes every check until the encoder's str.encode().
        client.push([result("GET /1"), result("GET /bad", service="svc\udcff"), result("GET /2")])
        assert client.flush(3)  # seals the request: must not raise, must not leave the bad series open
        client.push([result("GET /3")])
        assert client.flush(3)
    finally:
        client.close(3)
    assert [operations(b) for b in bodies] == [{"GET /1", "GET /2"}, {"GET /3"}]
    assert metrics.counter("dropped", "remote_write_internal_error") == PER_RESULT
    assert metrics.counter("sink_sent", "remote_write") == 3 * PER_RESULT


def test_remote_write_sink_survives_an_unexpected_error_in_push(monkeypatch):
    bodies = []
    client, metrics = rw_client(lambda request: bodies.append(request.content) or httpx.Response(204))
    partition = RemoteWriteSink(client).build("remote_write", 0, 1)
    real_push = client.push

    def push_once_broken(items: list) -> None:
        monkeypatch.setattr(client, "push", real_push)
        raise RuntimeError("a bug nobody planned for")

    monkeypatch.setattr(client, "push", push_once_broken)
    try:
        partition.write_batch([result("GET /1"), result("GET /2")])
        partition.write_batch([result("GET /3")])
        assert client.flush(3)
    finally:
        client.close(3)
    assert metrics.counter("dropped", "remote_write_internal_error") == 2  # the batch's items
    assert [operations(b) for b in bodies] == [{"GET /3"}]
