"""The processes ``bench/live`` measures: the daemon (``telepipe run``, pinned to a core, its
HTTP ports known) and the load generator (``bench/load`` in a child process, pinned to the
other core), with what each reports."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty

import httpx
import psutil

from bench.load import run_load
from bench.soak import _counter, _port

ROOT = Path(__file__).resolve().parent.parent
DAEMON_CPU, LOAD_CPU = 0, 1
CONCURRENCY = 4


def _http_ports(n: int) -> list[int]:
    """n consecutive free loopback ports (process i of a cluster serves HTTP on the first + i)."""
    while True:
        base = _port()
        ok = True
        for port in range(base + 1, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return list(range(base, base + n))


class Daemon:
    """``telepipe run`` on free loopback ports in ``tmp``; ``stop()`` ends it and its children."""

    def __init__(self, tmp: Path, processes: int = 1, pin: bool = True, config: Path | None = None) -> None:
        self.grpc_port = _port()
        self.http_ports = _http_ports(processes)
        cmd = [sys.executable, "-m", "telepipe.cli", "--log-level", "WARNING", "run", "--data-dir", str(tmp / "data"),
               "--otlp-grpc", f"127.0.0.1:{self.grpc_port}", "--http", f"127.0.0.1:{self.http_ports[0]}",
               "--otlp-http", ""]  # fmt: skip
        if config is not None:
            cmd += ["--config", str(config)]
        if processes > 1:
            cmd += ["--processes", str(processes)]
        self.log_path = tmp / "daemon.log"
        with self.log_path.open("wb") as log:
            # Affinity set in the child before exec: every thread and process it starts inherits it
            # (psutil's cpu_affinity on a running pid only moves that pid's main thread).
            pin_fn = (lambda: os.sched_setaffinity(0, {DAEMON_CPU})) if pin else None
            self.popen = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, preexec_fn=pin_fn)
        self.proc = psutil.Process(self.popen.pid)
        self.target = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.http_ports)
        while waiting and time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            for port in sorted(waiting):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        waiting.discard(port)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        if waiting:
            raise RuntimeError(
                f"daemon not ready on {sorted(waiting)} ({self.status()}); its log ends:\n{self.log_tail()}"
            )

    def status(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def check(self) -> None:
        """Raise if the daemon is no longer running."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"daemon {self.status()}; its log ends:\n{self.log_tail()}")

    def metric(self, name: str) -> float:
        """A counter or gauge without labels, summed over the processes' /metrics."""
        return sum(_counter(text, name) for text in self.metrics_texts())

    def dropped(self) -> dict[str, int]:
        """``telepipe_dropped_total`` by reason, summed over the processes (nothing dropped: {})."""
        out: dict[str, int] = {}
        for text in self.metrics_texts():
            for line in text.splitlines():
                if line.startswith('telepipe_dropped_total{reason="'):
                    reason = line.split('"')[1]
                    out[reason] = out.get(reason, 0) + int(float(line.split()[-1]))
        return {r: n for r, n in out.items() if n}

    def metrics_texts(self) -> list[str]:
        return [httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=30).text for p in self.http_ports]

    def rss_mib(self) -> float:
        """RSS of the daemon and all its children, summed."""
        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def stop(self) -> None:
        """SIGTERM (the daemon drains and snapshots), wait; kill whatever is left after 60 s."""
        try:
            children = self.proc.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()


def _load(target, spans, seconds, rate, series, cpu, queue) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before run_load starts its processes and threads
    queue.put(run_load(target, spans, concurrency=CONCURRENCY, processes=1, duration=seconds, rate=rate, series=series))


class Load:
    """``bench.load.run_load`` in a child process (pinned to ``cpu`` unless None)."""

    def __init__(self, target: str, spans: int, seconds: float, rate: float = 0.0, series: int = 0,
                 cpu: int | None = None) -> None:  # fmt: skip
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=_load, args=(target, spans, seconds, rate, series, cpu, self.queue))
        self.process.start()

    def running(self, wait: float = 0.0) -> bool:
        """Whether the load still runs, after waiting up to ``wait`` seconds for it to end."""
        self.process.join(wait)
        return self.process.is_alive()

    def result(self) -> dict:
        """The load's counts, once it has ended (an error if it died without them)."""
        self.process.join()
        try:
            return self.queue.get(timeout=30)
        except Empty:
            raise RuntimeError(f"load generator exited with code {self.process.exitcode} and no result") from None

    def stop(self) -> None:
        """End the load early (after an error): the child and the sending processes it started."""
        if not self.process.is_alive():
            return
        try:
            procs = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()


def _refused(load: dict) -> str:
    """Refused requests by gRPC code, e.g. "UNAVAILABLE=3", or "-"."""
    refused = [f"{k.removeprefix('refused_')}={v}" for k, v in sorted(load.items()) if k.startswith("refused_")]
    return " ".join(refused) or "-"


