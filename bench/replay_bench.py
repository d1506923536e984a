"""Replay throughput of the full pipeline (no gRPC), with the ceiling measured in the same run.

    .venv/bin/python -m bench.replay_bench [--copies 1,4,16,64] [--series 10000] [--seconds 3]

The shared recordings (OnlineBoutique, TrainTicket, Zipkin captures) are
amplified by *overlaying* N copies of each recorded request: copy k has its
trace and span ids rewritten and its times shifted by k ms, and the N copies of
a request are merged into one request. That is the recorded system at N times
its traffic: the same services, operations, durations and attributes, N times
the spans per window, and about N x 31 spans per request (x16 is close to an
OTel SDK's default batch of 512 spans).

Each case runs in its own process:

1. the requests are serialized as OTLP protobuf (attributes included);
2. **ceiling**: decode + pre-aggregate over the same requests (traces, and the
   recordings' logs), one request at a time, nothing else (``bench/ceiling.py``
   does the same on the load generator's payloads, which are traces only);
3. **replay**: the requests go through what the daemon does after gRPC: decode,
   spooled batch encoding (``to_bytes``/``from_bytes``, in memory, no disk),
   then the full dataflow of ``pipeline/flow.py`` (service-graph join,
   pre-aggregation, per-service windows, anomaly detection, scaling,
   ``/metrics`` state) until every window is closed.

A high-cardinality case (``--series``) replays ``bench/load``'s synthetic mix
instead: 10,000 (service, operation) pairs at 20,000 spans/s of event time, so a
batch holds about one span per pair.

Prints spans/s for both and their ratio, the RSS the replay added, and where
the replay's time went (stage timers; "bytewax and glue" is the rest).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import orjson
import psutil

RECORDINGS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "recordings"
DEFAULT = ["onlineboutique-normal.otlp.jsonl", "trainticket-normal.otlp.jsonl", "zipkin-captures.otlp.jsonl"]
STRIDE_NS = 1_000_000  # copy k is shifted by k ms
STAGES = ["decode", "service graph", "preaggregate", "windows", "anomaly", "scaling", "metrics sink"]


# ------------------------------------------------------------------------- the payloads


def _id(value: str | None, k: int) -> str | None:
    """Hex id -> base64 (protobuf JSON), with copy k's bytes flipped like bench/amplify."""
    if not value:
        return value
    raw = bytearray(bytes.fromhex(value))
    if k:
        raw[-1] ^= k & 0xFF
        raw[0] ^= (k >> 8) & 0xFF
    return base64.b64encode(raw).decode()


def _shift(value, ns: int):
    return str(int(value) + ns) if value else value


def _copy_spans(resource_spans: list, k: int) -> list:
    out = []
    for rs in resource_spans:
        scopes = []
        for ss in rs.get("scopeSpans") or ():
            spans = []
            for s in ss.get("spans") or ():
                s = dict(s, traceId=_id(s.get("traceId"), k), spanId=_id(s.get("spanId"), k))
                if s.get("parentSpanId"):
                    s["parentSpanId"] = _id(s["parentSpanId"], k)
                for f in ("startTimeUnixNano", "endTimeUnixNano"):
                    s[f] = _shift(s.get(f), k * STRIDE_NS)
                s.pop("events", None), s.pop("links", None)  # their ids are not rewritten
                spans.append(s)
            scopes.append(dict(ss, spans=spans))
        out.append(dict(rs, scopeSpans=scopes))
    return out


def _copy_logs(resource_logs: list, k: int) -> list:
    out = []
    for rl in resource_logs:
        scopes = []
        for sl in rl.get("scopeLogs") or ():
            records = []
            for r in sl.get("logRecords") or ():
                r = dict(r, traceId=_id(r.get("traceId"), k), spanId=_id(r.get("spanId"), k))
                for f in ("timeUnixNano", "observedTimeUnixNano"):
                    r[f] = _shift(r.get(f), k * STRIDE_NS)
                records.append(r)
            scopes.append(dict(sl, logRecords=records))
        out.append(dict(rl, scopeLogs=scopes))
    return out


