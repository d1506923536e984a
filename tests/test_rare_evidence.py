"""Evidence that a band cannot weigh: rare counts (error logs of a service that logs none), the
slow calls of rare operations, and how much traffic evidence counts toward a root cause."""

from __future__ import annotations

import math

import numpy as np

from pipeline.anomaly import SERVICE_KEY, ServiceAnomaly
from pipeline.config import DEFAULT_BUCKETS, AnomalyConfig
from pipeline.rare_events import RUN_WINDOWS, CallTail, RareCount, at_once_z
from pipeline.incident_model import Evidence, ServiceSummary
from pipeline.incidents import IncidentTracker
from pipeline.model import WindowResult

from .factories import NB, result, service_window

L = 10 * 10**9


def timed(op: str, durations_s: list[float], kind: int = 2) -> WindowResult:
    """A window of ``op`` whose calls took these durations (in the explicit buckets)."""
    buckets = [0] * NB
    for d in durations_s:
        buckets[int(np.searchsorted(DEFAULT_BUCKETS, d))] += 1
    r = result(op, kind=kind, count=len(durations_s), p95=max(durations_s))
    return WindowResult(**{**r.__dict__, "bucket_counts": (tuple(buckets), (0,) * NB, (0,) * NB)})


def busy(rng) -> WindowResult:
    return result("GET /a", count=int(rng.poisson(200)), p95=0.1 * rng.lognormal(0, 0.05))


def test_one_window_beyond_the_band_stands_for_the_whole_run_only_when_that_unlikely() -> None:
    assert at_once_z(4.0, 1) == 4.0 or math.isclose(at_once_z(4.0, 1), 4.0, rel_tol=1e-6)
    assert 5.9 < at_once_z(4.0, 2) < 6.1  # p(4) ** 2 = 1e-9
    assert at_once_z(4.0, 3) > at_once_z(4.0, 2)


def test_rare_count_is_poisson_with_a_prior_and_scaled_by_its_dispersion() -> None:
    never = RareCount()
    for _ in range(300):
        never.learn(0, 10.0)
    assert never.rate() < 0.01 and never.z(0) == 0.0
    assert never.z(1) < 4 < never.z(3) < never.z(4)
    bursty = RareCount()  # nothing most windows, 8 at a time now and then: 8 is its normal
    for i in range(300):
        bursty.learn(8 if i % 10 == 0 else 0, 10.0)
    assert bursty.dispersion() > 5 and bursty.z(8) < 2


def test_a_burst_of_error_logs_from_a_service_that_logs_none_fires_in_its_window() -> None:
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(1)
    for i in range(200):
        det.on_window(service_window(i, [busy(rng)], logs=100, error_logs=0))
    _, events = det.on_window(service_window(200, [busy(rng)], logs=100, error_logs=1))
    assert events == []  # one error: unusual, not an incident
    det.on_window(service_window(201, [busy(rng)], logs=100, error_logs=0))
    _, events = det.on_window(service_window(202, [busy(rng)], logs=100, error_logs=6))
    fired = [e for e in events if e.state == "firing"]
    assert [(e.feature, e.time) for e in fired] == [("error_log_rate", 202 * L)]
    assert fired[0].observed == 0.6 and fired[0].upper < 0.6


def test_a_few_error_logs_a_window_from_a_service_that_logs_none_fire_over_their_run() -> None:
    """From a service that logs an error every 100 windows, two errors in a window are not enough
    alone (z 3.8), two such windows in a row are (as two windows beyond the band); the run's windows
    are not learned while it lasts (the rate would rise under it), and are when it ends."""
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(5)
    for i in range(300):
        det.on_window(service_window(i, [busy(rng)], logs=100, error_logs=int(i % 100 == 50)))
    rare = det.keys[SERVICE_KEY].rare["error_log_rate"]
    before = rare.rate()
    got = []
    for i in range(300, 304):
        got += [(e.state, e.feature, e.time // L) for e in det.on_window(
            service_window(i, [busy(rng)], logs=100, error_logs=2))[1]]  # fmt: skip
    assert got == [("firing", "error_log_rate", 301)]
    assert rare.rate() == before and rare.run == (8.0, 4)
    count = RareCount()
    for i in range(300):
        count.learn(int(i % 100 == 50), 10.0)
    assert count.judge(2) < 4 < count.judge(2)  # one window, then the run of two
    count.learn(2, 10.0)  # held
    assert count.judge(0) == 0.0 and count.run == (0.0, 0)
    low = count.rate()
    count.learn(0, 10.0)  # the run is over: its windows are learned, then this one
    assert count.rate() > low and count.held == ()


def test_a_service_that_logs_an_error_every_window_from_its_start_is_its_normal() -> None:
    """Its first windows are above the prior's rate; they are learned (no run before RUN_LEARNED
    windows, and a run holds back RUN_WINDOWS windows at most), so its rate becomes its own."""
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(6)
    events = []
    for i in range(300):
        events += det.on_window(service_window(i, [busy(rng)], logs=100, error_logs=1 + int(i % 7 == 3)))[1]
    rare = det.keys[SERVICE_KEY].rare["error_log_rate"]
    assert events == [] and rare.rate() > 0.9 and len(rare.held) < RUN_WINDOWS


