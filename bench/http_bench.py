"""OTLP/HTTP against OTLP/gRPC: the live daemon's spans/s per core on each path, same requests.

    .venv/bin/python -m bench.http_bench [--spans 512] [--seconds 30] [--paths grpc,http,http-gzip] [--json]

For each path a fresh ``telepipe run`` (``bench.live_procs.Daemon``: pinned to CPU 0, fresh
data dir, the OTLP/HTTP receiver on a free port) is offered as much as a load generator
pinned to CPU 1 can send for ``--seconds``, 4 sending threads, with the requests
``bench.load`` makes (``--spans``-span requests of the OnlineBoutique recording's traces,
fresh ids and timestamps every send):

- ``grpc``: ``bench.load`` over gRPC (as ``bench.live throughput``);
- ``http``: the same protobuf bodies POSTed to ``/v1/traces`` (``application/x-protobuf``),
  one keep-alive ``http.client`` connection per thread;
- ``http-gzip``: the same, gzip-compressed by the load generator (``Content-Encoding: gzip``).

429 and 503 are retried after ``Retry-After``, as OTLP exporters do. After the load, it waits
until ``telepipe_processed_spans_total`` reaches the acknowledged spans (up to 5 min).
Reports acknowledged spans/s, the dataflow's pace while the load ran (spans read from the
spool per second), whether every acknowledged span was processed, the ratio to the gRPC row
and to the ceiling (``bench.ceiling``, measured first in the same run).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from queue import Empty

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from bench.ceiling import ceiling
from bench.live_procs import CONCURRENCY, DAEMON_CPU, LOAD_CPU, Daemon, Load, _refused
from bench.load import RecordedTraces, Template
from bench.soak import _port

PATHS = ("grpc", "http", "http-gzip")


def _http_thread(port: int, templates: list[Template], deadline: float, compress: bool, k: int, out: Counter) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/x-protobuf"}
    if compress:
        headers["Content-Encoding"] = "gzip"
    salts = random.Random()
    spans = templates[0].spans
    i = k
    while time.monotonic() < deadline:
        body = templates[i % len(templates)].at(time.time_ns(), salts.getrandbits(64))
        if compress:
            body = gzip.compress(body, compresslevel=1)
        i += 1
        while True:
            out["sent_requests"] += 1
            try:
                conn.request("POST", "/v1/traces", body, headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                out["refused_connection"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                time.sleep(0.5)
                continue
            if resp.status == 200:
                rejected = ExportTraceServiceResponse.FromString(data).partial_success.rejected_spans
                out["acked_spans"] += spans - rejected
                out["rejected_spans"] += rejected
                break
            out[f"refused_{resp.status}"] += 1
            if resp.status not in (429, 503) or time.monotonic() > deadline + 30:
                out["failed_spans"] += spans
                break
            time.sleep(float(resp.getheader("Retry-After", "1")))
    conn.close()


def _http_load(port: int, spans: int, seconds: float, compress: bool, queue) -> None:
    os.sched_setaffinity(0, {LOAD_CPU})
    recorded = RecordedTraces()
    templates = [Template(spans, seed, recorded) for seed in range(16)]
    counts: list[Counter] = [Counter() for _ in range(CONCURRENCY)]
    t0 = time.monotonic()
    threads = [threading.Thread(target=_http_thread, args=(port, templates, t0 + seconds, compress, k, counts[k]))
               for k in range(CONCURRENCY)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(counts, Counter())
    elapsed = time.monotonic() - t0
    queue.put({**total, "seconds": elapsed, "acked_spans_per_s": total["acked_spans"] / elapsed})


class HttpLoad(Load):
    """``_http_load`` in a child process pinned to the load CPU (``Load``'s interface)."""

    def __init__(self, port: int, spans: int, seconds: float, compress: bool) -> None:  # noqa: D107
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=_http_load, args=(port, spans, seconds, compress, self.queue))
        self.process.start()


def run_path(path: str, spans: int, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="telepipe-http-bench-"))
    port = _port()
    config = tmp / "telepipe.toml"
    config.write_text(f'[otlp_http]\nlisten = "127.0.0.1:{port}"\n')
    daemon = load = None
    try:
        daemon = Daemon(tmp, config=config)
        daemon.wait_ready()
        read_before = daemon.metric("telepipe_read_spans_total")
        if path == "grpc":
            load = Load(daemon.target, spans, seconds, cpu=LOAD_CPU)
        else:
            load = HttpLoad(port, spans, seconds, compress=path == "http-gzip")
        while load.running(wait=1):
            daemon.check()
        try:
            counts = load.result()
        except Empty:
            raise RuntimeError("the load generator gave no result") from None
        read_during = daemon.metric("telepipe_read_spans_total") - read_before
        acked = counts.get("acked_spans", 0)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and daemon.metric("telepipe_processed_spans_total") < acked:
            daemon.check()
            time.sleep(1)
        processed = daemon.metric("telepipe_processed_spans_total")
    finally:
        if load is not None:
            load.stop()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "path": path, "spans_per_request": spans, "seconds": round(counts["seconds"], 1), "acked_spans": acked,
        "acked_spans_per_s": round(counts["acked_spans_per_s"]),
        "read_spans_per_s": round(read_during / counts["seconds"]),
        "processed_spans": int(processed), "acked_equals_processed": processed == acked,
        "failed_spans": counts.get("failed_spans", 0), "refused": _refused(counts),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=512, help="spans per request")
    ap.add_argument("--seconds", type=float, default=30.0, help="load per path")
    ap.add_argument("--paths", default="grpc,http,http-gzip", help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown := set(paths) - set(PATHS):
        ap.error(f"unknown paths {sorted(unknown)}")
    ceiling_rate = ceiling(args.spans, seconds=5)
    rows = [run_path(p, args.spans, args.seconds) for p in paths]
    grpc_rate = next((r["acked_spans_per_s"] for r in rows if r["path"] == "grpc"), None)
    for r in rows:
        r["ceiling_spans_per_s"] = round(ceiling_rate)
        r["ratio_to_ceiling"] = round(r["acked_spans_per_s"] / ceiling_rate, 3)
        r["ratio_to_grpc"] = round(r["acked_spans_per_s"] / grpc_rate, 3) if grpc_rate else None
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'path':<10} {'spans/req':>9} {'seconds':>7} {'acked spans/s':>13} {'processed spans/s':>17} "
          f"{'acked==proc':>11} {'to gRPC':>7} {'to ceiling':>10}  refused requests")  # fmt: skip
    for r in rows:
        to_grpc = "-" if r["ratio_to_grpc"] is None else f"{r['ratio_to_grpc']:.2f}"
        print(f"{r['path']:<10} {r['spans_per_request']:>9} {r['seconds']:>7.1f} {r['acked_spans_per_s']:>13,} "
              f"{r['read_spans_per_s']:>17,} {'yes' if r['acked_equals_processed'] else 'no':>11} {to_grpc:>7} "
              f"{r['ratio_to_ceiling']:>10.2f}  {r['refused']}")  # fmt: skip
    print(f"\nceiling {round(ceiling_rate):,} spans/s (bench.ceiling, one core); daemon pinned to CPU {DAEMON_CPU}, "
          f"load generator to CPU {LOAD_CPU}; processed spans/s: spans the dataflow read from the spool while the "
          "load ran.")  # fmt: skip


if __name__ == "__main__":
    main()
