import math
import pickle

from pipeline.config import ScalingConfig, ServiceScalingConfig
from pipeline.scaling import ServiceScaler

from .factories import result, service_window


def window(i, rate, replicas=2, p95=0.1, client_errors=0, service="svc"):
    rs = [result("GET /a", count=int(rate * 10), p95=p95, service=service)]
    if client_errors:
        rs.append(result("call db", kind=3, count=100, errors=client_errors, service=service))
    return service_window(i, rs, instances=tuple(f"pod-{k}" for k in range(replicas)), service=service)


def cfg(**kw):
    kw.setdefault("forecast_horizon_s", 0.0)
    return ScalingConfig(target_rps_per_replica=100.0, **kw)


def test_desired_is_ceil_of_observed_times_ratio_and_tolerance():
    s = ServiceScaler(cfg(), "svc", 10.0)
    upd, ev = s.on_window(window(0, rate=430, replicas=2), alert_firing=False)
    assert upd.desired == 5 and upd.observed == 2 and ev is not None and ev.desired == 5
    s = ServiceScaler(cfg(), "svc", 10.0)
    upd, _ = s.on_window(window(0, rate=209, replicas=2), alert_firing=False)  # ratio 1.045: within 10 %
    assert upd.desired == 2


def test_largest_metric_wins_and_clamp():
    s = ServiceScaler(cfg(target_p95_s=0.05, max_replicas=7, scale_up_pods=100), "svc", 10.0)
    upd, _ = s.on_window(window(0, rate=150, replicas=2, p95=0.2), alert_firing=False)
    assert upd.desired == 7 and upd.reason_code == "latency"  # p95 ratio 4 -> 8, clamped to 7


def test_scale_up_limited_to_max_100pct_or_4_pods_per_15s():
    s = ServiceScaler(cfg(), "svc", 10.0)
    first, _ = s.on_window(window(0, rate=100, replicas=1), alert_firing=False)
    assert first.desired == 1
    upd, _ = s.on_window(window(1, rate=5000, replicas=1), alert_firing=False)
    assert upd.desired == 5 and upd.reason_code == "scale_up_limited"  # max(2x1, 1+4)


def test_scale_down_stabilization_uses_highest_recommendation_in_window():
    s = ServiceScaler(cfg(), "svc", 10.0)
    s.on_window(window(0, rate=800, replicas=8), alert_firing=False)
    desired = []
    for i in range(1, 40):
        desired.append(s.on_window(window(i, rate=200, replicas=8), alert_firing=False)[0].desired)
    # recommendation 2 from window 1 on; the 8 of t=10 s counts while it is at most 300 s old
    assert desired[:30] == [8] * 30 and desired[30:] == [2] * 9


def test_no_scale_down_while_alert_fires():
    s = ServiceScaler(cfg(scale_down_stabilization_s=0.0), "svc", 10.0)
    s.on_window(window(0, rate=800, replicas=8), alert_firing=False)
    held, _ = s.on_window(window(1, rate=100, replicas=8), alert_firing=True)
    assert held.desired == 8 and held.reason_code == "scale_down_held_alert"
    down, _ = s.on_window(window(2, rate=100, replicas=8), alert_firing=False)
    assert down.desired == 1


def test_latency_scale_up_suppressed_when_dependency_fails():
    s = ServiceScaler(cfg(target_p95_s=0.1), "svc", 10.0)
    upd, _ = s.on_window(window(0, rate=100, replicas=2, p95=0.5, client_errors=60), alert_firing=False)
    assert upd.desired == 2 and upd.reason_code == "latency_suppressed_dependency"
    assert "call db" in upd.reason and "60%" in upd.reason


def test_per_service_targets_and_default_replicas():
    c = cfg(services=(ServiceScalingConfig(name="svc", target_rps_per_replica=10.0, replicas=3),))
    s = ServiceScaler(c, "svc", 10.0)
    upd, _ = s.on_window(window(0, rate=95, replicas=0), alert_firing=False)
    assert upd.observed == 3 and upd.desired == 7  # 10 wanted; from 3, max(+100 %, +4) allows 7
    upd, _ = s.on_window(window(1, rate=95, replicas=0), alert_firing=False)
    assert upd.desired == 7  # still within the 15 s scale-up period
    upd, _ = s.on_window(window(2, rate=95, replicas=0), alert_firing=False)
    assert upd.desired == 10


def test_forecast_sizes_for_the_rising_trend():
    s = ServiceScaler(cfg(forecast_horizon_s=60.0), "svc", 10.0)
    out = [s.on_window(window(i, rate=100 + 40 * i, replicas=10), alert_firing=False)[0] for i in range(30)]
    assert out[-1].forecast_rate > out[-1].call_rate
    assert out[-1].desired >= math.ceil(out[-1].forecast_rate / 100) - 1
    assert out[-1].reason_code in ("forecast", "scale_up_limited")


def test_scaler_state_survives_pickling():
    config = cfg(forecast_horizon_s=60.0)
    s = ServiceScaler(config, "svc", 10.0)
    for i in range(20):
        s.on_window(window(i, rate=100 + 10 * i, replicas=3), alert_firing=False)
    blob = pickle.dumps(s)
    assert b"ScalingConfig" not in blob  # state only: the config in force is bound after a restart
    clone = pickle.loads(blob)
    clone.bind(config, 10.0)
    w = window(21, rate=400, replicas=3)
    assert s.on_window(w, False) == clone.on_window(w, False)


def test_a_window_without_any_data_changes_nothing_and_is_not_forecast_from():
    import dataclasses

    s = ServiceScaler(cfg(forecast_horizon_s=60.0, scale_down_stabilization_s=0.0), "svc", 10.0)
    for i in range(10):
        s.on_window(window(i, rate=400, replicas=4), alert_firing=False)
    learned = s.forecaster.n
    silent = dataclasses.replace(service_window(10, []), results=(), instances=(), server_calls=0, silent_run=1)
    upd, ev = s.on_window(silent, alert_firing=False)
    assert (upd.desired, upd.reason_code, ev) == (4, "no_data", None)  # no data is not "no load"
    assert s.forecaster.n == learned


def test_config_in_force_after_bind():
    s = ServiceScaler(cfg(max_replicas=100, scale_up_pods=100), "svc", 10.0)
    upd, _ = s.on_window(window(0, rate=8000, replicas=1), alert_firing=False)
    assert upd.desired == 80
    back = pickle.loads(pickle.dumps(s))
    back.bind(cfg(max_replicas=3, services=(ServiceScalingConfig(name="svc", target_rps_per_replica=50.0),)), 10.0)
    upd, _ = back.on_window(window(1, rate=8000, replicas=1), alert_firing=False)
    assert upd.desired == 3 and back.targets.rps_per_replica == 50.0