def test_a_service_that_always_logs_errors_needs_two_windows_as_before() -> None:
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(2)
    for i in range(200):
        det.on_window(service_window(i, [busy(rng)], logs=100, error_logs=int(rng.poisson(20))))
    states = [[e.state for e in det.on_window(service_window(i, [busy(rng)], logs=300, error_logs=200))[1]]
              for i in (200, 201)]  # fmt: skip
    assert states == [["pending"], ["firing"]]


def test_slow_calls_of_a_rare_operation_fire_and_a_short_blip_does_not() -> None:
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(3)
    normal = lambda: timed("Charge", list(0.006 + 0.003 * rng.random(int(rng.integers(1, 4)))), kind=3)  # noqa: E731
    for i in range(300):
        det.on_window(service_window(i, [busy(rng), normal()]))
    # three slow calls in one window, then normal again: fewer than 5 past the bound, nothing
    events = det.on_window(service_window(300, [busy(rng), timed("Charge", [0.5, 0.52, 0.55], kind=3)]))[1]
    assert events == []
    for i in range(301, 305):
        det.on_window(service_window(i, [busy(rng), normal()]))
    # a network delay: every call 60 times slower, 1-3 calls a window
    got = []
    for i, n in enumerate([1, 3, 3, 2], start=305):
        got += [(e.state, e.feature, e.time // L) for e in det.on_window(
            service_window(i, [busy(rng), timed("Charge", [0.53] * n, kind=3)]))[1]]  # fmt: skip
    # 1 + 3 calls past the bound are fewer than 5: judged from the third window, whose run of three
    # windows is the evidence of three windows: it fires there, not a window later
    assert got[:1] == [("firing", "slow_calls", 307)]


def test_slow_calls_in_one_window_alone_wait_for_a_second() -> None:
    """Five slow calls in one window are a run of one window: pending, as a band alert would be."""
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(4)
    for i in range(300):
        det.on_window(service_window(i, [busy(rng), timed("Charge", [0.006, 0.008], kind=3)]))
    got = []
    for i in (300, 301):
        got += [(e.state, e.feature, e.time // L) for e in det.on_window(
            service_window(i, [busy(rng), timed("Charge", [0.53] * 6, kind=3)]))[1]]  # fmt: skip
    assert got == [("pending", "slow_calls", 300), ("firing", "slow_calls", 301)]


def test_an_operation_slow_by_request_learned_its_slow_mode() -> None:
    det = ServiceAnomaly(AnomalyConfig(), "svc", 10.0)
    rng = np.random.default_rng(4)
    two_modes = lambda n: timed("queryInfo", [0.09 if rng.random() < 0.6 else 0.5 for _ in range(n)])  # noqa: E731
    for i in range(300):
        det.on_window(service_window(i, [busy(rng), two_modes(int(rng.integers(1, 4)))]))
    events = []
    for i in range(300, 306):  # the slow mode three times in a row: as it has been before
        events += det.on_window(service_window(i, [busy(rng), timed("queryInfo", [0.5, 0.5, 0.5])]))[1]
    assert [e for e in events if e.feature == "slow_calls"] == []


def test_slow_calls_of_a_pending_run_are_not_learned_until_it_ends() -> None:
    tail = CallTail(NB)
    fast = [0] * NB
    fast[3] = 2
    for _ in range(200):
        tail.learn(fast, 10.0)
    slow = [0] * NB
    slow[9] = 2
    bound = tail.bound(DEFAULT_BUCKETS)
    assert tail.judge(slow, 4.0, DEFAULT_BUCKETS) is not None
    tail.learn(slow, 10.0)  # judged normal (fewer than 5 past), but inside a run: held
    assert tail.bound(DEFAULT_BUCKETS) == bound and tail.held
    tail.judge(fast, 4.0, DEFAULT_BUCKETS)  # the run ends
    tail.learn(fast, 10.0)
    assert not tail.held and tail.counts[9] > 1.9


def test_traffic_evidence_weighs_less_toward_a_root_cause_than_latency() -> None:
    tracker = IncidentTracker(L, False)

    def window(w: int) -> list[ServiceSummary]:
        state = "firing" if w >= 10 else "ok"
        busy_ev = (Evidence("server", "List", "call_rate", 3.0),) if w >= 10 else ()
        slow_ev = (Evidence("server", "Charge", "latency_p50", 2.0),) if w >= 10 else ()
        return [
            ServiceSummary("front", w * L, state, ("catalog", "payment"), (), ()),
            ServiceSummary("catalog", w * L, state, (), busy_ev, ()),
            ServiceSummary("payment", w * L, state, (), slow_ev, ()),
        ]

    events = []
    for w in range(14):
        for s in window(w):
            events += tracker.on_summary(s)
    ranked = [c["service"] for c in [e for e in events if e.root_causes][-1].root_causes]
    assert ranked.index("payment") < ranked.index("catalog")
