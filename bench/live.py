"""The live daemon under load: throughput against the ceiling, end-to-end lag, memory with many series.

    .venv/bin/python -m bench.live throughput [--spans 512,64] [--seconds 60] [--processes 1] [--rate 0] [--analytics both] [--json]
    .venv/bin/python -m bench.live lag [--rate 75000] [--seconds 120] [--lateness 5,1] [--json]
    .venv/bin/python -m bench.live memory [--series 10000] [--minutes 10] [--rate 20000] [--json]

Each run starts ``telepipe run`` (``python -m telepipe.cli run``) on free loopback
ports with a fresh data dir and drives it with ``bench.load`` (512-span requests
unless said otherwise, 4 sending threads) in a child process. With one daemon
process the daemon is pinned to CPU 0 and the load generator to CPU 1 (affinity
set before exec, so every thread of every process inherits it).

throughput: for each ``--spans`` value, first the per-span ceiling on this machine
(``bench.ceiling``, 5 s, daemon not running), then the daemon offered as much as
the load generator can send for ``--seconds``. After the load it waits (up to
5 min) until ``telepipe_processed_spans_total`` reaches the acknowledged spans:
processed trails accepted by 15-30 s by design (a window's spans are counted when
it closes, after its end + allowed lateness, or ``idle_timeout_s`` after traffic
stops). Reports acknowledged spans/s, refusals, accepted/processed, whether
acknowledged == processed, the ratio to the ceiling, the dataflow's own pace
(``telepipe_read_spans_total``: spans read from the spool while the load ran, and
how long the rest took to read after it) and the daemon's peak RSS
(its processes summed, sampled every second). With ``--processes N`` > 1 the
daemon runs N processes (one OTLP port, /metrics on the HTTP port + i, counters
summed); nothing is pinned then, so on a 2-core machine the load generator
competes with the daemon for the same cores.

lag: for each ``--lateness`` value (``windows.allowed_lateness_s`` in a config
file), the daemon at a fixed ``--rate`` for ``--seconds``. /metrics is polled
every 100 ms for ``telepipe_closed_window_end_seconds`` (end of the newest window
on /metrics); the wall-clock time ``v`` at which each new end ``E`` first shows
is when window [E - L, E) became visible (L = ``windows.length_s``, 10 s). The
load generator's spans end uniformly spread over the second before they are
sent, so a span that ended at ``e`` in that window waited ``v - e``, with ``e``
uniform over [E - L, E) (1000 evenly spaced points per window; the first two
windows are warm-up, and only windows closed by the watermark while the load
runs count). Reports p50, p99 and max of that lag, ``v - E`` (visible after
the window's end: allowed lateness + processing delay) and pass/fail for
p99 <= L + 2 s. The gauge is the newest end over all services, so this is the
lag of the first service to close a window; the load's requests carry every
service, so their watermarks move together.

    p99 ~ 0.99 L + allowed lateness + processing delay

so the target L + 2 s needs a lateness of about 1 s. The default lateness is
5 s on purpose: OTel SDK batch exporters send spans up to ~5 s after they end
(``OTEL_BSP_SCHEDULE_DELAY``), and a span arriving after its window closed is
counted as late, not merged. The default trades ~4 s of lag for completeness.

memory: the daemon at ``--rate`` for ``--minutes`` with spans covering
``--series`` distinct (service, operation) pairs (``bench.load --series``: 100
operations per service, under ``windows.max_operations_per_service`` = 500;
every pair appears about 20 times per 10 s window at 20k spans/s). RSS every
second, a whole /metrics scrape every 10 s (``telepipe_series``: active series,
one per (service, operation, kind, status), so up to 2 per pair with the load's
~1 % errors; processed spans); one row every 30 s with the RSS min, median and
max over it (a scrape briefly adds its page's chunks: the max shows that, the
median the daemon's state). Reports the peak RSS, the slope of the row medians
over the second half (least squares, MiB/min), and pass/fail for peak RSS
<= 500 MiB and flat (|slope| < 1 MiB/min).

``--json`` prints one JSON object per row instead of the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.ceiling import ceiling
from bench.live_procs import DAEMON_CPU, LOAD_CPU, Daemon, Load, _refused
from bench.soak import _counter
from pipeline.config import WindowsConfig

REQUEST_SPANS = 512  # spans per request in the lag and memory modes
SCRAPE_EVERY_S = 10  # memory mode: a /metrics scrape every 10 s, RSS every second,
ROW_EVERY_S = 30  # one row (RSS min / median / max) every 30 s


# --- throughput ---------------------------------------------------------------------------


def _clean_up(load, daemon, tmp) -> None:
    """Stop the load generator and the daemon (whichever started) and remove the temp dir."""
    if load is not None:
        load.stop()
    if daemon is not None:
        daemon.stop()
    shutil.rmtree(tmp, ignore_errors=True)


# --analytics: the trace analytics off (no database analysis, no dimensions: only the service
# graph's virtual-node keys are read) or on (database analysis and two dimensions)
ANALYTICS = {
    "off": "[db]\nenabled = false\n",
    "on": '[windows]\ndimensions = ["deployment.environment", "http.route"]\n',
}


def throughput(spans: int, seconds: float, processes: int, rate: float = 0.0, analytics: str | None = None) -> dict:
    ceiling_rate = ceiling(spans, seconds=5)  # before the daemon starts: nothing else of ours running
    pin = processes == 1
    tmp = Path(tempfile.mkdtemp(prefix="telepipe-live-"))
    daemon = load = None
    config = None
    if analytics is not None:
        config = tmp / "telepipe.toml"
        config.write_text(ANALYTICS[analytics])
    try:
        daemon = Daemon(tmp, processes=processes, pin=pin, config=config)
        daemon.wait_ready()
        peak = daemon.rss_mib()
        read_before = daemon.metric("telepipe_read_spans_total")
        load = Load(daemon.target, spans, seconds, rate=rate, cpu=LOAD_CPU if pin else None)
        while load.running(wait=1):
            daemon.check()
            peak = max(peak, daemon.rss_mib())
        counts = load.result()
        read_during = daemon.metric("telepipe_read_spans_total") - read_before
        ended = time.monotonic()
        acked = counts.get("acked_spans", 0)
        drained = None
        deadline = ended + 300  # processed trails acknowledged by 15-30 s by design
        while time.monotonic() < deadline:
            daemon.check()
            peak = max(peak, daemon.rss_mib())
            if drained is None and daemon.metric("telepipe_read_spans_total") >= acked:
                drained = time.monotonic() - ended
            if daemon.metric("telepipe_processed_spans_total") >= acked:
                break
            time.sleep(1)
        accepted = daemon.metric("telepipe_accepted_spans_total")
        processed = daemon.metric("telepipe_processed_spans_total")
        dropped = daemon.dropped()
    finally:
        _clean_up(load, daemon, tmp)
    rate = counts["acked_spans_per_s"]
    return {
        "mode": "throughput", "spans_per_request": spans, "processes": processes, "pinned": pin,
        "analytics": analytics or "default",
        "offered_spans_per_s": rate or None,
        "seconds": round(counts["seconds"], 1), "acked_spans": acked, "acked_spans_per_s": round(rate),
        "refused": _refused(counts),
        "failed_spans": counts.get("failed_spans", 0), "rejected_spans": counts.get("rejected_spans", 0),
        "accepted_spans": int(accepted),
        "processed_spans": int(processed), "acked_equals_processed": processed == acked,
        "ceiling_spans_per_s": round(ceiling_rate), "ratio": round(rate / ceiling_rate, 3),
        "peak_rss_mib": round(peak, 1),
        # the dataflow's pace: spans it read from the spool while the load ran, and how long
        # the backlog took to drain after (the spool absorbs what it does not keep up with)
        "read_spans_per_s": round(read_during / counts["seconds"]),
        "backlog_at_end_spans": int(acked - read_during - read_before),
        "drain_s": None if drained is None else round(drained, 1),
        "dropped": dropped,  # by reason, e.g. the service graph's servicegraph_unstored
    }  # fmt: skip


def print_throughput(rows: list[dict]) -> None:
    print(f"{'analytics':>9} {'spans/req':>9} {'procs':>5} {'seconds':>7} {'acked spans':>12} {'acked/s':>9} {'failed':>6} "
          f"{'rejected':>8} {'accepted':>12} {'processed':>12} {'acked==proc':>11} {'ceiling/s':>9} "
          f"{'ratio':>5} {'read/s':>9} {'read ratio':>10} {'drain s':>7} {'peak RSS MiB':>12}  refused requests; dropped")  # fmt: skip
    for r in rows:
        same = "yes" if r["acked_equals_processed"] else "no"
        drain = "-" if r["drain_s"] is None else f"{r['drain_s']:.1f}"
        print(f"{r.get('analytics', 'default'):>9} {r['spans_per_request']:>9} {r['processes']:>5} {r['seconds']:>7.1f} {r['acked_spans']:>12,} "
              f"{r['acked_spans_per_s']:>9,} {r['failed_spans']:>6,} {r['rejected_spans']:>8,} "
              f"{r['accepted_spans']:>12,} {r['processed_spans']:>12,} {same:>11} {r['ceiling_spans_per_s']:>9,} "
              f"{r['ratio']:>5.2f} {r['read_spans_per_s']:>9,} {r['read_spans_per_s'] / r['ceiling_spans_per_s']:>10.2f} "
              f"{drain:>7} {r['peak_rss_mib']:>12.1f}  {r['refused']}; {r['dropped'] or 'none'}")  # fmt: skip
    print()
    print("read/s: spans the dataflow read from the spool while the load ran (it keeps up when read/s ~ acked/s; "
          "what it does not, the spool holds); drain s: after the load, until it had read everything.")
    if any(r["pinned"] for r in rows):
        print(f"1 process: daemon pinned to CPU {DAEMON_CPU}, load generator to CPU {LOAD_CPU}; "
              "ceiling = bench.ceiling on one core, daemon not running.")  # fmt: skip
    if any(not r["pinned"] for r in rows):
        print(f"{max(r['processes'] for r in rows)} processes: nothing pinned; the load generator competes with "
              f"the daemon for the same {os.cpu_count()} cores.")  # fmt: skip


# --- lag ----------------------------------------------------------------------------------


def lag(rate: float, seconds: float, lateness: float) -> dict:
    length = WindowsConfig().length_s
    tmp = Path(tempfile.mkdtemp(prefix="telepipe-live-"))
    config = tmp / "telepipe.toml"
    config.write_text(f"[windows]\nallowed_lateness_s = {float(lateness)!r}\n")
    daemon = load = None
    visible: list[tuple[float, float]] = []  # (window end E, wall-clock time v it first showed)
    try:
        daemon = Daemon(tmp, config=config)
        daemon.wait_ready()
        url = f"http://127.0.0.1:{daemon.http_ports[0]}/metrics"
        load = Load(daemon.target, REQUEST_SPANS, seconds, rate=rate, cpu=LOAD_CPU)
        newest = 0.0
        # Only while the load runs: later windows close by idle timeout, not by the watermark.
        while load.running():
            daemon.check()
            try:
                end = _counter(httpx.get(url, timeout=5).text, "telepipe_closed_window_end_seconds")
            except httpx.HTTPError:
                end = 0.0
            now = time.time()
            if end > newest:
                if newest:  # windows skipped between two polls became visible at the same time
                    for skipped in np.arange(newest + length, end - length / 2, length):
                        visible.append((float(skipped), now))
                visible.append((end, now))
                newest = end
            time.sleep(0.1)
        counts = load.result()
        late = daemon.metric("telepipe_late_spans_total")
    finally:
        _clean_up(load, daemon, tmp)
    measured = visible[2:]  # the first two windows are warm-up (the first one is partial)
    offsets = (np.arange(1000) + 0.5) / 1000 * length  # span end times, evenly spread over a window
    if measured:
        lags = np.concatenate([v - (end - length + offsets) for end, v in measured])
        p50, p99, top = (float(x) for x in np.percentile(lags, [50, 99, 100]))
        after_end = float(np.mean([v - end for end, v in measured]))
    else:
        p50 = p99 = top = after_end = float("nan")
    target = length + 2.0
    return {
        "mode": "lag", "allowed_lateness_s": lateness, "window_s": length, "offered_spans_per_s": rate,
        "acked_spans_per_s": round(counts["acked_spans_per_s"]), "refused": _refused(counts), "windows": len(measured),
        "p50_s": round(p50, 2), "p99_s": round(p99, 2), "max_s": round(top, 2),
        "visible_after_end_s": round(after_end, 2), "processing_delay_s": round(after_end - lateness, 2),
        "target_p99_s": target, "pass": bool(p99 <= target), "late_spans": int(late),
    }  # fmt: skip


def print_lag(rows: list[dict]) -> None:
    print(f"{'lateness s':>10} {'acked/s':>9} {'windows':>7} {'p50 s':>6} {'p99 s':>6} {'max s':>6} "
          f"{'after end s':>11} {'processing s':>12} {'target p99':>10} {'pass':>4} {'late spans':>10}  "
          "refused")  # fmt: skip
    for r in rows:
        target = f"<= {r['target_p99_s']:g} s"
        print(f"{r['allowed_lateness_s']:>10g} {r['acked_spans_per_s']:>9,} {r['windows']:>7} {r['p50_s']:>6.2f} "
              f"{r['p99_s']:>6.2f} {r['max_s']:>6.2f} {r['visible_after_end_s']:>11.2f} "
              f"{r['processing_delay_s']:>12.2f} {target:>10} {'yes' if r['pass'] else 'no':>4} "
              f"{r['late_spans']:>10,}  {r['refused']}")  # fmt: skip
    print()
    print("lag: from a span's end to its window showing on /metrics. after end: from the window's end to then "
          "(allowed lateness + processing). p99 ~ 0.99 x window + after end.")  # fmt: skip


# --- memory -------------------------------------------------------------------------------


def memory(series: int, minutes: float, rate: float) -> tuple[list[dict], dict]:
    tmp = Path(tempfile.mkdtemp(prefix="telepipe-live-"))
    daemon = load = None
    samples: list[dict] = []
    counts: dict = {}
    status = "running"
    rss_window: list[float] = []  # RSS read every second since the last row
    last = {"series": None, "processed_spans": None}
    processed = 0
    try:
        daemon = Daemon(tmp)
        daemon.wait_ready()
        load = Load(daemon.target, REQUEST_SPANS, minutes * 60, rate=rate, series=series, cpu=LOAD_CPU)
        t0 = time.monotonic()
        tick = 0
        while True:
            if daemon.popen.poll() is not None:  # a result too: report the samples up to the crash
                status = daemon.status()
                print(f"daemon {status} after {time.monotonic() - t0:.0f} s; its log ends:\n{daemon.log_tail()}",
                      file=sys.stderr)  # fmt: skip
                break
            rss_window.append(daemon.rss_mib())
            if tick % SCRAPE_EVERY_S == 0:  # a scrape, as Prometheus would (the whole page)
                try:
                    text = daemon.metrics_texts()[0]
                    last = {"series": int(_counter(text, "telepipe_series")),
                            "processed_spans": int(_counter(text, "telepipe_processed_spans_total"))}  # fmt: skip
                except httpx.HTTPError:
                    pass  # shown as "-"
            if tick % ROW_EVERY_S == ROW_EVERY_S - 1:
                samples.append(_memory_row(time.monotonic() - t0, rss_window, last))
                rss_window = []
            tick += 1
            if not load.running(wait=max(0.0, t0 + tick - time.monotonic())):
                counts = load.result()
                break
        if status == "running":  # every acknowledged span counted in a closed window (15-30 s by design)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and processed < counts.get("acked_spans", 0):
                daemon.check()
                processed = int(daemon.metric("telepipe_processed_spans_total"))
                time.sleep(1)
    finally:
        _clean_up(load, daemon, tmp)
    if rss_window:
        samples.append(_memory_row(time.monotonic() - t0, rss_window, last))
    if not samples:
        raise RuntimeError(f"daemon {status} before the first sample")
    t = np.array([s["t_s"] for s in samples])
    med = np.array([s["rss_median_mib"] for s in samples])
    half = len(samples) // 2
    slope = float(np.polyfit(t[half:] / 60, med[half:], 1)[0]) if len(samples) - half > 2 else float("nan")
    alive = status == "running"
    peak = max(s["rss_max_mib"] for s in samples)
    summary = {
        "mode": "memory_summary", "series_pairs": series, "minutes": minutes, "offered_spans_per_s": rate,
        "daemon": status, "acked_spans": counts.get("acked_spans"),  # None: the load was stopped early
        "acked_spans_per_s": round(counts.get("acked_spans_per_s", 0)), "refused": _refused(counts),
        "processed_spans": processed, "acked_equals_processed": processed == counts.get("acked_spans"),
        "max_series": max((s["series"] or 0) for s in samples),
        "rss_start_mib": samples[0]["rss_median_mib"], "rss_end_mib": samples[-1]["rss_median_mib"],
        "rss_max_mib": peak, "slope_mib_per_min": round(slope, 2), "pass_max_500_mib": alive and peak <= 500,
        "pass_flat": alive and bool(abs(slope) < 1.0),
    }  # fmt: skip
    return samples, summary


def _memory_row(t_s: float, rss: list[float], last: dict) -> dict:
    return {
        "mode": "memory", "t_s": round(t_s, 1), "rss_min_mib": round(min(rss), 1),
        "rss_median_mib": round(float(np.median(rss)), 1), "rss_max_mib": round(max(rss), 1), **last,
    }  # fmt: skip


def print_memory(samples: list[dict], s: dict) -> None:
    print(f"{'t (s)':>6} {'RSS min':>8} {'median':>7} {'max':>7} {'series':>7} {'processed':>12}")
    for r in samples:
        series = "-" if r["series"] is None else f"{r['series']:,}"
        processed = "-" if r["processed_spans"] is None else f"{r['processed_spans']:,}"
        print(f"{r['t_s']:>6.0f} {r['rss_min_mib']:>8.1f} {r['rss_median_mib']:>7.1f} {r['rss_max_mib']:>7.1f} "
              f"{series:>7} {processed:>12}")  # fmt: skip
    print()
    if s["daemon"] != "running":
        print(f"DAEMON {s['daemon'].upper()} during the load: the samples stop there.")
    acked = "-" if s["acked_spans"] is None else f"{s['acked_spans']:,} ({s['acked_spans_per_s']:,}/s)"
    print(f"{s['series_pairs']:,} (service, operation) pairs offered at {s['offered_spans_per_s']:,.0f} spans/s for "
          f"{s['minutes']:g} min: acknowledged {acked}, refused {s['refused']}; "
          f"telepipe_series max {s['max_series']:,}")  # fmt: skip
    print(f"processed after the load (telepipe_processed_spans_total): {s['processed_spans']:,}, "
          f"= acknowledged: {'yes' if s['acked_equals_processed'] else 'NO'}")  # fmt: skip
    print(f"RSS median of the first row {s['rss_start_mib']:.1f} MiB, of the last {s['rss_end_mib']:.1f} MiB, "
          f"max {s['rss_max_mib']:.1f} MiB; slope of the row medians over the second half "
          f"{s['slope_mib_per_min']:+.2f} MiB/min")  # fmt: skip
    print(f"max RSS <= 500 MiB: {'pass' if s['pass_max_500_mib'] else 'FAIL'}; "
          f"flat (|slope| < 1 MiB/min): {'pass' if s['pass_flat'] else 'FAIL'}")  # fmt: skip


# --- command line -------------------------------------------------------------------------


def _numbers(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput", help="max acknowledged spans/s against the ceiling")
    tp.add_argument("--spans", default="512,64", help="spans per request, comma-separated")
    tp.add_argument("--seconds", type=float, default=60.0, help="load duration per row")
    tp.add_argument("--processes", type=int, default=1, help="daemon processes (telepipe run --processes)")
    tp.add_argument("--rate", type=float, default=0.0,
                    help="spans/s offered (0: as many as the load generator sends); a rate the dataflow keeps up "
                         "with shows the sustained end-to-end figure")  # fmt: skip
    tp.add_argument("--analytics", choices=["default", "off", "on", "both"], default="default",
                    help="trace analytics: off (no database analysis, no dimensions), on (database analysis and "
                         "two dimensions), both (off, then on, for each --spans)")  # fmt: skip
    lg = sub.add_parser("lag", help="span end to window visible on /metrics")
    lg.add_argument("--rate", type=float, default=75_000.0, help="spans/s offered")
    lg.add_argument("--seconds", type=float, default=120.0, help="load duration per row")
    lg.add_argument("--lateness", default="5,1", help="windows.allowed_lateness_s values, comma-separated")
    mem = sub.add_parser("memory", help="RSS with many (service, operation) series")
    mem.add_argument("--series", type=int, default=10_000, help="distinct (service, operation) pairs")
    mem.add_argument("--minutes", type=float, default=10.0)
    mem.add_argument("--rate", type=float, default=20_000.0, help="spans/s offered")
    for p in (tp, lg, mem):
        p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()

    if args.mode == "throughput":
        rows = []
        modes = {"default": [None], "both": ["off", "on"]}.get(args.analytics, [args.analytics])
        for spans in _numbers(args.spans, int):
            for analytics in modes:
                rows.append(throughput(spans, args.seconds, args.processes, args.rate, analytics))
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)
        if not args.json:
            print_throughput(rows)
    elif args.mode == "lag":
        rows = []
        for lateness in _numbers(args.lateness):
            rows.append(lag(args.rate, args.seconds, lateness))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
        if not args.json:
            print_lag(rows)
    else:
        samples, summary = memory(args.series, args.minutes, args.rate)
        if args.json:
            for r in [*samples, summary]:
                print(json.dumps(r))
        else:
            print_memory(samples, summary)


if __name__ == "__main__":
    main()
