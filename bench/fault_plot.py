"""The per-scenario plot of bench/fault_eval.py: the faulty service around the injection.

Panels, time in seconds from the injection: its alerts (a row per feature; pending hollow,
firing filled, resolved a cross), its SERVER latency (p50 and p95 of its SERVER operations,
weighted by calls), its SERVER call rate and error rate, and its pod CPU
(``metric:container.cpu.utilization`` as judged, with the band) when the scenario has metrics.
A solid line marks the injection, a dashed one where the fault recording begins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from bench.fault_scenario import CPU, WINDOW, Label, S, Scenario
from pipeline.model import AlertEvent, AnomalyUpdate, WindowResult

SERVER = 2
HORIZON_S = 60  # the scored span after the injection
BEFORE_S = 240  # shown before the injection (or before the fault recording, when it starts later)


def _server_series(label: Label, results: list[WindowResult], t_from: int) -> dict[str, list[float]]:
    mine = [r for r in results if r.service == label.service and r.window_start >= t_from]
    kinds = {r.span_kind for r in mine}
    if SERVER in kinds:
        mine = [r for r in mine if r.span_kind == SERVER]
    per: dict[int, list[WindowResult]] = defaultdict(list)
    for r in mine:
        per[r.window_start].append(r)
    out: dict[str, list[float]] = {k: [] for k in ("t", "p50", "p95", "rate", "errors")}
    starts = range(min(per), max(per) + WINDOW, WINDOW) if per else ()
    for start in starts:  # a window without spans: no call, no latency (a gap in the lines)
        rs = per.get(start, [])
        calls = sum(r.count for r in rs)
        out["t"].append((start + WINDOW / 2 - label.inject_ns) / S)
        out["rate"].append(calls / (WINDOW / S))
        out["errors"].append(sum(r.errors for r in rs) / calls if calls else math.nan)
        for q in ("p50", "p95"):
            out[q].append(sum(getattr(r, q) * r.count for r in rs) / calls if calls else math.nan)
    out["server"] = [float(SERVER in kinds)]
    return out


def _cpu_series(label: Label, updates: list[AnomalyUpdate], t_from: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("t", "observed", "lower", "upper")}
    feature = f"metric:{CPU}"
    for u in updates:
        if u.service != label.service or u.operation or u.time < t_from:
            continue
        for j in u.judgements:
            if j.feature == feature:
                out["t"].append((u.time + WINDOW / 2 - label.inject_ns) / S)
                out["observed"].append(j.observed)
                out["lower"].append(j.lower if j.judged else math.nan)
                out["upper"].append(j.upper if j.judged else math.nan)
    return out


def plot_scenario(path: Path, label: Label, sc: Scenario, items: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    t_from = min(label.inject_ns, sc.fault_first_ns) - BEFORE_S * S
    results = [x for x in items if isinstance(x, WindowResult)]
    updates = [x for x in items if isinstance(x, AnomalyUpdate)]
    alerts = [x for x in items if isinstance(x, AlertEvent) and x.service == label.service and x.time >= t_from]
    server = _server_series(label, results, t_from)
    cpu = _cpu_series(label, updates, t_from)
    panels = 4 if cpu["t"] else 3
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2.3 * panels + 1.2), sharex=True,
                             gridspec_kw={"height_ratios": [1.1] + [1.6] * (panels - 1)})  # fmt: skip
    ax_alerts, ax_lat, ax_rate = axes[0], axes[1], axes[2]

    features = sorted({a.feature for a in alerts})
    style = {"pending": dict(marker="o", mfc="none", color="tab:orange"),
             "firing": dict(marker="o", color="tab:red"),
             "resolved": dict(marker="x", color="tab:green")}  # fmt: skip
    for state, st in style.items():
        pts = [((a.time + WINDOW / 2 - label.inject_ns) / S, features.index(a.feature))
               for a in alerts if a.state == state]  # fmt: skip
        if pts:
            ax_alerts.plot([p[0] for p in pts], [p[1] for p in pts], ls="none", ms=6, label=state, **st)
    ax_alerts.set_yticks(range(len(features)), features, fontsize=7)
    ax_alerts.set_ylim(-0.7, max(len(features), 1) - 0.3)
    ax_alerts.set_title(f"{label.name}: {label.service} ({label.type}); alerts on it, per feature", fontsize=10)
    if alerts:
        ax_alerts.legend(loc="upper left", fontsize=7, ncol=3)
    else:
        ax_alerts.text(0.5, 0.5, "no alert on this service", transform=ax_alerts.transAxes, ha="center", fontsize=8)

    kind = "SERVER" if server["server"] and server["server"][0] else "all"
    ax_lat.plot(server["t"], [x * 1e3 for x in server["p50"]], label=f"p50 ({kind} ops, weighted by calls)")
    ax_lat.plot(server["t"], [x * 1e3 for x in server["p95"]], label="p95")
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_lat.yaxis.set_minor_formatter(NullFormatter())
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.legend(loc="upper left", fontsize=7)

    ax_rate.plot(server["t"], server["rate"], color="tab:blue", label=f"calls/s ({kind})")
    ax_rate.set_ylabel("calls/s")
    ax_err = ax_rate.twinx()
    ax_err.plot(server["t"], [x * 100 for x in server["errors"]], color="tab:red", label="errors %")
    ax_err.set_ylabel("errors %")
    ax_err.set_ylim(bottom=0, top=max([5.0] + [x * 100 * 1.1 for x in server["errors"] if not math.isnan(x)]))
    lines = ax_rate.get_lines() + ax_err.get_lines()
    ax_rate.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=7)

    if cpu["t"]:
        ax_cpu = axes[3]
        ax_cpu.fill_between(cpu["t"], cpu["lower"], cpu["upper"], color="tab:blue", alpha=0.2, label="band")
        ax_cpu.plot(cpu["t"], cpu["observed"], color="black", lw=1, label="pod CPU utilization (latest point)")
        ax_cpu.set_ylabel("CPU (0-1)")
        ax_cpu.set_ylim(bottom=0)
        ax_cpu.legend(loc="upper left", fontsize=7)

    for ax in axes:
        ax.axvline(0, color="black", lw=1.2)
        ax.axvline((sc.fault_first_ns - label.inject_ns) / S, color="gray", lw=1, ls="--")
        ax.axvspan(0, HORIZON_S, color="tab:orange", alpha=0.08)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds from injection (solid: injection; dashed: fault recording begins; "
                        "shaded: the 60 s scored)")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
