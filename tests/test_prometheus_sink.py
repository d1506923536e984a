"""The /metrics page: families, exposition rules (checked with prometheus_client's parser),
label escaping, chunked and gzip transfer, stale expiry on an injected clock."""

import gzip
import math
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import DEFAULT_BUCKETS
from pipeline.model import AnomalyUpdate, Judgement, LateSpans, ScalingUpdate, WindowResult
from pipeline.selfmetrics import SelfMetrics
from sinks.prometheus import MetricsHttpServer, SeriesState

NB = len(DEFAULT_BUCKETS) + 1


def page(state: SeriesState) -> str:
    return b"".join(state.render()).decode()


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value}, parsed strictly by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(text: str, name: str, labels: dict | None = None):
    return samples(text).get((name, frozenset((labels or {}).items())))


def result(op="GET /a", start=0, unset=3, errors=1, service="svc"):
    buckets = [[0] * NB for _ in range(3)]
    buckets[0][4] = unset
    buckets[2][NB - 1] = errors
    return WindowResult(
        service=service, operation=op, span_kind=2, window_start=start, window_end=start + 10,
        count=unset + errors, errors=errors, p50=0.01, p90=0.02, p95=0.03, p99=0.04, max=20.0,
        sum=0.03 + 20.0, status_counts=(unset, 0, errors), bucket_counts=tuple(map(tuple, buckets)),
        status_sums=(0.03, 0.0, 20.0),
    )  # fmt: skip


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_families_and_exposition_rules():
    metrics = SelfMetrics()
    clock = Clock()
    state = SeriesState(DEFAULT_BUCKETS, metrics, stale_after_s=60, clock=clock)
    state.update([result(), result(start=10), LateSpans("svc", "GET /a", 2, 5)])
    text = page(state)
    # one HELP and one TYPE per family, before its samples, each family's lines grouped
    seen, current = set(), None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in seen
            seen.add(name)
            current = name
        elif not line.startswith("#"):
            assert line.startswith(current), (current, line)
    assert value(
        text, "telepipe_calls_total",
        {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_UNSET"},
    ) == 6
    err = {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_ERROR"}
    assert value(text, "telepipe_duration_seconds_count", err) == 2
    assert value(text, "telepipe_duration_seconds_bucket", {**err, "le": "15.0"}) == 0
    assert value(text, "telepipe_duration_seconds_bucket", {**err, "le": "+Inf"}) == 2
    assert value(text, "telepipe_duration_seconds_sum", err) == 40.0
    lat = {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER"}
    assert value(text, "telepipe_window_latency_seconds", {**lat, "quantile": "0.99"}) == 0.04
    assert value(text, "telepipe_window_latency_seconds", {**lat, "quantile": "1"}) == 20.0
    assert value(text, "telepipe_late_spans_total") == 0  # progress is counted by the flow, not this sink
    assert value(text, "telepipe_windows_closed_total") == 0
    names = {f.name for f in text_string_to_metric_families(text)}
    for family in ("telepipe_received_spans", "telepipe_accepted_spans", "telepipe_rejected_spans",
                   "telepipe_received_logs", "telepipe_spool_bytes", "telepipe_spool_unread_bytes", "telepipe_late_spans",
                   "telepipe_pipeline_lag_seconds", "telepipe_sink_errors", "telepipe_dropped"):  # fmt: skip
        assert family in names, family


def test_stale_series_expire_on_the_injected_clock():
    metrics = SelfMetrics()
    clock = Clock()
    state = SeriesState(DEFAULT_BUCKETS, metrics, stale_after_s=60, clock=clock)
    state.update([result(op="old")])
    clock.t += 30
    state.update([result(op="fresh")])
    labels = {"service_name": "svc", "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_UNSET"}
    text = page(state)
    assert value(text, "telepipe_calls_total", {**labels, "span_name": "old"}) == 3
    clock.t += 31
    text = page(state)
    assert value(text, "telepipe_calls_total", {**labels, "span_name": "old"}) is None
    assert value(text, "telepipe_calls_total", {**labels, "span_name": "fresh"}) == 3


def test_histograms_are_cumulative_and_end_at_their_count():
    state = SeriesState(DEFAULT_BUCKETS, SelfMetrics())
    state.update([result(op=f"op{i}", unset=i + 1, errors=i % 2) for i in range(5)])
    got = samples(page(state))
    counts = {labels: v for (name, labels), v in got.items() if name == "telepipe_duration_seconds_count"}
    assert len(counts) == 5 + 2  # op1 and op3 also have errors
    for labels, count in counts.items():
        buckets = sorted(
            (float(dict(lb)["le"]), v) for (name, lb), v in got.items()
            if name == "telepipe_duration_seconds_bucket" and lb - {("le", dict(lb)["le"])} == labels
        )  # fmt: skip
        assert len(buckets) == NB
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        assert buckets[-1] == (math.inf, count)


def test_label_values_are_escaped():
    state = SeriesState(DEFAULT_BUCKETS, SelfMetrics())
    service, op = 'we"ird\\svc', "GET /a\nline two"
    state.update([result(op=op, service=service)])
    labels = {"service_name": service, "span_name": op, "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_UNSET"}
    assert value(page(state), "telepipe_calls_total", labels) == 3


def test_anomaly_and_scaling_gauges():
    state = SeriesState(DEFAULT_BUCKETS, SelfMetrics())
    judged = Judgement("latency_p95", 0.3, 0.1, 0.05, 0.2, 4.0, True)
    learning = Judgement("call_rate", 12.0, math.nan, math.nan, math.nan, 0.0, False)
    state.update([
        AnomalyUpdate("svc", "GET /a", 2, 0, 1.3, math.nan, False, "firing", (judged, learning)),
        ScalingUpdate("svc", 0, 3, 5, "call rate 2.0x target", "call_rate", 250.0, 260.0),
    ])  # fmt: skip
    got = samples(page(state))
    key = {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER"}

    def v(name, **extra):
        return got.get((name, frozenset({**key, **extra}.items())))

    assert v("telepipe_anomaly_score") == 1.3
    assert v("telepipe_anomaly_hst_score") is None  # NaN: no HalfSpaceTrees score, no sample
    assert v("telepipe_alert_state") == 2
    assert v("telepipe_anomaly_upper", feature="latency_p95") == 0.2
    assert v("telepipe_anomaly_observed", feature="call_rate") == 12.0
    assert v("telepipe_anomaly_expected", feature="call_rate") is None
    svc = {"service_name": "svc"}
    assert got[("telepipe_desired_replicas", frozenset(svc.items()))] == 5
    assert got[("telepipe_scaling_reason", frozenset({**svc, "reason": "call_rate"}.items()))] == 1
    assert got[("telepipe_scaling_forecast_call_rate", frozenset(svc.items()))] == 260.0


def test_http_metrics_chunked_and_gzip():
    metrics = SelfMetrics()
    state = SeriesState(DEFAULT_BUCKETS, metrics)
    state.update([result(op=f"op{i}") for i in range(300)])  # ~14k lines: several chunks
    assert len(list(state.render())) > 2
    server = MetricsHttpServer("127.0.0.1", 0, state.render, lambda: (False, "replaying"))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        plain = httpx.get(f"{base}/metrics", headers={"Accept-Encoding": "identity"})
        assert plain.status_code == 200 and plain.headers["transfer-encoding"] == "chunked"
        assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "content-encoding" not in plain.headers
        with httpx.stream("GET", f"{base}/metrics", headers={"Accept-Encoding": "gzip"}) as packed:
            assert packed.headers["content-encoding"] == "gzip"
            raw = b"".join(packed.iter_raw())  # the body as sent, not decoded by httpx
        assert gzip.decompress(raw) == plain.content
        refused = httpx.get(f"{base}/metrics", headers={"Accept-Encoding": "gzip;q=0, identity"})
        assert "content-encoding" not in refused.headers and refused.content == plain.content
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # HTTP/1.0: no chunks
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b"".join(iter(lambda: sock.recv(65536), b""))  # read until the server closes
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head and body == plain.content
        assert len(samples(plain.text)) == len(samples(page(state)))
        op299 = {"service_name": "svc", "span_name": "op299", "span_kind": "SPAN_KIND_SERVER"}
        assert value(plain.text, "telepipe_calls_total", {**op299, "status_code": "STATUS_CODE_UNSET"}) == 3
        ready = httpx.get(f"{base}/readyz")
        assert (ready.status_code, ready.text) == (503, "replaying\n")
        assert httpx.get(f"{base}/healthz").text == "ok\n"
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.stop()


def test_retired_keys_and_forgotten_services_leave_the_page_and_late_items_are_counted():
    from pipeline.model import KeyExpired, LateEdges, LateLogs, ServiceExpired
    from sinks.keda.signals import ScalingSignals

    metrics = SelfMetrics()
    state = SeriesState(DEFAULT_BUCKETS, metrics, stale_after_s=math.inf, clock=Clock())
    upd = AnomalyUpdate("svc", "GET /b", 2, 0, 0.1, math.nan, False, "ok", ())
    scaling = ScalingUpdate("other", 0, 1, 2, "why", "call_rate", 1.0, 1.0)
    state.update([result("GET /a"), result("GET /b"), upd, result(service="other"), scaling,
                  LateLogs("svc", 4), LateEdges("svc", 2)])  # fmt: skip
    state.update([KeyExpired("svc", "GET /b", 2, 10), ServiceExpired("other", 10)])
    text = page(state)
    assert 'span_name="GET /b"' not in text and 'span_name="GET /a"' in text
    assert 'service_name="other"' not in text
    board = ScalingSignals()
    board.update([scaling])
    board.update([ServiceExpired("other", 10)])
    assert board.lookup("other") is None  # KEDA is told NOT_FOUND for a forgotten service
