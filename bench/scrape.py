"""/metrics exposition cost at high cardinality, in process (no dataflow, no network).

Fills a ``SeriesState`` with N (service, operation) keys the way the windows do
(window results with two status codes, an anomaly update with its five judged
features per key, a scaling update per service), then scrapes it repeatedly and
reports the time per scrape, the size of the text, its lines, and the process RSS
after each scrape: RSS must stay flat from scrape to scrape.

    python -m bench.scrape --keys 1000,10000 --scrapes 10
"""

from __future__ import annotations

import argparse
import time

from pipeline.config import DEFAULT_BUCKETS
from pipeline.detectors import KEY_FEATURES
from pipeline.model import AnomalyUpdate, Judgement, ScalingUpdate, WindowResult
from pipeline.selfmetrics import SelfMetrics
from sinks.prometheus import SeriesState

NB = len(DEFAULT_BUCKETS) + 1
OPS_PER_SERVICE = 100


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def window_items(keys: int, start: int) -> list:
    items: list = []
    for k in range(keys):
        service, op = f"service-{k // OPS_PER_SERVICE:03d}", f"GET /api/v1/resource-{k:05d}/{{id}}"
        buckets = [[0] * NB for _ in range(3)]
        buckets[0][k % NB] = 40 + k % 7
        buckets[2][(k + 3) % NB] = 1 + k % 3
        unset, errors = 40 + k % 7, 1 + k % 3
        items.append(WindowResult(
            service=service, operation=op, span_kind=2, window_start=start, window_end=start + 10_000_000_000,
            count=unset + errors, errors=errors, p50=0.012, p90=0.05, p95=0.08, p99=0.21, max=1.5,
            sum=0.9 * unset + 2.0 * errors, status_counts=(unset, 0, errors),
            bucket_counts=tuple(map(tuple, buckets)), status_sums=(0.9 * unset, 0.0, 2.0 * errors),
        ))  # fmt: skip
        judgements = tuple(Judgement(f, 1.0 + k % 5, 1.1, 0.5, 1.7, 0.3, True) for f in KEY_FEATURES)
        items.append(AnomalyUpdate(service, op, 2, start, 0.4, 0.2, False, "ok", judgements))
    for s in range(0, keys, OPS_PER_SERVICE):
        items.append(ScalingUpdate(f"service-{s // OPS_PER_SERVICE:03d}", start, 3, 4, "cpu", "call_rate", 120.0, 130.0))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", default="1000,10000", help="comma-separated numbers of (service, operation) keys")
    ap.add_argument("--scrapes", type=int, default=10)
    args = ap.parse_args()
    print(f"{'keys':>7} {'scrape s (median)':>18} {'MiB text':>9} {'lines':>9} {'RSS before':>11} "
          f"{'RSS 1st':>8} {'RSS last':>9}")  # fmt: skip
    for keys in (int(k) for k in args.keys.split(",")):
        state = SeriesState(DEFAULT_BUCKETS, SelfMetrics(), stale_after_s=1e9)
        state.update(window_items(keys, 0))
        before = rss_mib()
        times, sizes, lines, rss = [], 0, 0, []
        for i in range(args.scrapes):
            state.update(window_items(keys, (i + 1) * 10_000_000_000))
            t = time.perf_counter()
            sizes = lines = 0
            for chunk in state.render():
                sizes += len(chunk)
                lines += chunk.count(b"\n")
            times.append(time.perf_counter() - t)
            rss.append(rss_mib())
        times.sort()
        print(f"{keys:>7} {times[len(times) // 2]:>18.3f} {sizes / 2**20:>9.1f} {lines:>9} {before:>11.0f} "
              f"{rss[0]:>8.0f} {rss[-1]:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
