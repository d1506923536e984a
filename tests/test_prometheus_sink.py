"""The /metrics collector: families, exposition rules, stale expiry on an injected clock."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import DEFAULT_BUCKETS
from pipeline.model import LateSpans, WindowResult
from pipeline.selfmetrics import SelfMetrics
from sinks.prometheus import SeriesState, make_registry

NB = len(DEFAULT_BUCKETS) + 1


def result(op="GET /a", start=0, unset=3, errors=1):
    buckets = [[0] * NB for _ in range(3)]
    buckets[0][4] = unset
    buckets[2][NB - 1] = errors
    return WindowResult(
        service="svc", operation=op, span_kind=2, window_start=start, window_end=start + 10,
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
    registry = make_registry(state, metrics)
    text = generate_latest(registry).decode()
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
    assert registry.get_sample_value(
        "telepipe_calls_total",
        {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_UNSET"},
    ) == 6
    err = {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_ERROR"}
    assert registry.get_sample_value("telepipe_duration_seconds_count", err) == 2
    assert registry.get_sample_value("telepipe_duration_seconds_bucket", {**err, "le": "15.0"}) == 0
    assert registry.get_sample_value("telepipe_duration_seconds_bucket", {**err, "le": "+Inf"}) == 2
    assert registry.get_sample_value("telepipe_duration_seconds_sum", err) == 40.0
    lat = {"service_name": "svc", "span_name": "GET /a", "span_kind": "SPAN_KIND_SERVER"}
    assert registry.get_sample_value("telepipe_window_latency_seconds", {**lat, "quantile": "0.99"}) == 0.04
    assert registry.get_sample_value("telepipe_window_latency_seconds", {**lat, "quantile": "1"}) == 20.0
    assert registry.get_sample_value("telepipe_late_spans_total") == 5
    assert registry.get_sample_value("telepipe_windows_closed_total") == 2
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
    registry = make_registry(state, metrics)
    labels = {"service_name": "svc", "span_kind": "SPAN_KIND_SERVER", "status_code": "STATUS_CODE_UNSET"}
    assert registry.get_sample_value("telepipe_calls_total", {**labels, "span_name": "old"}) == 3
    clock.t += 31
    assert registry.get_sample_value("telepipe_calls_total", {**labels, "span_name": "old"}) is None
    assert registry.get_sample_value("telepipe_calls_total", {**labels, "span_name": "fresh"}) == 3
