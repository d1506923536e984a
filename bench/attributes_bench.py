"""What reading span attributes costs the decode: none, the service graph's, and the database analysis's.

    .venv/bin/python -m bench.attributes_bench [--seconds 2] [--rounds 5]

Decodes ``bench/load``'s 512-span requests (10 attributes per span, as an instrumented HTTP/gRPC
service sends: none of them a database key) with the wire reader, reading no span attribute
(what the wire reader did before trace analytics), the service graph's virtual-node keys only
(``[db] enabled = false``) and those with the database keys (the default), in alternating
rounds; and the same requests with a database call's attributes (``db.system.name``,
``db.query.text``, ``db.namespace``) added to every fourth span. Prints the median spans/s of
each and their ratios to reading nothing. End to end, ``bench/replay_bench --db both`` runs
the dataflow with and without the database analysis.
"""

from __future__ import annotations

import argparse
import statistics
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from bench.load import RecordedTraces, Template
from pipeline.config import Config, DbConfig
from pipeline.decode import DecodeLimits, decode_limits, decode_traces


def with_database_spans(body: bytes, every: int = 4) -> bytes:
    req = ExportTraceServiceRequest.FromString(body)
    i = 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                if i % every == 0:
                    span.attributes.extend([
                        KeyValue(key="db.system.name", value=AnyValue(string_value="postgresql")),
                        KeyValue(key="db.query.text", value=AnyValue(
                            string_value=f"SELECT * FROM items WHERE order_id = {i} AND status = 'open'")),
                        KeyValue(key="db.namespace", value=AnyValue(string_value="shop")),
                    ])  # fmt: skip
                i += 1
    return req.SerializeToString()


def rate(bodies: list[bytes], limits: DecodeLimits, seconds: float) -> float:
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = decode_traces(bodies[i % len(bodies)], limits).batch
        done += len(batch) if batch is not None else 0
        i += 1
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="each measurement")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    traces = RecordedTraces()
    plain = [Template(512, seed, traces).at(time.time_ns()) for seed in range(8)]
    cases = {"no database spans": plain, "1 span in 4 a database call": [with_database_spans(b) for b in plain]}
    limits = {
        "none": DecodeLimits(),
        "graph": decode_limits(Config(db=DbConfig(enabled=False))),
        "graph+db": decode_limits(Config()),
    }
    print(f"{'requests (512 spans, 10 attributes each)':<34} {'none spans/s':>13} {'graph':>10} {'graph+db':>10}"
          f" {'graph/none':>11} {'graph+db/none':>14}")  # fmt: skip
    for name, bodies in cases.items():
        got: dict[str, list[float]] = {k: [] for k in limits}
        for _ in range(args.rounds):
            for k, lim in limits.items():
                got[k].append(rate(bodies, lim, args.seconds))
        a, b, c = (statistics.median(got[k]) for k in limits)
        print(f"{name:<34} {a:>13,.0f} {b:>10,.0f} {c:>10,.0f} {b / a:>11.2f} {c / a:>14.2f}")


if __name__ == "__main__":
    main()
