"""bench/fault_eval.py: the scores of issue 14 on hand-made events, and scenario construction on a
small synthetic recording (no dataflow run: fast)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fault_eval import detection, early, first_named, score
from bench.fault_scenario import WINDOW, Label, S, build_scenario, event_time, quiet_batches
from pipeline.metric_model import METRIC_COLUMNS, MetricBatch
from pipeline.model import SPAN_COLUMNS, LogBatch, SpanBatch

T = 1_700_000_000 * S  # injection
LABEL = Label("x-fault", "cart", "cart-pod", "network_delay", T // S, "base.jsonl")


def alert(service: str, t_s: float, state: str = "firing", feature: str = "latency_p50", ranking=()) -> dict:
    return {"type": "alert", "state": state, "service": service, "time": T + int(t_s * S), "feature": feature,
            "ranking": list(ranking)}  # fmt: skip


def incident(t_s: float, services=(), root_causes=()) -> dict:
    return {"type": "incident", "state": "opened", "id": "i1", "time": T + int(t_s * S), "services": list(services),
            "root_causes": [{"service": s, "score": 1.0, "evidence": []} for s in root_causes]}  # fmt: skip


def test_detected_by_a_firing_alert_on_the_service_within_60_s() -> None:
    assert detection([alert("cart", 20)], "cart", T) == 20 * S
    assert detection([alert("cart", 20, state="pending")], "cart", T) is None  # pending is not enough
    assert detection([alert("cart", 70)], "cart", T) is None  # after the 60 s
    assert detection([alert("cart", -10)], "cart", T) is None  # before the injection: early, not detected
    assert detection([alert("frontend", 10)], "cart", T) is None


def test_detected_by_a_ranking_naming_the_service() -> None:
    ranked = alert("frontend", 30, ranking=[{"operation": "GetCart", "score": 2.0},
                                           {"downstream_service": "cart", "score": 1.5}])  # fmt: skip
    assert detection([alert("frontend", 10), ranked], "cart", T) == 30 * S
    own = alert("frontend", 10, ranking=[{"operation": "Recv", "score": 2.0}])  # operations name the alert's service
    assert detection([own], "cart", T) is None


def test_detected_by_an_incident_naming_the_service() -> None:
    assert detection([incident(40, services=["frontend", "cart"])], "cart", T) == 40 * S
    assert detection([incident(50, services=["frontend"], root_causes=["cart"])], "cart", T) == 50 * S
    assert detection([incident(50, services=["frontend"], root_causes=["ad"])], "cart", T) is None


def test_early_counts_firing_alerts_before_injection_only() -> None:
    events = [alert("ad", -500), alert("ad", -490, state="resolved"), alert("cart", -5, state="pending"),
              alert("cart", -1), alert("cart", 0), incident(-100, services=["ad"])]  # fmt: skip
    assert [(e["service"], e["time"] - T) for e in early(events, T)] == [("ad", -500 * S), ("cart", -1 * S)]


def test_root_cause_order_incident_root_causes_first_then_alerts_in_time_order() -> None:
    events = [
        alert("frontend", 30, ranking=[{"operation": "Recv"}, {"downstream_service": "checkout"}]),
        alert("currency", 10),
        incident(40, services=["frontend"], root_causes=["payment", "frontend"]),
        alert("cart", 20, state="pending"),  # pending alerts name nothing here
        alert("ad", -10),  # before the injection
        alert("shipping", 61),  # after the horizon
    ]
    assert first_named(events, T) == ["payment", "frontend", "currency"]
    assert first_named(events, T, n=5) == ["payment", "frontend", "currency", "checkout"]
    no_incident = [e for e in events if e["type"] == "alert"]
    assert first_named(no_incident, T) == ["currency", "frontend", "checkout"]


def test_score_puts_it_together() -> None:
    events = [alert("frontend", 10, ranking=[{"downstream_service": "cart"}]), alert("ad", -30, feature="call_rate")]
    got = score(LABEL, events)
    assert got["detected"] and got["delay_s"] == 10.0
    assert got["root_cause_at_3"] and got["first_named"] == ["frontend", "cart"]
    assert got["early"] == 1 and got["early_alerts"][0]["feature"] == "call_rate"


# ------------------------------------------------------------------------------ construction


def spans(ends_s: list[float], base_ns: int, trace_byte: int = 1) -> SpanBatch:
    n = len(ends_s)
    cols = {name: np.zeros(n, dtype) for name, dtype in SPAN_COLUMNS}
    cols["end_ns"] = np.array([base_ns + int(t * S) for t in ends_s], np.int64)
    cols["duration_ns"] = np.full(n, 5_000_000, np.int64)
    cols["kind"] = np.full(n, 2, np.int8)
    cols["trace_id"] = np.array([bytes([trace_byte, i] + [7] * 14) for i in range(n)], "S16")
    cols["span_id"] = np.array([bytes([i + 1] + [3] * 7) for i in range(n)], "S8")
    return SpanBatch(services=("cart",), operations=("GetCart",), instances=("cart-pod",), **cols)


def logs(times_s: list[float], base_ns: int) -> LogBatch:
    n = len(times_s)
    return LogBatch(
        time_ns=np.array([base_ns + int(t * S) for t in times_s], np.int64),
        severity=np.full(n, 9, np.int8),
        severity_text=["INFO"] * n,
        body=["x"] * n,
        trace_id=["01" + "07" * 15] * n,
        span_id=["01" + "03" * 7] * n,
        service=["cart"] * n,
        instance=["cart-pod"] * n,
    )


def metric_at(t_ns: int) -> MetricBatch:
    cols = {name: np.zeros(1, dtype) for name, dtype in METRIC_COLUMNS}
    cols["time_ns"] = np.array([t_ns], np.int64)
    return MetricBatch(services=("cart",), instances=("cart-pod",), names=("container.cpu.utilization",),
                       attrs=("",), **cols)  # fmt: skip


def test_scenario_loops_end_before_the_fault_with_fresh_ids_and_monotone_times() -> None:
    base_t0 = T - 10_000 * S  # the fault-free recording is from another time
    # 5 spans over 31.5 s: back to back, the next copy begins one mean spacing (6.3 s) after: period 37.8 s
    base = [spans([0, 5, 12], base_t0), logs([6, 13], base_t0), spans([20, 31.5], base_t0)]
    fault = [spans([0, 4], T - 30 * S, trace_byte=9), spans([8, 40], T - 30 * S, trace_byte=9)]
    metrics = [metric_at(T - 200 * S), metric_at(T - 100 * S), metric_at(T + 5 * S)]
    sc = build_scenario(LABEL, base, fault, metrics, loops=3)

    assert sc.period_ns == 37_800_000_000
    assert sc.loops_last_ns == sc.fault_first_ns - WINDOW  # the last loop ends one window before the fault
    assert sc.loops_first_ns == sc.loops_last_ns - 31_500_000_000 - 2 * sc.period_ns
    span_batches = [b for b in sc.batches if isinstance(b, SpanBatch)]
    assert len(span_batches) == 3 * 2 + 2 and sc.spans == 3 * 5 + 4
    loops = [span_batches[2 * k : 2 * k + 2] for k in range(3)]
    ends = [np.concatenate([b.end_ns for b in loop]) for loop in loops]
    for k, e in enumerate(ends):
        assert (np.diff(e) >= 0).all()  # times monotone within a loop
        assert e[0] == sc.loops_first_ns + k * sc.period_ns  # back to back, one period apart
        if k:
            assert e[0] > ends[k - 1][-1]
    assert ends[-1][-1] < sc.fault_first_ns
    trace_ids = [set(np.concatenate([b.trace_id for b in loop]).tolist()) for loop in loops]
    originals = set(np.concatenate([b.trace_id for b in base if isinstance(b, SpanBatch)]).tolist())
    assert all(not (a & b) for i, a in enumerate(trace_ids) for b in trace_ids[i + 1 :])  # ids differ per loop
    assert all(not (ids & originals) for ids in trace_ids)
    loop_logs = [b for b in sc.batches if isinstance(b, LogBatch)]
    assert len(loop_logs) == 3 and len({b.trace_id[0] for b in loop_logs}) == 3  # logs shifted and re-ided too
    assert [int(b.time_ns[0]) for b in loop_logs] == [int(e[1]) + S for e in ends]
    # the fault recording as it is, after the loops; metrics unshifted, merged in by time
    assert sc.batches[-1] is fault[1] or sc.batches[-2] is fault[1]
    got_metrics = [b for b in sc.batches if isinstance(b, MetricBatch)]
    assert got_metrics == metrics
    times = [event_time(b) for b in sc.batches]
    for m in got_metrics:
        i = sc.batches.index(m)
        assert max(times[:i], default=0) <= event_time(m) or i == 0
        assert event_time(m) <= max(times[i + 1 :], default=event_time(m))  # nothing later came before


def test_quiet_loops_are_shifted_by_the_phase() -> None:
    base = [spans([0, 5, 12], T), spans([20, 31.5], T)]
    batches, hours = quiet_batches(base, 0.1, int(3.3 * S))
    assert hours == pytest.approx(10 * 37.8 / 3600) and len(batches) == 2 * 10  # ceil(360 s / 37.8 s) loops
    assert int(batches[0].end_ns[0]) == T + int(3.3 * S)
    assert int(batches[2].end_ns[0]) == T + int(3.3 * S) + 37_800_000_000
