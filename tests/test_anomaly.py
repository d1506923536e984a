import math
import pickle

import numpy as np
import pytest

from pipeline.anomaly import ServiceAnomaly
from pipeline.config import AnomalyConfig, RuleConfig
from pipeline.detectors import AlertLifecycle, FeatureBaseline

from .factories import result, service_window


def normal_results(rng, i):
    return [
        result("GET /a", count=int(rng.poisson(200)), errors=int(rng.binomial(200, 0.01)), p95=0.1 * rng.lognormal(0, 0.05)),
        result("GET /b", count=int(rng.poisson(50)), p95=0.02 * rng.lognormal(0, 0.05)),
        result("call db", kind=3, count=int(rng.poisson(200)), p95=0.01 * rng.lognormal(0, 0.05)),
    ]


def run(detector, windows):
    events, updates = [], []
    for i, results in enumerate(windows):
        u, e = detector.on_window(service_window(i, results))
        updates.append(u)
        events.extend(e)
    return updates, events


def test_lifecycle_pending_firing_resolved():
    lc = AlertLifecycle(pending_windows=2, resolve_windows=3)
    seq = [False, True, False, True, True, True, False, False, False, False]
    got = [lc.observe(x) for x in seq]
    assert got == [None, "pending", None, "pending", "firing", None, None, None, "resolved", None]


def test_baseline_band_and_clipped_learning():
    b = FeatureBaseline(0.1)
    for x in [10.0] * 50:
        b.learn(x, k=4, noise=0.5, warm=False)  # warm-up: learned as they are
    exp, lo, hi = b.band(4, 0.5)
    assert exp == pytest.approx(10.0) and lo == pytest.approx(8.0) and hi == pytest.approx(12.0)
    b.learn(1000.0, k=4, noise=0.5, warm=True)  # an outlier is clipped to the band edge
    assert b.band(4, 0.5)[0] < 10.5


def test_baseline_starts_from_the_plain_mean_of_what_it_has_seen():
    """Until 1 / fading_factor values, the mean and variance are those of all values so far: a
    partial first window (60 of 200 calls) is one value among ten, not 57 % of the mean after 12
    (which made a live service's silence go unjudged for windows). Then it fades as configured."""
    b = FeatureBaseline(0.05)
    xs = [60.0] + [200.0, 180.0] * 5
    for x in xs:
        b.learn(x, k=4, noise=0.5, warm=False)
    assert b.mean.get() == pytest.approx(np.mean(xs)) and b.var.get() == pytest.approx(np.var(xs))
    for _ in range(200):
        b.learn(100.0, k=4, noise=0.5, warm=False)
    assert b.mean.get() == pytest.approx(100.0, abs=0.01)
    again = FeatureBaseline(0.05)  # past the start, exponentially weighted as before
    for x in [0.0] * 30:
        again.learn(x, k=4, noise=0.5, warm=False)
    again.learn(10.0, k=4, noise=0.5, warm=False)
    assert again.mean.get() == pytest.approx(0.5)


def test_quiet_on_normal_traffic_then_fires_on_latency_and_resolves():
    cfg = AnomalyConfig()
    det = ServiceAnomaly(cfg, "svc", 10.0)
    rng = np.random.default_rng(3)
    normal = [normal_results(rng, i) for i in range(200)]
    updates, events = run(det, normal)
    assert [e for e in events if e.state == "firing"] == []
    assert updates[5][0].learning and not updates[-1][0].learning
    # latency x3 on GET /a for 6 windows
    incident = []
    for i in range(6):
        rs = normal_results(rng, i)
        rs[0] = result("GET /a", count=200, p95=0.3, p99=0.45)
        incident.append(rs)
    recovery = [normal_results(rng, i) for i in range(10)]
    events = []
    for i, rs in enumerate(incident + recovery, start=200):
        events.extend(det.on_window(service_window(i, rs))[1])
    states = [(e.operation, e.state) for e in events]
    assert states[:2] == [("GET /a", "pending"), ("GET /a", "firing")]
    assert ("GET /a", "resolved") in states
    firing = next(e for e in events if e.state == "firing")
    assert firing.feature in ("latency_p95", "latency_p99") and firing.observed > firing.upper
    assert firing.trace_ids == tuple(f"{i:032x}" for i in range(1, 6))
    assert firing.ranking[0]["operation"] == "GET /a"
    doc = firing.to_json()
    assert doc["type"] == "alert" and doc["state"] == "firing" and doc["operation"] == "GET /a"
    assert doc["time"] == 201 * 10**10 and len(doc["band"]) == 2


