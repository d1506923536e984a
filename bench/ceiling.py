"""The ceiling on this machine: decode + extract + per-key sketch update, nothing else.

    .venv/bin/python -m bench.ceiling [--seconds 5]

Runs, on one core and in one thread, the loop every span must go through at least:
decoding the same pre-serialized requests ``bench/load`` sends into validated
columns (``pipeline.decode.decode_traces``: the numba wire reader of
``pipeline/decode/span_wire.py``, as the daemon decodes), and the numpy pre-aggregation
into per-(key, window) sketches and histograms (``pipeline.preaggregate.preaggregate``).
Prints spans/s for 512- and 64-span requests, and the same loop with upb decoding
(``decode_traces_upb``, the decoder before the wire reader) for comparison. Other
benchmarks report telepipe's throughput as a ratio of the first, so the figure
holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import time

from bench.load import RecordedTraces, Template
from pipeline.config import DEFAULT_BUCKETS, WindowsConfig
from pipeline.decode import decode_traces, decode_traces_upb
from pipeline.preaggregate import WindowSpec, preaggregate


def ceiling(spans: int, seconds: float, decode=decode_traces) -> float:
    traces = RecordedTraces()
    bodies = [Template(spans, seed, traces).at(time.time_ns()) for seed in range(8)]
    spec = WindowSpec.from_config(WindowsConfig(), DEFAULT_BUCKETS)
    done = 0
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        batch = decode(bodies[i % len(bodies)]).batch
        preaggregate(batch, spec)
        done += len(batch)
        i += 1
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print(f"{'spans/request':>13} {'ceiling spans/s':>16} {'with upb decode':>16}")
    for spans in (512, 64):
        fast, upb = ceiling(spans, args.seconds), ceiling(spans, args.seconds, decode_traces_upb)
        print(f"{spans:>13} {fast:>16,.0f} {upb:>16,.0f}")


if __name__ == "__main__":
    main()
