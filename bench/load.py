"""Load generator: pre-serialized, realistic OTLP trace requests over gRPC.

    .venv/bin/python -m bench.load --target 127.0.0.1:4317 --spans 512 --concurrency 4 \\
        --processes 1 --duration 60 [--rate SPANS_PER_S] [--series N]

Requests are shaped like the shared OnlineBoutique recording (its services and
operations in their proportions, span kinds, parent ids) with heavy-tailed
durations (lognormal), ~1 % errors and 10 attributes per span. A small pool of
requests is serialized once; before each send only their timestamps are moved
to "now" (fixed64 fields patched in place with numpy), so the generator spends
its CPU on sending, not on protobuf. An OTel SDK process cannot load-test
telepipe (~23k spans/s per core); this can.

``--series N`` replaces the recording's mix with N synthetic (service, operation)
pairs (``svc-000``/``op-000`` ..., 100 operations per service, SERVER, equal
shares), taken in turn so that every pair is in each cycle through the requests.

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


def operation_mix(path: Path = RECORDING) -> list[tuple[str, str, int, float]]:
    """(service, operation, kind, share of spans) from the recording."""
    import orjson

    counts: Counter = Counter()
    for line in path.open("rb"):
        for rs in orjson.loads(line).get("resourceSpans", []):
            svc = next(a["value"]["stringValue"] for a in rs["resource"]["attributes"] if a["key"] == "service.name")
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    counts[(svc, s["name"], int(s.get("kind", 0)))] += 1
    total = sum(counts.values())
    return [(svc, op, kind, n / total) for (svc, op, kind), n in counts.most_common()]


def synthetic_mix(series: int) -> list[tuple[str, str, int, float]]:
    """``series`` distinct (service, operation) pairs: ceil(series / 100) services of 100 operations
    each (the last one gets the remainder), kind 2 (SERVER), equal shares."""
    return [(f"svc-{i // 100:03d}", f"op-{i % 100:03d}", 2, 1.0 / series) for i in range(series)]


class Template:
    """One serialized request and the byte offsets of its timestamps."""

    def __init__(self, spans: int, seed: int, mix, start: int | None = None) -> None:
        """``start``: take mix entries in turn from this index (so consecutive templates cover
        the whole mix) instead of at random by share."""
        rng = np.random.default_rng(seed)
        if start is None:
            shares = np.array([m[3] for m in mix])
            picks = rng.choice(len(mix), size=spans, p=shares / shares.sum())
        else:
            picks = (start + np.arange(spans)) % len(mix)
        by_service: dict[str, list[int]] = {}
        for i, k in enumerate(picks):
            by_service.setdefault(mix[k][0], []).append(i)
        durations = (rng.lognormal(-6.0, 1.3, size=spans) * 1e9).astype(np.int64) + 1000
        ends = np.sort(rng.integers(0, 1_000_000_000, size=spans))  # spread over one second
        req = ExportTraceServiceRequest()
        marks: list[int] = []  # unique placeholder end times, found again after serializing
        rel: list[int] = []  # each span's end within its second
        durs: list[int] = []
        base = 1 << 62
        for svc, idx in by_service.items():
            rs = req.resource_spans.add()
            rs.resource.attributes.add(key="service.name").value.string_value = svc
            rs.resource.attributes.add(key="service.instance.id").value.string_value = f"{svc}-{seed % 3}"
            ss = rs.scope_spans.add()
            ss.scope.name = "bench.load"
            for i in idx:
                _, op, kind, _ = mix[picks[i]]
                sp = ss.spans.add()
                sp.trace_id = rng.bytes(16)
                sp.span_id = rng.bytes(8)
                sp.parent_span_id = rng.bytes(8) if kind != 2 or rng.random() < 0.5 else b""
                sp.name, sp.kind = op, kind
                end = base + len(marks) * 4_000_000_000_000
                sp.start_time_unix_nano = end - int(durations[i])
                sp.end_time_unix_nano = end
                marks.append(end)
                rel.append(int(ends[i]))
                durs.append(int(durations[i]))
                if rng.random() < 0.01:
                    sp.status.code = 2
                for key, value in ATTRIBUTES:
                    a = sp.attributes.add(key=key)
                    if isinstance(value, int):
                        a.value.int_value = value
                    else:
                        a.value.string_value = value
        self.body = bytearray(req.SerializeToString())
        end_at = [self.body.find(b"\x41" + struct.pack("<Q", m)) + 1 for m in marks]  # field 8, fixed64
        start_at = [self.body.find(b"\x39" + struct.pack("<Q", m - d)) + 1 for m, d in zip(marks, durs)]  # field 7
        if min(end_at) <= 0 or min(start_at) <= 0:
            raise RuntimeError("timestamp fields not found in the serialized template")
        self.end_index = np.array(end_at, dtype=np.int64)[:, None] + np.arange(8)
        self.start_index = np.array(start_at, dtype=np.int64)[:, None] + np.arange(8)
        self.rel = np.array(rel, dtype=np.int64)
        self.durs = np.array(durs, dtype=np.int64)
        self.spans = spans
        self.lock = threading.Lock()  # sending threads share templates; at() patches body in place

    def __getstate__(self) -> dict:  # templates are pickled to worker processes under spawn
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def at(self, now_ns: int) -> bytes:
        """The request with its spans ending within the second before ``now_ns``."""
        ends = (now_ns - 1_000_000_000 + self.rel).astype("<u8")
        starts = (ends - self.durs.astype("<u8")).astype("<u8")
        with self.lock:  # unlocked, two threads could mix one's end times with the other's start times
            arr = np.frombuffer(self.body, dtype=np.uint8)
            arr[self.end_index] = ends.view(np.uint8).reshape(-1, 8)
            arr[self.start_index] = starts.view(np.uint8).reshape(-1, 8)
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
        i = k
        while time.monotonic() < deadline:
            if interval:
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            body = templates[i % len(templates)].at(time.time_ns())
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
        mix = synthetic_mix(series)
        templates = [Template(spans, seed, mix, start=seed * spans) for seed in range(max(16, -(-series // spans)))]
    else:
        mix = operation_mix()
        templates = [Template(spans, seed, mix) for seed in range(16)]
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
