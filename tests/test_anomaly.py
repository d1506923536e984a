import math
import pickle

import numpy as np
import pytest

from pipeline.anomaly import AlertLifecycle, FeatureBaseline, ServiceAnomaly
from pipeline.config import AnomalyConfig, RuleConfig

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
    det = ServiceAnomaly(AnomalyConfig(detector="band_or_hst"), "svc", 10.0)
    rng = np.random.default_rng(1)
    run(det, [normal_results(rng, i) for i in range(30)])
    clone = pickle.loads(pickle.dumps(det))
    rs = normal_results(rng, 31)
    a = det.on_window(service_window(31, rs))
    b = clone.on_window(service_window(31, rs))
    assert a == b
    assert not math.isnan(a[0][0].hst_score)
