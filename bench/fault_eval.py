"""Scoring harness of issue 14: real faults (Nezha OnlineBoutique and TrainTicket).

    .venv/bin/python -m bench.fault_eval [--only NAME...] [--config FILE] [--json FILE]
                                         [--quiet-hours 1] [--no-quiet] [--no-plot] [--phase S]

Per labelled fault of ``../shared/data/faults/faults.json``: the label's fault-free recording
looped 12 times (ids rewritten, times shifted, back to back, ending one window before the
fault recording), then the fault recording, with (OnlineBoutique) its pod metrics merged in
by time, unshifted; run through the real dataflow at max speed in-process, through one source
partition (deterministic). Config: the defaults, plus ``[[scaling.metrics]]
container.cpu.utilization`` target 0.7 for OnlineBoutique (``--config FILE`` replaces both).

Scores (window start times of the events, injection ``t``, horizon 60 s):

- detected: in [t, t + 60 s] a firing alert on the faulty service, or an alert whose ranking
  names it (operations name the alert's service, ``downstream_service`` its callee), or an
  incident (``services`` or ``root_causes``) naming it; delay = first naming - t;
- root cause @3: the faulty service is among the first 3 distinct services named in
  [t, t + 60 s]: incident root causes in event order, then firing alerts in time order (their
  service, then the services their rankings name);
- early: firing alerts before t (on the fault-free loops or the recording before injection).

``--phase S`` moves every scenario S seconds later as a whole (injection time too): the same
faults at another phase against the window boundaries.

Quiet: each fault-free recording looped ``--quiet-hours`` at phases 0, 3.3 and 6.7 s against
the window boundaries, no fault: firing alerts per hour, by service and feature.

Prints a row per scenario and a summary; ``--json`` writes everything; plots go to
``bench/out/faults/NAME.png`` (bench/fault_plot.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

from bench.fault_scenario import (
    FAULTS,
    Cache,
    Label,
    S,
    default_config,
    labels,
    quiet_batches,
    run,
    system_of,
)
from pipeline.config_file import load as load_config
from pipeline.model import AlertEvent

OUT = Path(__file__).resolve().parent / "out" / "faults"
HORIZON = 60 * S
PHASES_S = (0.0, 3.3, 6.7)
QUIET_BASELINES = ("onlineboutique-normal.otlp.jsonl", "trainticket-normal.otlp.jsonl")


# ------------------------------------------------------------------------------ scoring


def is_incident(item) -> bool:
    to_json = getattr(item, "to_json", None)
    return to_json is not None and not isinstance(item, AlertEvent) and to_json().get("type") == "incident"


def events_of(items: list) -> list[dict]:
    """Alerts and incidents (duck-typed: ``to_json()["type"] == "incident"``) as JSON, in output order."""
    return [x.to_json() for x in items if isinstance(x, AlertEvent) or is_incident(x)]


def ranking_services(alert: dict) -> list[str]:
    """Services an alert's ranking names: operations are the alert's own service's, a
    ``downstream_service`` entry names a callee."""
    out = []
    for entry in alert.get("ranking", ()):
        out.append(entry["downstream_service"] if "downstream_service" in entry else alert["service"])
    return out


def root_cause_services(incident: dict) -> list[str]:
    return [rc["service"] for rc in incident.get("root_causes", ())]


def names(event: dict, service: str) -> bool:
    """Does this event name ``service`` the way "detected" counts?"""
    if event["type"] == "incident":
        return service in event.get("services", ()) or service in root_cause_services(event)
    if event["state"] == "firing" and event["service"] == service:
        return True
    return service in ranking_services(event)


def in_horizon(events: list[dict], inject_ns: int, horizon_ns: int = HORIZON) -> list[dict]:
    return [e for e in events if inject_ns <= e["time"] <= inject_ns + horizon_ns]


def first_naming(events: list[dict], service: str, inject_ns: int, horizon_ns: int = HORIZON) -> dict | None:
    """The first event in [t, t + horizon] naming ``service`` (earliest window, then output order)."""
    hits = [e for e in in_horizon(events, inject_ns, horizon_ns) if names(e, service)]
    return min(hits, key=lambda e: e["time"]) if hits else None


def detection(events: list[dict], service: str, inject_ns: int, horizon_ns: int = HORIZON) -> int | None:
    """Delay (ns) from injection to the first event naming ``service``, None when none does."""
    hit = first_naming(events, service, inject_ns, horizon_ns)
    return None if hit is None else hit["time"] - inject_ns


def how(event: dict | None, service: str) -> str:
    """What named the service first, in a few words."""
    if event is None:
        return ""
    if event["type"] == "incident":
        return f"incident {event['state']}"
    if event["service"] == service and event["state"] == "firing":
        return f"alert {event['feature']}"
    return f"ranking of {event['service']} {event['feature']}"


def first_named(events: list[dict], inject_ns: int, horizon_ns: int = HORIZON, n: int = 3) -> list[str]:
    """The first ``n`` distinct services named after injection: incident root causes in event
    order, then firing alerts in time order with the services their rankings name."""
    window = in_horizon(events, inject_ns, horizon_ns)
    ordered = [s for e in window if e["type"] == "incident" for s in root_cause_services(e)]
    firing = sorted((e for e in window if e["type"] == "alert" and e["state"] == "firing"), key=lambda e: e["time"])
    for e in firing:
        ordered.append(e["service"])
        ordered.extend(ranking_services(e))
    return list(dict.fromkeys(ordered))[:n]


def early(events: list[dict], inject_ns: int) -> list[dict]:
    """Firing alerts before the injection."""
    return [e for e in events if e["type"] == "alert" and e["state"] == "firing" and e["time"] < inject_ns]


def score(label: Label, events: list[dict]) -> dict:
    hit = first_naming(events, label.service, label.inject_ns)
    delay = None if hit is None else hit["time"] - label.inject_ns
    named = first_named(events, label.inject_ns)
    before = early(events, label.inject_ns)
    return {
        "detected": delay is not None,
        "delay_s": None if delay is None else delay / S,
        "detected_by": how(hit, label.service),
        "root_cause_at_3": label.service in named,
        "first_named": named,
        "early": len(before),
        "early_alerts": [
            {
                "service": e["service"],
                "operation": e.get("operation", ""),
                "feature": e["feature"],
                "t_s": (e["time"] - label.inject_ns) / S,
            }  # fmt: skip
            for e in before
        ],
    }


def scores_without_incidents(label: Label, events: list[dict]) -> dict:
    return score(label, [e for e in events if e["type"] != "incident"])


# ------------------------------------------------------------------------------ runs


def run_scenario(cache: Cache, label: Label, cfg, plot: bool) -> dict:
    t0 = time.perf_counter()
    sc = cache.scenario(label)
    built = time.perf_counter() - t0
    got, flow_s = run(sc.batches, cfg)
    events = events_of(got)
    row = {
        "name": label.name, "type": label.type, "service": label.service, "inject_unix_s": label.inject_unix_s,
        **score(label, events),
        "alerts_only": {k: v for k, v in scores_without_incidents(label, events).items() if k != "early_alerts"},
        "incidents": sum(1 for e in events if e["type"] == "incident"),
        "spans": sc.spans,
        "fault_first_s": (sc.fault_first_ns - label.inject_ns) / S,
        "loops_last_s": (sc.loops_last_ns - label.inject_ns) / S,
        "build_s": built, "flow_s": flow_s,
        "events_after_injection": [e for e in in_horizon(events, label.inject_ns) if e.get("state") != "resolved"],
    }  # fmt: skip
    if plot:
        from bench.fault_plot import plot_scenario

        t1 = time.perf_counter()
        plot_scenario(OUT / f"{label.name}.png", label, sc, got)
        row["plot_s"] = time.perf_counter() - t1
    return row


def run_quiet(cache: Cache, baseline: str, hours: float, phase_s: float, cfg) -> dict:
    batches, covered = quiet_batches(cache.baseline(baseline), hours, int(round(phase_s * S)))
    got, flow_s = run(batches, cfg)
    firing = [x for x in got if isinstance(x, AlertEvent) and x.state == "firing"]
    by = Counter(f"{a.service} {a.feature}" for a in firing)
    return {
        "recording": baseline.split(".")[0], "phase_s": phase_s, "hours": covered, "firing": len(firing),
        "per_hour": len(firing) / covered, "by_service_feature": dict(by.most_common()), "flow_s": flow_s,
    }  # fmt: skip


# ------------------------------------------------------------------------------ report


def yn(x: bool) -> str:
    return "y" if x else "n"


def print_table(rows: list[dict]) -> None:
    head = (
        "scenario",
        "type",
        "faulty service",
        "detected",
        "detected by",
        "rc@3",
        "first 3 named",
        "early",
        "spans",
        "s",
    )
    fmt = "{:<38} {:<15} {:<22} {:>8}  {:<39} {:>4}  {:<54} {:>5} {:>7} {:>5}"
    print(fmt.format(*head))
    for r in rows:
        det = f"y {r['delay_s']:3.0f}s" if r["detected"] else "n"
        cells = (r["name"], r["type"], r["service"], det, r["detected_by"] or "-", yn(r["root_cause_at_3"]),
                 ", ".join(r["first_named"]) or "-", f"y {r['early']}" if r["early"] else "n", r["spans"],
                 f"{r['build_s'] + r['flow_s']:.1f}")  # fmt: skip
        print(fmt.format(*cells))


def summary(rows: list[dict], quiet: list[dict]) -> list[str]:
    n = len(rows)
    det = sum(r["detected"] for r in rows)
    rc = sum(r["root_cause_at_3"] for r in rows)
    ear = sum(1 for r in rows if r["early"])
    a_det = sum(r["alerts_only"]["detected"] for r in rows)
    a_rc = sum(r["alerts_only"]["root_cause_at_3"] for r in rows)
    lines = [
        f"detected {det}/{n}, root cause @3 {rc}/{n}, early alerts in {ear} of {n} scenarios"
        f" (alerts alone, incidents left out: detected {a_det}/{n}, root cause @3 {a_rc}/{n})"
    ]
    if quiet:
        lines.append("quiet firing alerts/h: " + ", ".join(
            f"{q['recording']} @{q['phase_s']:g}s {q['per_hour']:.1f}" for q in quiet))  # fmt: skip
    return lines


def print_details(rows: list[dict], quiet: list[dict]) -> None:
    ear = Counter()
    for r in rows:
        for e in r["early_alerts"]:
            ear[(e["service"], e["feature"])] += 1
    if ear:
        print("\nearly firing alerts (all scenarios), by service and feature:")
        for (service, feature), n in ear.most_common():
            print(f"  {n:>4}  {service} {feature}")
    for q in quiet:
        if q["firing"]:
            top = ", ".join(f"{k} ({v})" for k, v in list(q["by_service_feature"].items())[:6])
            print(f"quiet {q['recording']} @{q['phase_s']:g}s ({q['hours']:.2f} h): {q['firing']} firing: {top}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these scenarios only")
    ap.add_argument("--config", help="a telepipe config file, used instead of the defaults for every run")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--quiet-hours", type=float, default=1.0)
    ap.add_argument("--no-quiet", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--phase", type=float, default=0.0,
                    help="move every scenario (loops, fault recording, metrics, injection time) this many seconds "
                         "later: its phase against the window boundaries")
    ap.add_argument("--faults", default=str(FAULTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cache = Cache(Path(args.faults))
    chosen = [dataclasses.replace(lab, phase_ns=int(round(args.phase * S))) for lab in labels(Path(args.faults))]
    if args.only:
        unknown = set(args.only) - {lab.name for lab in chosen}
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        chosen = [lab for lab in chosen if lab.name in args.only]
    file_cfg = load_config(args.config) if args.config else None

    def cfg_for(name: str):
        return file_cfg or default_config(system_of(name))

    rows = []
    for lab in chosen:
        rows.append(run_scenario(cache, lab, cfg_for(lab.name), not args.no_plot))
    print_table(rows)
    quiet = []
    if not args.no_quiet:
        for baseline in QUIET_BASELINES:
            for phase in PHASES_S:
                quiet.append(run_quiet(cache, baseline, args.quiet_hours, phase, cfg_for(baseline)))
    print_details(rows, quiet)
    print()
    for line in summary(rows, quiet):
        print(line)
    elapsed = time.perf_counter() - t0
    flow = sum(r["flow_s"] for r in rows) + sum(q["flow_s"] for q in quiet)
    build = sum(r["build_s"] for r in rows)
    plots = sum(r.get("plot_s", 0.0) for r in rows)
    print(f"elapsed {elapsed:.0f} s (dataflow {flow:.0f} s, building scenarios {build:.0f} s, plots {plots:.0f} s)")
    if not args.no_plot and rows:
        print(f"plots: {OUT}/NAME.png")
    if args.json:
        config = args.config or "defaults (+ container.cpu.utilization target 0.7 for OnlineBoutique)"
        doc = {
            "scenarios": rows,
            "quiet": quiet,
            "summary": summary(rows, quiet),
            "elapsed_s": elapsed,
            "config": config,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
