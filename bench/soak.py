"""Soak: the daemon under steady load for a long time; memory, file descriptors and spool must stay flat.

    .venv/bin/python -m bench.soak [--minutes 10] [--rate 20000] [--spans 512]

Starts ``telepipe run`` on loopback with a fresh data dir and its default config,
drives it with ``bench.load`` at ``--rate`` spans/s (half of what this machine's
daemon keeps up with, by default), samples every 10 s: resident memory, open
file descriptors, spool bytes on disk, spans acknowledged and processed. At the
end it waits for the flow to catch up and checks acknowledged == processed.
Prints the samples, RSS at start and end and its slope (least squares over the
second half, after warm-up), and the fd and spool figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.load import run_load

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=20_000.0, help="spans/s offered")
    ap.add_argument("--spans", type=int, default=512, help="spans per request")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="telepipe-soak-"))
    grpc_port, http_port = _port(), _port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "telepipe.cli", "--log-level", "WARNING", "run", "--data-dir", str(tmp / "data"),
         "--otlp-grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}", "--otlp-http", ""],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    for _ in range(100):
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc = psutil.Process(daemon.pid)
    spool = tmp / "data" / "spool"
    duration = args.minutes * 60
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    loader = ctx.Process(target=_load, args=(f"127.0.0.1:{grpc_port}", args.spans, duration, args.rate, result_q))
    t0 = time.monotonic()
    loader.start()
    samples = []
    while loader.is_alive():
        text = httpx.get(metrics_url, timeout=5).text
        samples.append((
            time.monotonic() - t0, proc.memory_info().rss / 2**20, proc.num_fds(),
            sum(p.stat().st_size for p in spool.rglob("*.seg")) / 2**20,
            _counter(text, "telepipe_accepted_spans_total"), _counter(text, "telepipe_processed_spans_total"),
        ))  # fmt: skip
        loader.join(10)
    load = result_q.get()
    acked = load.get("acked_spans", 0)
    deadline = time.monotonic() + 300
    processed = 0.0
    while time.monotonic() < deadline:
        processed = _counter(httpx.get(metrics_url, timeout=5).text, "telepipe_processed_spans_total")
        if processed >= acked:
            break
        time.sleep(2)
    daemon.terminate()
    daemon.wait(60)

    print(f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>5} {'spool MiB':>9} {'accepted':>11} {'processed':>11}")
    for t, rss, fds, sp, acc, prc in samples[:: max(1, len(samples) // 12)] + samples[-1:]:
        print(f"{t:>6.0f} {rss:>8.1f} {fds:>5} {sp:>9.1f} {acc:>11,.0f} {prc:>11,.0f}")
    arr = np.array(samples)
    half = arr[len(arr) // 2 :]
    slope = np.polyfit(half[:, 0] / 60, half[:, 1], 1)[0] if len(half) > 2 else float("nan")
    print()
    print(f"offered {args.rate:,.0f} spans/s for {args.minutes:g} min; acknowledged {acked:,} "
          f"({load['acked_spans_per_s']:,.0f}/s), processed {processed:,.0f}, refused {load.get('refused_UNAVAILABLE', 0)}")  # fmt: skip
    print(f"RSS start {arr[0, 1]:.1f} MiB, end {arr[-1, 1]:.1f} MiB, slope over the second half "
          f"{slope:+.2f} MiB/min; fds start {int(arr[0, 2])}, end {int(arr[-1, 2])}; spool at end "
          f"{arr[-1, 3]:.1f} MiB (max {arr[:, 3].max():.1f})")  # fmt: skip
    print("acknowledged == processed:", processed == acked)


def _load(target, spans, duration, rate, queue) -> None:
    queue.put(run_load(target, spans, concurrency=2, processes=1, duration=duration, rate=rate))


if __name__ == "__main__":
    main()
