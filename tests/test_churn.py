"""Keys and services that come and go, over the looped fault-free OnlineBoutique recording.

An operation that stops for good (a deploy renamed it) is churn: its alert resolves as
expired after ``prometheus.stale_after_s``, its detector and series go, and it never holds
its service's scale-down. A whole service that stops is an outage: one alert on the
service, its operations kept, until it comes back or is forgotten."""

import math
import time

import pytest
from bytewax.testing import TestingSink

from bench.amplify import load, write_native
from bench.anomaly_eval import Incident, _rows, inject, looped
from pipeline.config import Config, ScalingConfig, ServiceScalingConfig
from pipeline.flow import Outputs
from pipeline.model import AlertEvent, AnomalyUpdate, KeyExpired, ScalingUpdate, ServiceExpired, SpanBatch
from pipeline.selfmetrics import SelfMetrics
from sinks.prometheus import MetricsSink, SeriesState
from telepipe import daemon

from .conftest import ONLINEBOUTIQUE, total, wait_for
from .test_decode import trace_request

S = 10**9
MIN = 60 * S
GONE = ("frontend", "hipstershop.CurrencyService/Convert", 3)  # a CLIENT operation, ~17 calls/s
SERVER = "hipstershop.Frontend/Recv."


def _without(batches, service, operation, kind, since):
    out = []
    for b in batches:
        if service in b.services and operation in b.operations:
            hit = ((b.service_idx == b.services.index(service)) & (b.op_idx == b.operations.index(operation))
                   & (b.kind == kind) & (b.end_ns >= since))  # fmt: skip
            b = _rows(b, ~hit) if hit.any() else b
        out.append(b)
    return out


def _replay(batches, cfg, tmp_path):
    got: list = []
    state = SeriesState(cfg.prometheus.buckets, SelfMetrics(), stale_after_s=math.inf)
    write_native(batches, tmp_path / "rec")
    daemon.replay(cfg, [str(tmp_path / "rec")], extra_outputs=Outputs(result_sinks=[TestingSink(got), MetricsSink(state)]))
    return got, state


@pytest.fixture(scope="module")
def base():
    return [b for b in load([ONLINEBOUTIQUE]) if isinstance(b, SpanBatch)]