def test_incident_does_not_become_the_new_normal():
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(5)
    run(det, [normal_results(rng, i) for i in range(100)])
    before = det.keys[("GET /a", 2)].baselines["latency_p95"].mean.get()
    for i in range(100, 140):  # a long incident: still anomalous at its end, baseline unchanged
        rs = normal_results(rng, i)
        rs[0] = result("GET /a", count=200, p95=0.5)
        det.on_window(service_window(i, rs))
    assert det.keys[("GET /a", 2)].lifecycle.state == "firing"
    assert det.keys[("GET /a", 2)].baselines["latency_p95"].mean.get() == before


def test_traffic_drop_and_error_log_burst():
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(9)
    for i in range(60):
        det.on_window(service_window(i, normal_results(rng, i), logs=100, error_logs=int(rng.poisson(2))))
    events = []
    for i in range(60, 63):
        rs = normal_results(rng, i)
        rs[0] = result("GET /a", count=10)  # traffic dropped to 5 %
        events += det.on_window(service_window(i, rs, logs=300, error_logs=200))[1]
    fired = {(e.operation, e.feature) for e in events if e.state == "firing"}
    assert ("GET /a", "call_rate") in fired
    assert ("", "error_log_rate") in fired


def test_rates_of_windows_partly_in_a_gap_of_the_input_are_neither_judged_nor_learned():
    """Half a window's data missing for everyone (a gap in the input): its call rates halve, but
    less was read, not less sent; latency is still judged."""
    import dataclasses

    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(9)
    for i in range(60):
        det.on_window(service_window(i, normal_results(rng, i)))
    events, judged = [], []
    for i in range(60, 63):
        rs = [dataclasses.replace(r, count=r.count // 2) for r in normal_results(rng, i)]
        rs[1] = result("GET /b", count=25, p95=0.2)  # x10 slower
        updates, ev = det.on_window(dataclasses.replace(service_window(i, rs), gap=True))
        events += ev
        judged += [j.feature for u in updates for j in u.judgements if j.judged]
    assert "call_rate" not in judged and "error_log_rate" not in judged and "latency_p95" in judged
    assert [(e.operation, e.feature[:8]) for e in events if e.state == "firing"] == [("GET /b", "latency_")]
    # the same drop without the gap fires, and the halved rates were not learned meanwhile
    rs = [dataclasses.replace(r, count=r.count // 2) for r in normal_results(rng, 63)]
    events = det.on_window(service_window(63, rs))[1] + det.on_window(service_window(64, rs))[1]
    assert ("GET /a", "call_rate") in {(e.operation, e.feature) for e in events if e.state == "firing"}


def test_static_rule_goes_through_the_lifecycle():
    rule = RuleConfig(name="errors over 5%", feature="error_rate", above=0.05, for_s=30)
    det = ServiceAnomaly(AnomalyConfig(rules=(rule,)), "svc", 10.0)
    events = []
    for i in range(6):
        events += det.on_window(service_window(i, [result("GET /a", count=100, errors=10)]))[1]
    rule_events = [(e.state, e.time) for e in events if e.source == "rule:errors over 5%"]
    assert rule_events == [("pending", 0), ("firing", 2 * 10**10)]
    firing = [e for e in events if e.state == "firing"][0]
    assert firing.trace_ids == tuple(f"{i:032x}" for i in range(100, 103))  # error spans' traces


def test_detector_state_survives_pickling():
    cfg = AnomalyConfig(detector="band_or_hst")
    det = ServiceAnomaly(cfg, "svc", 10.0)
    rng = np.random.default_rng(1)
    run(det, [normal_results(rng, i) for i in range(30)])
    blob = pickle.dumps(det)
    assert b"AnomalyConfig" not in blob  # state only: the config in force is bound after a restart
    clone = pickle.loads(blob)
    clone.bind(cfg, 10.0, 600.0)
    rs = normal_results(rng, 31)
    a = det.on_window(service_window(31, rs))
    b = clone.on_window(service_window(31, rs))
    assert a == b
    assert not math.isnan(a[0][0].hst_score)


def _silent(i, run):
    from pipeline.model import ServiceWindow

    return ServiceWindow(service="svc", window_start=i * 10**10, window_end=(i + 1) * 10**10, results=(),
                         instances=(), logs=0, error_logs=0, server_calls=0, server_errors=0,
                         server_p95=float("nan"), silent_run=run)  # fmt: skip


def test_an_operation_gone_for_good_resolves_as_expired_and_is_forgotten():
    from pipeline.model import KeyExpired

    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0, stale_after_s=600.0)
    rng = np.random.default_rng(5)
    run(det, [normal_results(rng, i) for i in range(100)])
    # "GET /a" is renamed by a deploy: from window 100 on it never comes again
    events, updates = [], []
    for i in range(100, 200):
        rs = normal_results(rng, i)
        rs[0] = result("GET /a2", count=rs[0].count, p95=rs[0].p95)
        u, e = det.on_window(service_window(i, rs))
        updates.extend(u)
        events.extend(e)
    about_a = [e for e in events if e.operation == "GET /a"]
    assert [e.state for e in about_a][:2] == ["pending", "firing"]  # its traffic dropped: an alert, at first
    assert det.holds_scale_down() is False  # an alert on call rate never holds a scale-down
    resolved = about_a[-1]
    assert (resolved.state, resolved.reason, resolved.to_json()["reason"]) == ("resolved", "expired", "expired")
    assert resolved.time == 159 * 10**10  # 600 s after the start of its last window with spans (99)
    expired = [u for u in updates if isinstance(u, KeyExpired)]
    assert expired == [KeyExpired("svc", "GET /a", 2, 159 * 10**10)]
    assert ("GET /a", 2) not in det.keys and not [k for k in det.rules if k[1] == "GET /a"]
    after = [u for u in updates if not isinstance(u, KeyExpired) and u.time > resolved.time]
    assert not [u for u in after if u.operation == "GET /a"]  # no longer judged


def test_a_silent_service_alerts_on_the_service_and_keeps_its_keys():
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0, stale_after_s=60.0)
    rng = np.random.default_rng(6)
    run(det, [normal_results(rng, i) for i in range(100)])
    events = []
    for k in range(1, 30):  # 290 s of nothing at all: longer than stale_after_s
        _, e = det.on_window(_silent(100 + k, k))
        events.extend(e)
    assert [(e.state, e.operation, e.feature) for e in events] == [("pending", "", "service_rate"),
                                                                   ("firing", "", "service_rate")]  # fmt: skip
    assert events[1].time == 103 * 10**10 and events[1].observed == 0.0  # one empty window is not judged
    assert det.holds_scale_down() is True  # no data is not "no load"
    assert {("GET /a", 2), ("GET /b", 2), ("call db", 3)} <= set(det.keys)  # an outage is not churn
    back = []
    for i in range(130, 140):
        back.extend(det.on_window(service_window(i, normal_results(rng, i)))[1])
    assert [(e.state, e.feature) for e in back] == [("resolved", "service_rate")]
    assert det.expire_all(140 * 10**10) == []  # nothing open any more


def test_a_rarely_busy_service_is_not_silent_until_its_silence_is_unlikely():
    """One span every ~10 windows: a few empty windows in a row are its normal."""
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(7)
    events, run_len = [], 0
    for i in range(2000):
        if rng.random() < 0.1:
            run_len = 0
            events.extend(det.on_window(service_window(i, [result(count=int(rng.integers(1, 4)))]))[1])
        else:
            run_len += 1
            events.extend(det.on_window(_silent(i, run_len))[1])
    assert not [e for e in events if e.state == "firing" and e.feature == "service_rate"]
    firing = []
    for k in range(1, 400):  # then it stops for good: ~100 empty windows in a row have p = 0.9**100
        firing.extend((k, e) for e in det.on_window(_silent(2000 + k, run_len + k))[1] if e.state == "firing")
    assert firing and firing[0][1].feature == "service_rate" and 100 < firing[0][0] < 300


def _error_rule_firing(seed):
    """A detector with the rule "errors" (error rate > 5 %) firing on GET /a at window 30."""
    rule = RuleConfig(name="errors", feature="error_rate", above=0.05, for_s=10)
    det = ServiceAnomaly(AnomalyConfig(rules=(rule,)), "svc", 10.0)
    rng = np.random.default_rng(seed)
    run(det, [normal_results(rng, i) for i in range(30)])
    rs = normal_results(rng, 30)
    rs[0] = result("GET /a", count=200, errors=50)
    _, events = det.on_window(service_window(30, rs))
    return det, rng, events


def test_expire_all_resolves_everything_open_with_a_reason():
    det, _, _ = _error_rule_firing(8)
    events = det.expire_all(40 * 10**10)
    assert {(e.source, e.operation, e.reason) for e in events} >= {("rule:errors", "GET /a", "expired")}
    assert all(e.state == "resolved" for e in events)


def test_bind_applies_the_config_in_force():
    det, rng, ev = _error_rule_firing(9)
    assert [e.state for e in ev if e.source == "rule:errors"] == ["firing"]
    mean = det.keys[("GET /a", 2)].baselines["latency_p95"].mean.get()
    back = pickle.loads(pickle.dumps(det))
    back.bind(AnomalyConfig(rules=(), fading_factor=0.2, band_k=6.0), 10.0, 600.0)  # the rule was removed
    _, ev = back.on_window(service_window(31, normal_results(rng, 31)))
    assert [(e.state, e.reason) for e in ev if e.source == "rule:errors"] == [("resolved", "rule_removed")]
    b = back.keys[("GET /a", 2)].baselines["latency_p95"]
    assert b.mean.fading_factor == 0.2 and abs(b.mean.get() - mean) < 0.05  # learned state kept
    assert back.cfg.band_k == 6.0 and not back.rules


def test_downstream_baselines_of_a_callee_no_longer_called_are_forgotten():
    import dataclasses

    from pipeline.model import Dependency

    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0, stale_after_s=60.0)
    rng = np.random.default_rng(10)
    for i in range(20):  # a new callee every window (one per deployment, say)
        sw = dataclasses.replace(service_window(i, normal_results(rng, i)),
                                 dependencies=(Dependency(f"db-{i}", 10, 0, 0.01), Dependency("cache", 10, 0, 0.001)))
        det.on_window(sw)
    assert len(det.downstream) <= 8 and "cache" in det.downstream  # ~60 s of callees, not all 21


def _sub_ms_windows(rng, n, p95_s):
    return [[result("SELECT", kind=1, count=int(rng.poisson(400)), p95=p95_s * rng.lognormal(0, 0.03))]
            for _ in range(n)]  # fmt: skip


def test_sub_millisecond_shifts_below_the_timing_resolution_do_not_alert():
    """A 0.75 ms query at 1.2 ms (+0.45 ms) is timing noise; the same query at 3x (2.25 ms)
    is not, and with anomaly.latency_resolution_s = 0 the +0.45 ms alerts too."""
    rng = np.random.default_rng(11)
    base = _sub_ms_windows(rng, 120, 0.00075)
    for resolution, p95, fires in ((0.0002, 0.0012, False), (0.0002, 0.00225, True), (0.0, 0.0012, True)):
        det = ServiceAnomaly(AnomalyConfig(latency_resolution_s=resolution), "svc", 10.0)
        _, events = run(det, base + _sub_ms_windows(rng, 4, p95))
        firing = [e for e in events if e.state == "firing"]
        assert bool(firing) == fires, (resolution, p95, firing)
        assert all(e.feature.startswith("latency_") for e in firing)
