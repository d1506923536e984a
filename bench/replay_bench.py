"""Replay throughput of the full dataflow (no gRPC), on the shared recordings.

    .venv/bin/python -m bench.replay_bench [--copies 20]

Cases, each in its own process so peak RSS is its own:
- ``json``: the OTLP/JSON recordings as they are (JSON parsing included);
- ``native xN``: the recordings amplified N times (time-shifted, ids rewritten)
  into a native recording, i.e. what the daemon's spool source reads.
Prints a table: spans, seconds, spans/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDINGS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "recordings"
DEFAULT = ["onlineboutique-normal.otlp.jsonl", "trainticket-normal.otlp.jsonl", "zipkin-captures.otlp.jsonl"]


def run_case(kind: str, copies: int, paths: list[str]) -> dict:
    from bench.amplify import amplify, load, write_native
    from pipeline import daemon
    from pipeline.config import Config

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "native":
            spans = write_native(amplify(load([Path(p) for p in paths]), copies), Path(tmp) / "rec")
            inputs = [str(Path(tmp) / "rec")]
        else:
            inputs = paths
            spans = None
        t0 = time.perf_counter()
        summary, _ = daemon.replay(Config(), inputs)
        seconds = time.perf_counter() - t0
    assert spans is None or summary.spans == spans, (summary.spans, spans)
    return {
        "case": f"{kind} x{copies}" if kind == "native" else "json x1",
        "spans": summary.spans,
        "windows": summary.windows,
        "seconds": seconds,
        "spans_per_s": summary.spans / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=20, help="amplification of the native case")
    ap.add_argument("paths", nargs="*", default=[str(RECORDINGS / p) for p in DEFAULT])
    ap.add_argument("--case", choices=["json", "native"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.copies, args.paths)))
        return
    rows = []
    for kind in ("json", "native"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.replay_bench", "--case", kind, "--copies", str(args.copies), *args.paths],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'case':<12} {'spans':>10} {'windows':>8} {'seconds':>8} {'spans/s':>10} {'peak RSS MiB':>13}")
    for r in rows:
        print(
            f"{r['case']:<12} {r['spans']:>10,} {r['windows']:>8,} {r['seconds']:>8.2f} "
            f"{r['spans_per_s']:>10,.0f} {r['peak_rss_mib']:>13.0f}"
        )


if __name__ == "__main__":
    main()