def payloads(paths: list[Path], copies: int) -> list[tuple[str, bytes, int]]:
    """[(signal, OTLP protobuf request, items)] in recording order, each request x ``copies``."""
    from google.protobuf.json_format import ParseDict
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    out = []
    for path in paths:
        for line in path.open("rb"):
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if obj.get("resourceSpans"):
                merged = [rs for k in range(copies) for rs in _copy_spans(obj["resourceSpans"], k)]
                req = ParseDict({"resourceSpans": merged}, ExportTraceServiceRequest(), ignore_unknown_fields=True)
                n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                out.append(("spans", req.SerializeToString(), n))
            if obj.get("resourceLogs"):
                merged = [rl for k in range(copies) for rl in _copy_logs(obj["resourceLogs"], k)]
                req = ParseDict({"resourceLogs": merged}, ExportLogsServiceRequest(), ignore_unknown_fields=True)
                n = sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
                out.append(("logs", req.SerializeToString(), n))
    return out


# ---------------------------------------------------------------------- ceiling, replay


def ceiling(requests: list[tuple[str, bytes, int]], seconds: float) -> float:
    """decode + pre-aggregate, one request at a time, for at least ``seconds``: spans/s.

    The log requests of the recordings are part of the same payloads, so they are decoded
    and counted per (service, window) here too, as the replay must."""
    from pipeline.config import DEFAULT_BUCKETS, WindowsConfig
    from pipeline.decode import decode_logs, decode_traces
    from pipeline.preaggregate import WindowSpec, preaggregate, preaggregate_logs

    spec = WindowSpec.from_config(WindowsConfig(), DEFAULT_BUCKETS)
    done, t0 = 0, time.perf_counter()
    while True:
        for signal, body, _ in requests:
            if signal == "logs":
                logs = decode_logs(body).batch
                if logs is not None:
                    preaggregate_logs(logs, spec, (0, 0))
                continue
            batch = decode_traces(body).batch
            if batch is not None:
                preaggregate(batch, spec)
                done += len(batch)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


