"""Shared fixtures: recordings, free ports, a running daemon process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
RECORDINGS = ROOT.parent / "shared" / "data" / "recordings"
ONLINEBOUTIQUE = RECORDINGS / "onlineboutique-normal.otlp.jsonl"
TRAINTICKET = RECORDINGS / "trainticket-normal.otlp.jsonl"
ZIPKIN = RECORDINGS / "zipkin-captures.otlp.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


def samples(text: str) -> dict:
    """A /metrics page as {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, lb), v in samples(text).items() if n == name and set(labels.items()) <= set(lb))


def wait_for(predicate, timeout: float = 30.0):
    """The first truthy value of ``predicate()``, polled every 0.2 s; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


class DaemonProc:
    """``telepipe run`` as a real subprocess on free loopback ports."""

    def __init__(self, tmp: Path, config_text: str = "", extra_args: list[str] | None = None) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.otlp_http_port = free_port()
        self.data_dir = tmp / "data"
        cfg = tmp / "telepipe.toml"
        cfg.write_text(config_text)
        args = [
            sys.executable, "-m", "telepipe.cli", "run", "--config", str(cfg),
            "--otlp-grpc", f"127.0.0.1:{self.grpc_port}", "--http", f"127.0.0.1:{self.http_port}",
            "--otlp-http", f"127.0.0.1:{self.otlp_http_port}",
            "--data-dir", str(self.data_dir), *(extra_args or []),
        ]  # fmt: skip
        self.args = args
        self.logs: list[str] = []
        self.start()

    def start(self) -> None:
        """Start (again) on the same ports and data dir."""
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ)
        )
        wait_http(self.url("/readyz"), proc=self.proc)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.logs.append(self.proc.stderr.read().decode())

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def metrics_text(self) -> str:
        return httpx.get(self.url("/metrics"), timeout=5).text

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read().decode()


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[DaemonProc] = []

    def start(config_text: str = "", extra_args: list[str] | None = None) -> DaemonProc:
        d = DaemonProc(tmp_path, config_text, extra_args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="session", autouse=True)
def numba_compiled():
    """Compile the numba code once, in this process, before any test starts a daemon
    (each would otherwise compile it itself on a fresh clone: ~15 s; later loads use the cache)."""
    from pipeline import compiled

    compiled.warm()
