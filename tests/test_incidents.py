"""The incident tracker: grouping alerts on linked services, ranking root causes, resolving;
and incidents out of a real fault replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config, MetricTargetConfig, ScalingConfig
from pipeline.incident_model import Evidence, ServiceSummary
from pipeline.incidents import IncidentTracker
from telepipe import daemon

S = 10**9
L = 10 * S
FAULTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "faults"


def summary(service, w, state="ok", callees=(), evidence=(), downstream=()) -> ServiceSummary:
    return ServiceSummary(service, w * L, state, tuple(callees), tuple(evidence), tuple(downstream))


def run(tracker: IncidentTracker, windows: list[list[ServiceSummary]]) -> list:
    events = []
    for batch in windows:
        for s in batch:
            events.extend(tracker.on_summary(s))
    return events + tracker.flush()


def chain(w: int, state_front="ok", state_cart="ok", slow=False) -> list[ServiceSummary]:
    """frontend -> checkout -> cart; with ``slow`` the cart's SERVER latency is anomalous and
    every caller sees its callee slow."""
    ev_cart = [Evidence("server", "GetCart", "latency_p50", 6.0)] if slow else []
    ev_checkout = [Evidence("server", "PlaceOrder", "latency_p50", 3.0)] if slow else []
    down_front = [("checkout", 2.5, "latency")] if slow else []
    down_checkout = [("cart", 5.0, "latency")] if slow else []
    return [
        summary("frontend", w, state_front, ["checkout"], downstream=down_front),
        summary("checkout", w, state_front, ["cart"], ev_checkout, down_checkout),
        summary("cart", w, state_cart, [], ev_cart),
        summary("ads", w, "ok", []),
    ]


@pytest.mark.parametrize("hold", [True, False])
def test_linked_alerts_are_one_incident_and_the_deepest_slow_service_is_the_root_cause(hold: bool) -> None:
    tracker = IncidentTracker(L, hold)
    windows = [chain(w) for w in range(10)]
    windows += [chain(w, "firing", "firing" if w >= 11 else "pending", slow=True) for w in range(10, 14)]
    windows += [chain(w) for w in range(14, 20)]
    events = run(tracker, windows)
    states = [e.state for e in events]
    assert states[0] == "opened" and states[-1] == "resolved" and states.count("opened") == 1
    opened = events[0]
    assert opened.time == 10 * L and set(opened.services) == {"checkout", "frontend"}
    final = [e for e in events if e.state != "resolved"][-1]
    assert set(final.services) == {"cart", "checkout", "frontend"}
    causes = [c["service"] for c in final.root_causes]
    assert causes[0] == "cart"
    assert any("calls from checkout anomalous" in why for why in final.root_causes[0]["evidence"])
    checkout = next(c for c in final.root_causes if c["service"] == "checkout")
    assert any("explained by anomalous callee cart" in why for why in checkout["evidence"])
    assert events[-1].time == (14 + 2) * L  # three quiet windows, then resolved


def test_unlinked_alerts_are_separate_incidents() -> None:
    tracker = IncidentTracker(L, hold=True)
    windows = [chain(w) for w in range(5)]
    windows.append(chain(5, "ok", "ok") + [summary("batch", 5, "firing", [], [Evidence("service", "", "x", 2.0)])])
    windows[-1] = [s if s.service != "ads" else summary("ads", 5, "firing") for s in windows[-1]]
    events = run(tracker, windows)
    opened = sorted(e.services for e in events if e.state == "opened")
    assert opened == [("ads",), ("batch",)]


def test_replay_takes_windows_in_order_whatever_order_summaries_arrive() -> None:
    a, b = IncidentTracker(L, hold=True), IncidentTracker(L, hold=True)
    windows = [chain(w, "firing" if w >= 3 else "ok", slow=w >= 3) for w in range(8)]
    forward = run(a, windows)
    # another worker's summaries come later: one service's whole stream after the others'
    late_cart = [s for ws in windows for s in ws if s.service != "cart"] + [
        s for ws in windows for s in ws if s.service == "cart"]  # fmt: skip
    backward = run(b, [late_cart])
    assert forward == backward and b.late == 0


def test_live_a_window_waits_for_every_service_heard_of() -> None:
    tracker = IncidentTracker(L)
    assert tracker.on_summary(summary("a", 0)) == [] and tracker.taken_until == 0  # only a is known
    tracker.on_summary(summary("b", 0))  # too late for window 0: counted, but b is known now
    assert tracker.late == 1
    tracker.on_summary(summary("a", 1))
    assert tracker.taken_until == 0  # b has not summarized window 1 yet (window 1 starts at L)
    tracker.on_summary(summary("b", 1))
    assert tracker.taken_until == L


@pytest.mark.skipif(not FAULTS.exists(), reason="../shared/data/faults is not beside the checkout")
def test_an_incident_out_of_a_real_cpu_fault(tmp_path: Path) -> None:
    name = "ob-cpu-contention-ad-1631"
    cfg = Config(scaling=ScalingConfig(metrics=(MetricTargetConfig(name="container.cpu.utilization", target=0.7),)))
    out = tmp_path / "out.jsonl"
    paths = [str(FAULTS / f"{name}.otlp.jsonl.zst"), str(FAULTS / f"{name}.metrics.otlp.jsonl.zst")]
    _, metrics = daemon.replay(cfg, paths, emit_jsonl=str(out))
    incidents = [json.loads(line) for line in out.read_text().splitlines() if '"incident"' in line]
    opened = [i for i in incidents if i["state"] == "opened" and "adservice" in i["services"]]
    assert opened and opened[0]["root_causes"][0]["service"] == "adservice"
    assert "container.cpu.utilization" in opened[0]["root_causes"][0]["evidence"][0]
    assert metrics.counter("incidents", "opened") >= 1