class StageTimes:
    """Seconds spent in each stage; wraps the functions that make up the stages."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, owner, name: str) -> None:
        fn = getattr(owner, name)
        seconds = self.seconds

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def install(self) -> None:
        import pipeline.flow
        from pipeline.anomaly import ServiceAnomaly
        from pipeline.scaling import ServiceScaler
        from pipeline.servicegraph import LinkJoiner
        from pipeline.windows import ServiceWindows
        from sinks.prometheus import _MetricsPartition

        self.wrap("service graph", LinkJoiner, "process")
        for name in ("preaggregate", "preaggregate_logs"):
            self.wrap("preaggregate", pipeline.flow, name)
        for name in ("on_item", "on_idle", "close_all"):
            self.wrap("windows", ServiceWindows, name)
        self.wrap("anomaly", ServiceAnomaly, "on_window")
        self.wrap("scaling", ServiceScaler, "on_window")
        self.wrap("metrics sink", _MetricsPartition, "write_batch")


def payload_source(requests: list[tuple[str, bytes, int]], times: StageTimes, limits=None):
    """A bytewax source doing the receiver's and the spool source's per-request work
    (decoding with ``limits``: the span attributes the configuration reads)."""
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

    from pipeline.batch_codec import Steps, coalesce, decode, encode
    from pipeline.decode import DecodeLimits, decode_logs, decode_traces
    from sources.spool_source import MAX_RECORDS_PER_BATCH

    limits = limits or DecodeLimits()

    class Partition(StatefulSourcePartition):
        def __init__(self) -> None:
            self.pos = 0
            self.steps = Steps(0, 0)

        def next_batch(self) -> list:
            chunk = requests[self.pos : self.pos + MAX_RECORDS_PER_BATCH]
            if not chunk:
                raise StopIteration()
            self.pos += len(chunk)
            t0 = time.perf_counter()
            batches = []
            for signal, body, _ in chunk:
                decoded = decode_traces(body, limits) if signal == "spans" else decode_logs(body, limits)
                if decoded.batch is not None:  # as spooled by the receiver and read back
                    batches.append(decode(encode(decoded.batch)))
            out = self.steps.stamp(coalesce(batches))
            times.seconds["decode"] += time.perf_counter() - t0
            return out

        def snapshot(self) -> int:
            return self.pos

    class Source(FixedPartitionedSource):
        def list_parts(self) -> list[str]:
            return ["payloads"]

        def build_part(self, step_id: str, for_part: str, resume_state):
            return Partition()

    return Source()


# Two dimensions, as the cost criterion asks: a resource attribute and a span attribute
DIMENSIONS = ("deployment.environment", "http.route")


def replay(requests: list[tuple[str, bytes, int]], db: str = "on") -> dict:
    """The dataflow over ``requests``; ``db``: the database analysis "on" (the default) or "off",
    "none": off, and no span attribute read at all (what telepipe did before trace analytics), or
    "dims": on, with two dimensions (``DIMENSIONS``)."""
    from bytewax.testing import run_main

    from pipeline.config import Config, DbConfig, WindowsConfig
    from pipeline.decode import DecodeLimits, decode_limits
    from pipeline.flow import Outputs, build_flow
    from pipeline.selfmetrics import SelfMetrics
    from sinks.prometheus import MetricsSink, SeriesState

    cfg = Config(db=DbConfig(enabled=db in ("on", "dims")), windows=WindowsConfig(dimensions=DIMENSIONS if db == "dims" else ()))
    times = StageTimes()
    times.install()
    metrics = SelfMetrics()
    series = SeriesState(cfg.prometheus.buckets, metrics, stale_after_s=float("inf"))
    outputs = Outputs(result_sinks=[MetricsSink(series)])
    flow = build_flow(cfg, payload_source(requests, times, DecodeLimits() if db == "none" else decode_limits(cfg)), outputs, metrics, idle_close=False)
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    run_main(flow)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    spans = int(metrics.counter("processed_spans"))
    stages = {s: times.seconds.get(s, 0.0) for s in STAGES}
    stages["bytewax and glue"] = max(0.0, seconds - sum(stages.values()))
    return {
        "spans": spans,
        "windows": int(metrics.counter("windows_closed")),
        "seconds": seconds,
        "spans_per_s": spans / seconds,
        "rss_added_mib": (peak[0] - before) / 2**20,
        "stages": stages,
    }


def series_payloads(series: int, windows: int = 4) -> list[tuple[str, bytes, int]]:
    """High cardinality: ``bench/load``'s synthetic mix of ``series`` (service, operation) pairs,
    512-span requests, 20,000 spans/s of event time for ``windows`` 10 s windows (each pair
    ~20 spans per window: a batch holds about one span per pair)."""
    from bench.load import SyntheticTraces, Template

    traces = SyntheticTraces(series)
    templates = [Template(512, seed, traces, start=seed * 512) for seed in range(20)]
    t0 = 1_800_000_000 * 10**9
    per_window = 400  # x 512 spans = 204,800 spans per 10 s
    return [
        ("spans", templates[k % 20].at(t0 + w * 10**10 + (k + 1) * (10**10 // per_window), salt=w * per_window + k + 1), 512)
        for w in range(windows)
        for k in range(per_window)
    ]


def load_payloads(requests: int) -> list[tuple[str, bytes, int]]:
    """What ``bench.live`` sends: ``bench/load``'s 512-span requests from the recordings' traces
    (every span with ``http.route``), 50 requests (25,600 spans) per second of event time."""
    from bench.load import RecordedTraces, Template

    recorded = RecordedTraces()
    templates = [Template(512, seed, recorded) for seed in range(8)]
    t0 = 1_800_000_000 * 10**9
    return [("spans", templates[k % 8].at(t0 + k * 2 * 10**7, salt=k + 1), 512) for k in range(requests)]


def run_case(case: str, paths: list[Path], seconds: float, db: str = "on") -> dict:
    """``case``: "x<copies>" (the recordings overlaid), "<n> pairs" (``series_payloads``) or
    "load <n>" (``load_payloads``)."""
    if case.startswith("x"):
        requests = payloads(paths, int(case[1:]))
    elif case.startswith("load "):
        requests = load_payloads(int(case.split()[1]))
    else:
        requests = series_payloads(int(case.split()[0]))
    traces = [body for signal, body, _ in requests if signal == "spans"]
    sent = sum(n for signal, _, n in requests if signal == "spans")
    ceil = ceiling(requests, seconds)
    out = replay(requests, db)
    assert out["spans"] == sent, (out["spans"], sent)  # every span ends up in a closed window
    label = {"on": case, "off": f"{case} (db off)", "none": f"{case} (no attributes)", "dims": f"{case} (2 dims)"}[db]
    out.update(case=label, spans_per_request=sent / len(traces), ceiling=ceil, ratio=out["spans_per_s"] / ceil)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", default="1,4,16,64", help="overlay factors, comma-separated")
    ap.add_argument("--series", default="10000",
                    help="high-cardinality cases: numbers of (service, operation) pairs, comma-separated ('' for none)")
    ap.add_argument("--load", default="", help="also replay this many of bench.live's requests (bench/load), comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum duration of each ceiling measurement")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    ap.add_argument("--db", choices=["on", "off", "none", "dims", "both", "all"], default="on",
                    help="the database analysis ([db] enabled, the default: on); none: off and no span attribute "
                         "read (before trace analytics); dims: on, with two dimensions; both: each case none, "
                         "then dims; all: none, off, on, dims")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each case and mode, interleaved; the row is the run of median ratio")
    ap.add_argument("paths", nargs="*", default=[str(RECORDINGS / p) for p in DEFAULT])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    paths = [Path(p) for p in args.paths]
    if args.case:
        print(json.dumps(run_case(args.case, paths, args.seconds, args.db)))
        return
    rows = []
    cases = [f"x{c}" for c in args.copies.split(",") if c] + [f"{n} pairs" for n in args.series.split(",") if n]
    cases += [f"load {n}" for n in args.load.split(",") if n]
    modes = {"both": ["none", "dims"], "all": ["none", "off", "on", "dims"]}.get(args.db, [args.db])
    for case in cases:
        runs: dict[str, list[dict]] = {db: [] for db in modes}
        for _ in range(args.repeat):  # interleaved: the machine's drift hits every mode alike
            for db in modes:
                out = subprocess.run(
                    [sys.executable, "-m", "bench.replay_bench", "--case", case, "--seconds", str(args.seconds),
                     "--db", db, *map(str, paths)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                runs[db].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for db in modes:
            ranked = sorted(runs[db], key=lambda r: r["ratio"])
            rows.append({**ranked[len(ranked) // 2], "runs": len(ranked)})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'case':<20} {'spans':>10} {'spans/req':>9} {'windows':>8} {'replay spans/s':>15} "
          f"{'ceiling spans/s':>16} {'ratio':>6} {'RSS added MiB':>14}")  # fmt: skip
    for r in rows:
        print(
            f"{r['case']:<20} {r['spans']:>10,} {r['spans_per_request']:>9.0f} {r['windows']:>8,} "
            f"{r['spans_per_s']:>15,.0f} {r['ceiling']:>16,.0f} {r['ratio']:>6.2f} {r['rss_added_mib']:>14.0f}"
        )
    print("\nwhere the replay's time went (% of its wall time)")
    names = [*STAGES, "bytewax and glue"]
    print(f"{'case':<20} " + " ".join(f"{n:>{max(8, len(n))}}" for n in names))
    for r in rows:
        cells = [f"{100 * r['stages'][n] / r['seconds']:>{max(8, len(n))}.1f}" for n in names]
        print(f"{r['case']:<20} " + " ".join(cells))


if __name__ == "__main__":
    main()
