"""Evaluation of anomaly detection and scaling on the shared recordings.

    .venv/bin/python -m bench.anomaly_eval [--hours 2] [--detectors band,hst,band_and_hst,band_or_hst]

Detection: the fault-free OnlineBoutique (1 min) and TrainTicket (3 min) recordings
are looped, time-shifted, into ``--hours`` of traffic each and replayed through
the full dataflow at max speed untouched (false firing alerts per hour of
traffic); OnlineBoutique is replayed again with labelled incidents
injected every 6 minutes, each 90 s long and starting on a window boundary:
latency x3 on one operation, 25 % errors on one operation, traffic x5 on one
service, traffic x0.2 on one service. An incident is detected when an alert
fires on its operation (latency, errors) or on any operation of its service
(traffic) between its start and two windows after its end; the delay is the
number of windows from its start to the end of the window that fired.

Scaling: a simulated service whose replicas follow telepipe's desired count
one window later (pod start-up) is driven through 5 min at 1x, a 10-minute
ramp to 10x, 10 min at 10x, a 10-minute fall and 10 min at 1x; the harness
reports under- and over-provisioned replica-seconds against the ideal
``ceil(load / target)``, the number of changes, whether any scale-down happened
while the load rose, and how long after the fall began the first scale-down came.

Prints tables and writes ``bench/out/anomaly_eval.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bytewax.testing import TestingSink

from bench.amplify import load, write_native
from pipeline.batch_codec import concat
from pipeline.config import AnomalyConfig, Config, ScalingConfig
from pipeline.flow import Outputs
from pipeline.model import AlertEvent, AnomalyUpdate, ServiceWindow, SpanBatch
from pipeline.scaling import ServiceScaler
from telepipe import daemon

RECORDINGS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "recordings"
OUT = Path(__file__).resolve().parent / "out"
S = 1_000_000_000
WINDOW = 10 * S

# Operations with enough traffic to judge latency and errors in a 10 s window (>= 7 calls/s).
TARGET_OPS = [
    ("productcatalogservice", "hipstershop.ProductCatalogService/GetProduct"),
    ("currencyservice", "grpc.hipstershop.CurrencyService/Convert"),
    ("frontend", "hipstershop.Frontend/Recv."),
    ("cartservice", "hipstershop.CartService/GetCart"),
]
TARGET_SERVICES = ["productcatalogservice", "currencyservice", "frontend", "cartservice"]


@dataclass(frozen=True)
class Incident:
    kind: str  # latency, errors, surge, drop
    service: str
    operation: str | None  # None: the whole service
    start: int  # ns, on a window boundary
    end: int


# ------------------------------------------------------------------------------ traffic


def looped(batches: list, hours: float) -> tuple[list, int, int]:
    """Back-to-back time-shifted copies covering ``hours``; returns (batches, first ns, last ns)."""
    ends = np.concatenate([b.end_ns for b in batches if isinstance(b, SpanBatch) and len(b)])
    first, last = int(ends.min()), int(ends.max())
    gap = int(np.median(np.diff(np.sort(ends))))
    period = last - first + gap
    copies = math.ceil(hours * 3600 * S / period)
    out = []
    for k in range(copies):
        for b in batches:
            if isinstance(b, SpanBatch):
                out.append(dataclasses.replace(b, end_ns=b.end_ns + k * period))
    return out, first, first + copies * period


def schedule(first_ns: int, last_ns: int, every_s: int = 360, duration_s: int = 90) -> list[Incident]:
    incidents = []
    start = (first_ns // WINDOW + 1) * WINDOW + 15 * 60 * S  # after 15 min of warm-up
    kinds = ["latency", "errors", "surge", "drop"]
    i = 0
    while start + duration_s * S < last_ns - 5 * 60 * S:
        kind = kinds[i % 4]
        n = i // 4
        if kind in ("latency", "errors"):
            service, op = TARGET_OPS[n % len(TARGET_OPS)]
        else:
            service, op = TARGET_SERVICES[n % len(TARGET_SERVICES)], None
        incidents.append(Incident(kind, service, op, start, start + duration_s * S))
        start += every_s * S
        i += 1
    return incidents


def _rows(b: SpanBatch, mask: np.ndarray) -> SpanBatch:
    cols = {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}
    for name, value in cols.items():
        if isinstance(value, np.ndarray):
            cols[name] = value[mask]
    return SpanBatch(**cols)


def inject(batches: list[SpanBatch], incidents: list[Incident], seed: int = 7) -> list[SpanBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for b in batches:
        t0, t1 = int(b.end_ns.min()), int(b.end_ns.max())
        for inc in incidents:
            if t1 < inc.start or t0 >= inc.end or inc.service not in b.services:
                continue
            mask = (b.service_idx == b.services.index(inc.service)) & (b.end_ns >= inc.start) & (b.end_ns < inc.end)
            if inc.operation is not None:
                if inc.operation not in b.operations:
                    continue
                mask &= b.op_idx == b.operations.index(inc.operation)
            if not mask.any():
                continue
            if inc.kind == "latency":
                b = dataclasses.replace(b, duration_ns=np.where(mask, b.duration_ns * 3, b.duration_ns))
            elif inc.kind == "errors":
                hit = mask & (rng.random(len(b)) < 0.25)
                b = dataclasses.replace(b, status=np.where(hit, 2, b.status).astype(np.int8))
            elif inc.kind == "surge":
                extra = _rows(b, mask)
                b = concat([b, extra, extra, extra, extra])
            elif inc.kind == "drop":
                b = _rows(b, ~mask | (rng.random(len(b)) < 0.2))
        out.append(b)
    return out


# ------------------------------------------------------------------------------ runs


def run(batches: list, cfg: Config) -> tuple[list, float]:
    got: list = []
    with tempfile.TemporaryDirectory() as tmp:
        write_native(batches, Path(tmp) / "rec")
        t0 = time.perf_counter()
        daemon.replay(cfg, [str(Path(tmp) / "rec")], extra_outputs=Outputs(result_sinks=[TestingSink(got)]))
        seconds = time.perf_counter() - t0
    return got, seconds


def evaluate(incidents: list[Incident], alerts: list[AlertEvent]) -> list[tuple[Incident, int | None]]:
    firing = [a for a in alerts if a.state == "firing"]
    out = []
    for inc in incidents:
        hits = [
            a for a in firing
            if a.service == inc.service and (inc.operation is None or a.operation == inc.operation)
            and inc.start - WINDOW <= a.time <= inc.end + 2 * WINDOW
        ]  # fmt: skip
        if hits:
            first = min(a.time for a in hits)
            out.append((inc, max(1, math.ceil((first + WINDOW - inc.start) / WINDOW))))
        else:
            out.append((inc, None))
    return out


def unexplained(incidents: list[Incident], alerts: list[AlertEvent]) -> int:
    def explained(a: AlertEvent) -> bool:
        return any(
            a.service == inc.service and inc.start - WINDOW <= a.time <= inc.end + 30 * WINDOW for inc in incidents
        )

    return sum(1 for a in alerts if a.state == "firing" and not explained(a))


# ------------------------------------------------------------------------------ scaling


def ramp_load(t_s: float, base: float) -> float:
    """5 min at 1x, 10 min up to 10x, 10 min at 10x, 10 min down, 10 min at 1x."""
    if t_s < 300:
        return base
    if t_s < 900:
        return base * (1 + 9 * (t_s - 300) / 600)
    if t_s < 1500:
        return base * 10
    if t_s < 2100:
        return base * (10 - 9 * (t_s - 1500) / 600)
    return base


def simulate_scaling(cfg: ScalingConfig, base_rps: float = 100.0, total_s: int = 2700) -> dict:
    length = 10.0
    scaler = ServiceScaler(cfg, "sim", length)
    actual = max(cfg.min_replicas, math.ceil(base_rps / cfg.target_rps_per_replica))
    under = over = ideal_total = 0.0
    changes, down_while_rising, first_down_after_fall = 0, 0, None
    trace = []
    last_desired = None
    for i in range(total_s // int(length)):
        t = i * length
        load = ramp_load(t + length / 2, base_rps)
        calls = int(round(load * length))
        sw = ServiceWindow(
            service="sim", window_start=int(t * S), window_end=int((t + length) * S), results=(),
            instances=tuple(f"pod-{k}" for k in range(actual)), logs=0, error_logs=0,
            server_calls=calls, server_errors=0, server_p95=0.1,
        )  # fmt: skip
        upd, _ = scaler.on_window(sw, alert_firing=False)
        ideal = math.ceil(load / cfg.target_rps_per_replica - 1e-9)
        under += max(0, ideal - actual) * length
        over += max(0, actual - ideal) * length
        ideal_total += ideal * length
        if last_desired is not None and upd.desired != last_desired:
            changes += 1
            if upd.desired < last_desired:
                if t < 1500:
                    down_while_rising += 1
                elif first_down_after_fall is None:
                    first_down_after_fall = t + length - 1500
        last_desired = upd.desired
        trace.append((t, load, ideal, actual, upd.desired))
        actual = upd.desired  # the cluster follows one window later
    return {
        "under_pct": 100 * under / ideal_total,
        "over_pct": 100 * over / ideal_total,
        "under_rs": under,
        "over_rs": over,
        "ideal_rs": ideal_total,
        "changes": changes,
        "down_while_rising": down_while_rising,
        "first_down_after_fall_s": first_down_after_fall,
        "trace": trace,
    }


# ------------------------------------------------------------------------------ report


def plot(path: Path, updates: list[AnomalyUpdate], alerts: list[AlertEvent], incidents, scaling_trace, key) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    service, op = key
    ups = [u for u in updates if u.service == service and u.operation == op and u.span_kind == 2]
    t0 = ups[0].time if ups else 0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8))
    xs, obs, exp_, lo, hi = [], [], [], [], []
    for u in ups:
        j = next(j for j in u.judgements if j.feature == "latency_p50")
        xs.append((u.time - t0) / 60e9)
        obs.append(math.exp(j.observed))
        exp_.append(math.exp(j.expected) if not math.isnan(j.expected) else math.nan)
        lo.append(math.exp(j.lower) if not math.isnan(j.lower) else math.nan)
        hi.append(math.exp(j.upper) if not math.isnan(j.upper) else math.nan)
    ax1.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, label="band (expected +- k sigma)")
    ax1.plot(xs, exp_, color="tab:blue", lw=1, label="expected")
    ax1.plot(xs, obs, color="black", lw=0.8, label="observed p50")
    for inc in incidents:
        if inc.service == service and inc.operation in (op, None):
            ax1.axvspan((inc.start - t0) / 60e9, (inc.end - t0) / 60e9, color="tab:orange", alpha=0.3)
    fired = [(a.time - t0) / 60e9 for a in alerts if a.state == "firing" and a.service == service and a.operation == op]
    ax1.plot(fired, [max(obs) * 1.05] * len(fired), "rv", label="firing")
    ax1.set_yscale("log")
    ax1.set_xlabel("minutes")
    ax1.set_ylabel("seconds")
    ax1.set_title(f"{service} {op}: p50 with its band; incidents on it or its service shaded")
    ax1.legend(loc="upper right", fontsize=8)
    ts = [x[0] / 60 for x in scaling_trace]
    ax2.plot(ts, [x[2] for x in scaling_trace], label="ideal replicas", color="tab:green")
    ax2.step(ts, [x[3] for x in scaling_trace], where="post", label="actual (follows desired one window later)")
    ax2.step(ts, [x[4] for x in scaling_trace], where="post", label="desired", ls="--")
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("replicas")
    ax2.set_title("scaling: 1x -> 10x ramp over 10 min, hold, fall")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--detectors", default="band,hst,band_and_hst,band_or_hst")
    ap.add_argument("--plot", default=str(OUT / "anomaly_eval.png"))
    args = ap.parse_args()

    base = [b for b in load([RECORDINGS / "onlineboutique-normal.otlp.jsonl"]) if isinstance(b, SpanBatch)]
    clean, first, last = looped(base, args.hours)
    incidents = schedule(first, last)
    faulty = inject(clean, incidents)
    spans = sum(len(b) for b in clean)
    hours = (last - first) / 3600e9
    tt_base = [b for b in load([RECORDINGS / "trainticket-normal.otlp.jsonl"]) if isinstance(b, SpanBatch)]
    tt, tt_first, tt_last = looped(tt_base, args.hours)
    untouched = clean + tt  # different services: their windows and detectors do not mix
    clean_hours = hours + (tt_last - tt_first) / 3600e9
    print(f"traffic: {spans:,} spans, {hours:.2f} h looped from onlineboutique-normal (with {len(incidents)} "
          f"incidents injected in the second run); untouched runs add {sum(len(b) for b in tt):,} spans, "
          f"{(tt_last - tt_first) / 3600e9:.2f} h from trainticket-normal")  # fmt: skip

    rows = []
    keep = None
    per_incident = []
    for detector in args.detectors.split(","):
        cfg = Config(anomaly=AnomalyConfig(detector=detector))
        got_clean, _ = run(untouched, cfg)
        false_firing = sum(1 for x in got_clean if isinstance(x, AlertEvent) and x.state == "firing")
        got, secs = run(faulty, cfg)
        alerts = [x for x in got if isinstance(x, AlertEvent)]
        results = evaluate(incidents, alerts)
        delays = [d for _, d in results if d is not None]
        by_kind = {}
        for inc, d in results:
            hit, n = by_kind.get(inc.kind, (0, 0))
            by_kind[inc.kind] = (hit + (d is not None), n + 1)
        if detector == "band":
            per_incident = results
        rows.append((detector, false_firing / clean_hours, len(delays), len(results),
                     statistics.median(delays) if delays else math.nan, by_kind,
                     unexplained(incidents, alerts) / hours, spans / secs))  # fmt: skip
        if detector == "band":
            keep = (got, alerts)

    print()
    print("false firing/h: firing alerts per hour of untouched traffic (both recordings); other firing/h:")
    print("firing alerts not explained by an incident, per hour, in the run with incidents")
    print(f"{'detector':<13} {'false firing/h':>14} {'detected':>9} {'median delay':>13} "
          f"{'latency':>8} {'errors':>7} {'surge':>6} {'drop':>5} {'other firing/h':>15} {'spans/s':>9}")  # fmt: skip
    for det, fph, hit, n, med, kinds, other, rate in rows:
        k = {key: f"{a}/{b}" for key, (a, b) in kinds.items()}
        print(f"{det:<13} {fph:>14.2f} {hit:>4}/{n:<4} {med:>13.1f} {k.get('latency', ''):>8} "
              f"{k.get('errors', ''):>7} {k.get('surge', ''):>6} {k.get('drop', ''):>5} {other:>15.2f} {rate:>9,.0f}")  # fmt: skip

    if per_incident:
        print("\nper incident (detector band):")
        print(f"  {'kind':<8} {'service':<22} {'operation':<46} {'start (min)':>11} {'detected':>8} {'delay':>5}")
        for inc, d in per_incident:
            print(f"  {inc.kind:<8} {inc.service:<22} {inc.operation or '(all)':<46} "
                  f"{(inc.start - first) / 60e9:>11.1f} {'yes' if d else 'NO':>8} {d if d else '':>5}")  # fmt: skip

    sim = simulate_scaling(ScalingConfig())
    print()
    print("scaling, 1x -> 10x ramp over 10 min (target 100 calls/s per replica, base 100 calls/s):")
    print(f"  under-provisioned replica-seconds: {sim['under_rs']:.0f} of {sim['ideal_rs']:.0f} ideal ({sim['under_pct']:.1f} %)")
    print(f"  over-provisioned replica-seconds:  {sim['over_rs']:.0f} ({sim['over_pct']:.1f} %)")
    print(f"  changes: {sim['changes']}; scale-downs while the load rose or held: {sim['down_while_rising']}; "
          f"first scale-down {sim['first_down_after_fall_s']} s after the fall began")  # fmt: skip

    if keep is not None and args.plot:
        got, alerts = keep
        updates = [x for x in got if isinstance(x, AnomalyUpdate)]
        plot(Path(args.plot), updates, alerts, incidents, sim["trace"], TARGET_OPS[0])
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
