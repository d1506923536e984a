"""What bytewax recovery snapshots cost, to choose ``recovery.snapshot_interval_s``.

    .venv/bin/python -m bench.snapshot_cost [--copies 20]

Replays OnlineBoutique amplified ``--copies`` times (a native recording) through the
full dataflow at several epoch (= snapshot) intervals, each without and with
recovery (a fresh recovery directory), and prints spans/s and the cost of
recovery. A snapshot pickles the read position, the service-graph join and every
service's state touched in the epoch, and commits them to SQLite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main

from bench.amplify import amplify, load, write_native
from pipeline.config import Config
from pipeline.flow import Outputs, build_flow
from pipeline.selfmetrics import SelfMetrics
from sources.replay import ReplaySource

RECORDING = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "recordings" / (
    "onlineboutique-normal.otlp.jsonl"
)


def run(rec: Path, interval: float, recovery: bool) -> float:
    metrics = SelfMetrics()
    flow = build_flow(Config(), ReplaySource([rec], metrics=metrics), Outputs(), metrics, idle_close=False)
    with tempfile.TemporaryDirectory() as db:
        kwargs: dict = {"epoch_interval": timedelta(seconds=interval)}
        if recovery:
            init_db_dir(Path(db), 1)
            kwargs["recovery_config"] = RecoveryConfig(Path(db))
        t0 = time.perf_counter()
        run_main(flow, **kwargs)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "rec"
        spans = write_native(amplify(load([RECORDING]), args.copies), rec)
        print(f"{spans:,} spans; each row: the same epoch interval without and with recovery (best of 2)")
        print(f"{'snapshot interval':>17} {'no recovery spans/s':>20} {'recovery spans/s':>17} {'cost':>6}")
        for interval in (5.0, 2.0, 1.0, 0.5, 0.2):
            base = min(run(rec, interval, False) for _ in range(2))
            t = min(run(rec, interval, True) for _ in range(2))
            print(f"{interval:>15.1f} s {spans / base:>20,.0f} {spans / t:>17,.0f} {100 * (t - base) / base:>5.1f}%")


if __name__ == "__main__":
    main()
