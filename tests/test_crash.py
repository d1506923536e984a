"""kill -9 under load, three times, restarting on the same data dir: nothing acknowledged is lost.

Pass criterion, per (operation, window): the count telepipe emitted is at least the spans whose
Export returned OK and at most the spans sent (the excess is the client's resends of requests
whose answer it never got); a window emitted more than once always has the same values.
"""

import random
import threading
import time
from collections import defaultdict

import grpc
import orjson
import psutil
import pytest

from .test_decode import trace_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

S = 10**9
OPS = [f"op{i}" for i in range(5)]
CONFIG = """
[windows]
idle_timeout_s = 2.0
[recovery]
snapshot_interval_s = 0.5
"""


class Client(threading.Thread):
    """Sends 40-span requests with advancing event time; retries each until it is acknowledged."""

    def __init__(self, target: str, base_ns: int) -> None:
        super().__init__(daemon=True)
        self.target, self.base = target, base_ns
        self.acked: dict[tuple[str, int], int] = defaultdict(int)
        self.sent: dict[tuple[str, int], int] = defaultdict(int)
        self.stop = threading.Event()
        self.requests = self.resends = 0

    def run(self) -> None:
        channel = grpc.insecure_channel(self.target)
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)  # fmt: skip
        j = 0
        while not self.stop.is_set():
            op = OPS[j % len(OPS)]
            end = self.base + j * 50_000_000 + 1_000_000  # 50 ms per request; never across a window edge
            body = trace_request([{"name": op, "start": end - 1_000_000 - i, "end": end - i,
                                   "span_id": (j * 100 + i + 1).to_bytes(8, "big")} for i in range(40)])  # fmt: skip
            key = (op, end // (10 * S) * 10 * S)
            while True:
                self.sent[key] += 40
                try:
                    export(body, timeout=2)
                    self.acked[key] += 40
                    break
                except grpc.RpcError:
                    self.resends += 1
                    time.sleep(0.05)
            j += 1
            self.requests += 1
        channel.close()


def test_kill9_three_times_loses_nothing_acknowledged(daemon_factory, tmp_path):
    """The client keeps its event time still while it retries, and its gRPC reconnect backs off
    (1 s, 1.6 s, 2.6 s, ...): with the 2 s idle timeout, a restored window could close on the idle
    timer before the resent request came, its spans then (rightly) counted late, not in the window
    (it failed twice in sixteen runs, each time one acknowledged request short, which is what a
    late resend looks like). The idle timeout is longer than a restart here, as in the cluster test
    below and as it should be in production."""
    out = tmp_path / "windows.jsonl"
    d = daemon_factory(CONFIG.replace("idle_timeout_s = 2.0", "idle_timeout_s = 10.0"), ["--emit-jsonl", str(out)])
    client = Client(d.grpc_target, base_ns=(time.time_ns() // (10 * S) - 60) * 10 * S)
    client.start()
    rng = random.Random(20261122)
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 3.0))
        d.kill9()
        d.start()
    time.sleep(rng.uniform(1.0, 2.0))
    client.stop.set()
    client.join(30)
    assert client.requests > 100 and client.resends > 0
    check_nothing_acknowledged_lost(client, out, wait_s=60)


def test_kill9_of_one_cluster_process_loses_nothing_acknowledged(daemon_factory, tmp_path):
    """--processes 2: one member killed, the supervisor stops the other and exits non-zero (as it
    would for systemd or Kubernetes to restart it); the restarted cluster resumes.

    A cluster restart takes longer than one process's (members connect to each other, the
    client's gRPC reconnect backs off), and this client keeps its event time still while it
    retries: windows closed by the 2 s idle timer meanwhile would (rightly) count its spans
    late. The idle timeout here is longer than the outage, as it should be in production."""
    out = tmp_path / "windows.jsonl"
    d = daemon_factory(CONFIG.replace("idle_timeout_s = 2.0", "idle_timeout_s = 15.0"),
                       ["--emit-jsonl", str(out), "--processes", "2"])  # fmt: skip
    client = Client(d.grpc_target, base_ns=(time.time_ns() // (10 * S) - 60) * 10 * S)
    client.start()
    rng = random.Random(20261123)
    for victim in (1, 0):
        time.sleep(rng.uniform(1.5, 3.0))
        for child in psutil.Process(d.proc.pid).children():
            cmd = child.cmdline()
            if cmd[cmd.index("--process-id") + 1] == str(victim):
                child.kill()
        assert d.proc.wait(60) != 0
        d.logs.append(d.proc.stderr.read().decode())
        d.start()
    time.sleep(rng.uniform(1.0, 2.0))
    client.stop.set()
    client.join(30)
    assert client.requests > 50 and client.resends > 0
    check_nothing_acknowledged_lost(client, out, wait_s=90)


def check_nothing_acknowledged_lost(client: Client, out, wait_s: float = 30) -> None:
    def emitted():
        windows = defaultdict(set)
        for line in out.read_bytes().splitlines():
            doc = orjson.loads(line)
            if doc["type"] == "window":
                windows[(doc["operation"], doc["window_start"])].add(line)
        return windows

    deadline = time.monotonic() + wait_s  # windows close the idle timeout after traffic stops
    while time.monotonic() < deadline and set(client.acked) - set(emitted()):
        time.sleep(0.5)
    windows = emitted()
    for key, acked in client.acked.items():
        assert key in windows, key
        assert len(windows[key]) == 1, f"{key} emitted with different values: {windows[key]}"
        count = orjson.loads(next(iter(windows[key])))["count"]
        assert acked <= count <= client.sent[key], (key, acked, count, client.sent[key])
    assert sum(client.acked.values()) >= 40 * 50


def test_spool_segments_are_deleted_once_a_committed_snapshot_passed_them(daemon_factory):
    from telepipe.recovery import CommittedSnapshots

    d = daemon_factory("[spool]\nsegment_bytes = 4096\nbudget_bytes = 10000000\n[recovery]\nsnapshot_interval_s = 0.2\n")
    channel = grpc.insecure_channel(d.grpc_target)
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=None, response_deserializer=None)  # fmt: skip
    now = time.time_ns()
    for j in range(60):  # each request is one ~4 KiB record, so one segment each
        export(trace_request([{"name": "op", "start": now - 10**6, "end": now, "span_id": (j * 100 + i + 1).to_bytes(8, "big")}
                              for i in range(40)]), timeout=5)  # fmt: skip
    channel.close()
    spool = d.data_dir / "spool" / "shard-000"
    committed = CommittedSnapshots(d.data_dir / "recovery")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(list(spool.glob("*.seg"))) > 3:
        time.sleep(0.2)
    remaining = sorted(int(p.stem) for p in spool.glob("*.seg"))
    assert len(remaining) <= 3, remaining
    deadline = time.monotonic() + 10
    while (seg := committed.spool_segment("shard-000")) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # read by a background thread
    committed.close()
    assert seg is not None and seg >= remaining[0]  # nothing the committed snapshot needs is gone


def test_sigterm_keeps_open_windows_across_a_restart(daemon_factory, tmp_path):
    out = tmp_path / "w.jsonl"
    d = daemon_factory("[windows]\nidle_timeout_s = 3.0\n[recovery]\nsnapshot_interval_s = 0.2\n",
                       ["--emit-jsonl", str(out)])  # fmt: skip
    w = (time.time_ns() // (10 * S) - 30) * 10 * S

    def send(first):
        channel = grpc.insecure_channel(d.grpc_target)
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)  # fmt: skip
        export(trace_request([{"name": "op", "start": w + S, "end": w + 2 * S, "span_id": (first + i).to_bytes(8, "big")}
                              for i in range(25)]), timeout=5)  # fmt: skip
        channel.close()

    send(1)
    d.proc.terminate()  # graceful: drain, snapshot with the window still open, exit
    assert d.proc.wait(30) == 0
    assert not out.exists() or b'"window"' not in out.read_bytes()
    d.start()
    send(1000)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (out.exists() and b'"window"' in out.read_bytes()):
        time.sleep(0.2)
    windows = [orjson.loads(x) for x in out.read_bytes().splitlines() if b'"window"' in x]
    assert [(x["window_start"], x["count"]) for x in windows] == [(w, 50)]
