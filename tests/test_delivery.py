"""Shared delivery (retry, circuit breaker) and the remote-write encoder."""

import struct
import threading

import cramjam
import httpx

from pipeline.config import DEFAULT_BUCKETS
from pipeline.selfmetrics import SelfMetrics
from sinks.delivery import CircuitBreaker, Delivery, RetryPolicy
from sinks.remote_write import STALE_NAN, encode_write_request, labels_of, samples_of

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