def test_an_operation_gone_for_good_stops_being_judged_and_never_holds_scale_down(base, tmp_path):
    clean, first, last = looped(base, 0.56)  # ~33 minutes
    t0 = (first // (10 * S) + 1) * 10 * S
    gone_at, fewer_at = t0 + 10 * MIN, t0 + 22 * MIN
    batches = _without(clean, *GONE, since=gone_at)
    # later the service's own traffic falls to a fifth: a scale-down is wanted
    batches = inject(batches, [Incident("drop", "frontend", SERVER, fewer_at, last + MIN)])
    cfg = Config(scaling=ScalingConfig(services=(ServiceScalingConfig(name="frontend", target_rps_per_replica=1.0),)))
    got, state = _replay(batches, cfg, tmp_path)

    about = [x for x in got if isinstance(x, AlertEvent) and (x.service, x.operation, x.span_kind) == GONE]
    assert [x.state for x in about] == ["pending", "firing", "resolved"]  # its traffic stopped: an alert at first
    assert gone_at <= about[1].time <= gone_at + 30 * S
    resolved = about[-1]
    assert resolved.reason == "expired" and resolved.to_json()["reason"] == "expired"
    assert gone_at + 9 * MIN <= resolved.time <= gone_at + 10 * MIN + 10 * S  # stale_after_s (600 s) after
    assert [x for x in got if isinstance(x, KeyExpired)] == [KeyExpired(*GONE, resolved.time)]
    # no longer judged, no series on /metrics
    assert not [x for x in got if isinstance(x, AnomalyUpdate) and (x.service, x.operation, x.span_kind) == GONE
                and x.time >= resolved.time]  # fmt: skip
    page = b"".join(state.render()).decode()
    assert f'span_name="{GONE[1]}"' not in page and 'span_name="hipstershop.CartService/GetCart"' in page

    # the frontend scales down after its traffic fell, nothing holds it
    frontend = [x for x in got if isinstance(x, ScalingUpdate) and x.service == "frontend"]
    before = max(x.desired for x in frontend if x.time < fewer_at)
    after = [x for x in frontend if x.time >= fewer_at]
    assert before >= 8 and min(x.desired for x in after) <= before // 3
    assert not [x for x in frontend if x.reason_code == "scale_down_held_alert" and x.time >= resolved.time]


def test_a_service_that_goes_silent_in_a_recording_alerts_as_a_whole(base, tmp_path):
    clean, first, _ = looped(base, 0.4)  # ~24 minutes
    t0 = (first // (10 * S) + 1) * 10 * S
    out_from, out_to = t0 + 14 * MIN, t0 + 18 * MIN  # the cart service is down for 4 minutes
    keep = []
    for b in clean:
        if "cartservice" in b.services:
            hit = (b.service_idx == b.services.index("cartservice")) & (b.end_ns >= out_from) & (b.end_ns < out_to)
            b = _rows(b, ~hit) if hit.any() else b
        keep.append(b)
    got, state = _replay(keep, Config(), tmp_path)
    # (the recording's last, partial window is left out: its call rates are low by construction)
    cart = [x for x in got if isinstance(x, AlertEvent) and x.service == "cartservice" and x.time < out_to + 3 * MIN]
    assert [(x.state, x.operation, x.feature) for x in cart if x.state != "pending"][:2] == [
        ("firing", "", "service_rate"), ("resolved", "", "service_rate")]  # fmt: skip
    firing = next(x for x in cart if x.state == "firing")
    assert out_from <= firing.time <= out_from + 2 * MIN  # in the silence, by event time (judged when it ended)
    assert not [x for x in cart if x.operation]  # one alert on the service, none per operation
    assert not [x for x in got if isinstance(x, KeyExpired | ServiceExpired)]  # an outage is not churn
    updates = [x for x in got if isinstance(x, ScalingUpdate) and x.service == "cartservice"
               and out_from <= x.time < out_to]  # fmt: skip
    assert updates and {x.reason_code for x in updates[2:]} == {"no_data"}


@pytest.mark.integration
@pytest.mark.slow
def test_a_live_service_that_goes_silent_alerts_then_is_forgotten(daemon_factory):
    """Live, silence is judged on the clock: the service's windows go on closing, empty."""
    d = daemon_factory(
        "[windows]\nlength_s = 1.0\nallowed_lateness_s = 0.2\nidle_timeout_s = 1.0\n"
        "[anomaly]\nwarmup_windows = 1\n[prometheus]\nstale_after_s = 3.0\nservice_stale_after_s = 6.0\n"
    )  # fmt: skip
    import grpc

    channel = grpc.insecure_channel(d.grpc_target)
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=None, response_deserializer=None)  # fmt: skip
    started = time.monotonic()
    k = 0
    # 9 s of steady traffic, ~200 spans/s: silence is judged once the service key has learned 6 windows
    # (6 x warmup_windows); a loaded machine may leave a window without data (a gap, not learned)
    while time.monotonic() - started < 9:
        end = time.time_ns()
        export(trace_request([{"start": end - 10**6, "end": end, "span_id": (k * 100 + i + 1).to_bytes(8, "big")}
                              for i in range(20)], service="cart"), timeout=5)  # fmt: skip
        k += 1
        time.sleep(0.1)
    channel.close()
    # the service's silence fires (span_name "" is the service-level key)
    assert wait_for(lambda: total(d.metrics_text(), "telepipe_alert_state", service_name="cart", span_name="") == 2,
                    timeout=15)  # fmt: skip
    text = wait_for(lambda: t if total(t := d.metrics_text(), "telepipe_expired_services_total") else None, timeout=30)
    assert 'service_name="cart"' not in text  # forgotten: no series left
    assert total(text, "telepipe_expired_keys_total") == 0  # its operation was not churned away first
