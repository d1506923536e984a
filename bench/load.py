"""Load generator: pre-serialized, realistic OTLP trace requests over gRPC.

    .venv/bin/python -m bench.load --target 127.0.0.1:4317 --spans 512 --concurrency 4 \\
        --processes 1 --duration 60 [--rate SPANS_PER_S] [--series N]

Requests are made of the shared OnlineBoutique recording's traces (its services,
operations, span kinds and call trees: every parent is in the request) with
heavy-tailed durations (lognormal), ~1 % errors and 10 attributes per span. A
small pool of requests is serialized once; before each send only their
timestamps are moved to "now" and their ids salted (fixed64 and id bytes patched
in place with numpy), so every send is new traffic (new trace and span ids, the
same trees) and the generator spends its CPU on sending, not on protobuf. An OTel
SDK process cannot load-test telepipe (~23k spans/s per core); this can.

``--series N`` replaces the recording with N synthetic (service, operation)
pairs (``svc-000``/``op-000`` ..., 100 operations per service, SERVER, equal
shares), taken in turn so that every pair is in each cycle through the requests,
in traces of ~8 spans that mostly stay within a service (``SyntheticTraces``).

Every thread honours RetryInfo: on UNAVAILABLE or RESOURCE_EXHAUSTED it waits
the given delay and sends the same request again (as an OTLP exporter does).
Spans an OK answer reports in ``partial_success.rejected_spans`` are not counted
as acknowledged (``rejected_spans``).
Prints sent, acknowledged and refused counts and acknowledged spans/s; ``--json``
prints one JSON object instead (used by the other benchmarks).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

RECORDING = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "recordings" / (
    "onlineboutique-normal.otlp.jsonl"
)
TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
ATTRIBUTES = [
    ("http.method", "GET"), ("http.route", "/api/v1/items/{id}"), ("http.status_code", 200),
    ("net.peer.name", "cartservice.default.svc.cluster.local"), ("net.peer.port", 7070),
    ("rpc.system", "grpc"), ("rpc.service", "hipstershop.CartService"), ("thread.name", "worker-7"),
    ("k8s.namespace.name", "default"), ("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64)"),
]  # fmt: skip


def synthetic_mix(series: int) -> list[tuple[str, str, int]]:
    """``series`` distinct (service, operation, kind) triples: ceil(series / 100) services of 100
    operations each (the last one gets the remainder), kind 2 (SERVER)."""
    return [(f"svc-{i // 100:03d}", f"op-{i % 100:03d}", 2) for i in range(series)]


def recorded_traces(path: Path = RECORDING) -> list[list[tuple[str, str, int, int]]]:
    """The recording's traces, each a list of spans (service, operation, kind, position of
    the parent in the list or -1), parents before their children."""
    import orjson

    spans: dict[str, tuple] = {}  # span id -> (trace id, parent id, service, operation, kind)
    for line in path.open("rb"):
        for rs in orjson.loads(line).get("resourceSpans", []):
            svc = next(a["value"]["stringValue"] for a in rs["resource"]["attributes"] if a["key"] == "service.name")
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    spans[s["spanId"]] = (s["traceId"], s.get("parentSpanId", ""), svc, s["name"], int(s.get("kind", 0)))
    children: dict[str, list[str]] = {}
    roots: dict[str, list[str]] = {}  # trace id -> its spans without a parent in the recording
    for sid, (tid, parent, *_) in spans.items():
        if parent in spans:
            children.setdefault(parent, []).append(sid)
        else:
            roots.setdefault(tid, []).append(sid)
    traces = []
    for tops in roots.values():
        order, at = list(tops), {}
        for sid in order:  # breadth first: grows while it is walked
            order.extend(children.get(sid, ()))
        trace = []
        for sid in order:
            at[sid] = len(trace)
            _, parent, svc, op, kind = spans[sid]
            trace.append((svc, op, kind, at.get(parent, -1)))
        traces.append(trace)
    return traces


class RecordedTraces:
    """Requests made of whole traces of the recording (its services, operations, kinds and call
    tree), picked at random; the last trace of a request is cut to fit (parents come first,
    so every span's parent is in the request)."""

    def __init__(self, path: Path = RECORDING) -> None:
        self.traces = recorded_traces(path)

    def spans(self, rng: np.random.Generator, n: int, start: int | None) -> list[tuple[str, str, int, int, int]]:
        """``n`` spans (service, operation, kind, position of the parent or -1, trace number)."""
        out: list = []
        while len(out) < n:
            trace = self.traces[rng.integers(len(self.traces))]
            base, number = len(out), out[-1][4] + 1 if out else 0
            out.extend((svc, op, kind, p + base if p >= 0 else -1, number) for svc, op, kind, p in trace)
        return out[:n]


class SyntheticTraces:
    """Requests covering ``series`` synthetic (service, operation) pairs (``synthetic_mix``),
    taken in turn from ``start``; consecutive spans form traces of ~8 spans (geometric sizes),
    each span's parent one of the earlier spans of its trace, so a trace mostly stays within a
    service and crosses to the next one at the boundaries (about one edge per service)."""

    def __init__(self, series: int) -> None:
        self.mix = synthetic_mix(series)

    def spans(self, rng: np.random.Generator, n: int, start: int | None) -> list[tuple[str, str, int, int, int]]:
        first = 0 if start is None else start
        out: list = []
        number = 0
        while len(out) < n:
            base = len(out)
            for j in range(min(int(rng.geometric(1 / 8)), n - base)):
                svc, op, kind = self.mix[(first + base + j) % len(self.mix)]
                out.append((svc, op, kind, base + int(rng.integers(j)) if j else -1, number))
            number += 1
        return out


# What a placeholder in a serialized template stands for (``Template``)
_TRACE_ID, _SPAN_ID, _START, _END = range(4)


class Template:
    """One serialized request and the byte offsets of its timestamps and ids.

    ``at`` moves the timestamps to now and gives the request's traces fresh ids (the same
    8-byte salt XORed into every span and parent id, keeping the call tree; new trace ids):
    sent again, a template is new traffic, as a service's exporter sends it.
    """

    def __init__(self, spans: int, seed: int, traces: RecordedTraces | SyntheticTraces, start: int | None = None) -> None:
        """``start``: for ``SyntheticTraces``, take pairs in turn from this index (so consecutive
        templates cover the whole mix)."""
        rng = np.random.default_rng(seed)
        rows = traces.spans(rng, spans, start)
        by_service: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_service.setdefault(row[0], []).append(i)
        durations = (rng.lognormal(-6.0, 1.3, size=spans) * 1e9).astype(np.int64) + 1000
        ends = np.sort(rng.integers(0, 1_000_000_000, size=spans))  # spread over one second
        span_ids = rng.integers(1, 2**63, size=spans, dtype=np.int64).astype("<u8")
        trace_lo = rng.integers(1, 2**63, size=rows[-1][4] + 1, dtype=np.int64).astype("<u8")
        # Unique placeholders for every timestamp and id, found again after serializing.
        marks = rng.choice(2**62, size=5 * spans, replace=False).astype("<u8") + (1 << 62)
        req = ExportTraceServiceRequest()
        placed: list[tuple[bytes, int, bytes]] = []  # (tag + placeholder, what it stands for, real bytes)
        for svc, idx in by_service.items():
            rs = req.resource_spans.add()
            rs.resource.attributes.add(key="service.name").value.string_value = svc
            rs.resource.attributes.add(key="service.instance.id").value.string_value = f"{svc}-{seed % 3}"
            ss = rs.scope_spans.add()
            ss.scope.name = "bench.load"
            for i in idx:
                _, op, kind, parent, trace = rows[i]
                m = [struct.pack("<Q", int(x)) for x in marks[5 * i : 5 * i + 5]]
                sp = ss.spans.add()
                sp.trace_id = m[0] + m[1]
                sp.span_id = m[2]
                placed.append((b"\x0a\x10" + m[0] + m[1], _TRACE_ID, trace_lo[trace].tobytes()))
                placed.append((b"\x12\x08" + m[2], _SPAN_ID, span_ids[i].tobytes()))
                if parent >= 0:
                    sp.parent_span_id = m[3]
                    placed.append((b"\x22\x08" + m[3], _SPAN_ID, span_ids[parent].tobytes()))
                sp.name, sp.kind = op, kind
                sp.start_time_unix_nano = int(marks[5 * i + 4]) - int(durations[i])
                sp.end_time_unix_nano = int(marks[5 * i + 4])
                placed.append((b"\x39" + struct.pack("<Q", sp.start_time_unix_nano), _START, b""))
                placed.append((b"\x41" + m[4], _END, b""))
                if rng.random() < 0.01:
                    sp.status.code = 2
                for key, value in ATTRIBUTES:
                    a = sp.attributes.add(key=key)
                    if isinstance(value, int):
                        a.value.int_value = value
                    else:
                        a.value.string_value = value
        self.body = bytearray(req.SerializeToString())
        at: dict[int, list] = {_TRACE_ID: [], _SPAN_ID: [], _START: [], _END: []}
        ids = []
        # ``placed`` follows the serialized order (services, their spans, a span's fields by number),
        # so each placeholder is looked for after the one before: one pass over the body. They are
        # distinct random 62-bit values, found where their span is and nowhere else by chance.
        last = 0
        for needle, what, real in placed:
            pos = self.body.find(needle, last)
            if pos < 0:
                raise RuntimeError("a placeholder not found in the serialized template")
            last = pos + len(needle)
            pos += len(needle) - 8  # the last 8 bytes: a timestamp, a span or parent id, a trace id's second half
            at[what].append(pos)
            if what == _TRACE_ID:
                self.body[pos - 8 : pos] = real  # the trace id's first half stays; the second is salted per send
            elif what == _SPAN_ID:
                ids.append(np.frombuffer(real, dtype=np.uint8))
        index = {what: np.array(p, dtype=np.int64)[:, None] + np.arange(8) for what, p in at.items()}
        self.trace_index, self.id_index = index[_TRACE_ID], index[_SPAN_ID]
        self.start_index, self.end_index = index[_START], index[_END]
        self.ids = np.stack(ids)
        # placed follows rows grouped by service: the timestamps' rows in that order
        order = [i for idx in by_service.values() for i in idx]
        self.rel = ends[order].astype(np.int64)
        self.durs = durations[order].astype(np.int64)
        self.spans = spans
        self.lock = threading.Lock()  # sending threads share templates; at() patches body in place

    def __getstate__(self) -> dict:  # templates are pickled to worker processes under spawn
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def at(self, now_ns: int, salt: int = 0) -> bytes:
        """The request with its spans ending within the second before ``now_ns``, its ids
        salted with ``salt`` (a 64-bit int; 0 gives the template's own ids)."""
        ends = (now_ns - 1_000_000_000 + self.rel).astype("<u8")
        starts = (ends - self.durs.astype("<u8")).astype("<u8")
        key = np.frombuffer(struct.pack("<Q", salt), dtype=np.uint8)
        with self.lock:  # unlocked, two threads could mix one's end times with the other's start times
            arr = np.frombuffer(self.body, dtype=np.uint8)
            arr[self.end_index] = ends.view(np.uint8).reshape(-1, 8)
            arr[self.start_index] = starts.view(np.uint8).reshape(-1, 8)
            arr[self.id_index] = self.ids ^ key
            arr[self.trace_index] = key
            return bytes(self.body)


def _retry_delay(err: grpc.RpcError) -> float | None:
    if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return None
    status = rpc_status.from_call(err)
    if status is None:
        return 0.5 if err.code() == grpc.StatusCode.UNAVAILABLE else None
    for d in status.details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return 0.5 if err.code() == grpc.StatusCode.UNAVAILABLE else None


def _worker(target: str, templates: list[Template], duration: float, rate: float, out) -> None:
    """One process: ``concurrency`` threads, each sending at ``rate`` spans/s (0: as fast as it can)."""
    stats = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    spans = templates[0].spans

    def thread(k: int, per_thread_rate: float) -> None:
        local = Counter()
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        export = channel.unary_unary(TRACES, request_serializer=None, response_deserializer=None)
        interval = spans / per_thread_rate if per_thread_rate else 0.0
        next_at = time.monotonic()
        salts = random.Random()  # seeded from the OS: every send gets new ids
        i = k
        while time.monotonic() < deadline:
            if interval:
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            body = templates[i % len(templates)].at(time.time_ns(), salts.getrandbits(64))
            i += 1
            while True:
                local["sent_requests"] += 1
                try:
                    resp = export(body, timeout=30)
                    # OK with partial_success: the receiver kept all but rejected_spans of them
                    rejected = ExportTraceServiceResponse.FromString(resp).partial_success.rejected_spans if resp else 0
                    local["acked_spans"] += spans - rejected
                    if rejected:
                        local["rejected_spans"] += rejected
                    break
                except grpc.RpcError as err:
                    delay = _retry_delay(err)
                    local[f"refused_{err.code().name}"] += 1
                    if delay is None:
                        local["failed_spans"] += spans
                        break
                    time.sleep(delay)
                    if time.monotonic() > deadline + 30:
                        local["failed_spans"] += spans
                        break
        channel.close()
        with lock:
            stats.update(local)

    threads = [threading.Thread(target=thread, args=(k, rate)) for k in range(out["concurrency"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["queue"].put(dict(stats))


def run_load(
    target: str, spans: int, concurrency: int, processes: int, duration: float, rate: float = 0.0, series: int = 0
) -> dict:
    """``series`` > 0: spans cover that many synthetic (service, operation) pairs (``synthetic_mix``),
    with enough templates that one cycle through them holds every pair."""
    if series:
        synthetic = SyntheticTraces(series)
        templates = [Template(spans, seed, synthetic, start=seed * spans) for seed in range(max(16, -(-series // spans)))]
    else:
        recorded = RecordedTraces()
        templates = [Template(spans, seed, recorded) for seed in range(16)]
    queue: mp.Queue = mp.Queue()
    per_thread = rate / (concurrency * processes) if rate else 0.0
    t0 = time.monotonic()
    procs = [
        mp.Process(target=_worker, args=(target, templates, duration, per_thread,
                                          {"queue": queue, "concurrency": concurrency}))  # fmt: skip
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - t0
    total = Counter()
    for r in results:
        total.update(r)
    total = dict(total)
    total["seconds"] = elapsed
    total["acked_spans_per_s"] = total.get("acked_spans", 0) / elapsed
    total["spans_per_request"] = spans
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:4317")
    ap.add_argument("--spans", type=int, default=512, help="spans per request")
    ap.add_argument("--concurrency", type=int, default=4, help="sending threads per process")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--rate", type=float, default=0.0, help="target spans/s in all (0: as fast as possible)")
    ap.add_argument("--series", type=int, default=0,
                    help="spans cover N synthetic (service, operation) pairs (0: the recording's mix)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run_load(args.target, args.spans, args.concurrency, args.processes, args.duration, args.rate, args.series)
    if args.json:
        print(json.dumps(r))
        return
    refused = {k: v for k, v in r.items() if k.startswith("refused_")}
    print(f"{'spans/req':>9} {'procs':>5} {'threads':>7} {'seconds':>7} {'acked spans':>12} "
          f"{'spans/s':>9} {'failed':>7}  refused requests")  # fmt: skip
    print(f"{args.spans:>9} {args.processes:>5} {args.concurrency:>7} {r['seconds']:>7.1f} "
          f"{r.get('acked_spans', 0):>12,} {r['acked_spans_per_s']:>9,.0f} {r.get('failed_spans', 0):>7}  {refused}")  # fmt: skip


if __name__ == "__main__":
    main()
