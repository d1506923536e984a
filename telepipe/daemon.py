"""Wiring for ``telepipe run`` and ``telepipe replay``: sources, flow and sinks together.

``Daemon`` owns the long-lived parts (spool, OTLP receivers, HTTP server, Loki client)
and runs the dataflow in the calling thread until ``shutdown()``: the receiver
stops accepting, the source drains what was acknowledged, windows close at EOF,
sinks flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig as BytewaxRecovery
from bytewax.recovery import init_db_dir
from bytewax.testing import cluster_main, run_main
from google.protobuf.internal import api_implementation

from pipeline import compiled
from pipeline.config import Config
from pipeline.decode import decode_limits
from pipeline.flow import Outputs, build_flow
from pipeline.selfmetrics import SelfMetrics
from sinks.jsonl import JsonlSink
from sinks.keda import KedaScaler
from sinks.keda.signals import ScalingSignals
from sinks.keda.sink import SignalsSink
from sinks.loki import LokiClient, LokiSink
from sinks.prometheus import MetricsHttpServer, MetricsSink, SeriesState
from sinks.remote_write import RemoteWriteClient, RemoteWriteSink
from sources.guards import BearerAuth, MemoryGuard, TenantLimiter
from sources.intake import Intake
from sources.otlp_grpc import OtlpReceiver
from sources.otlp_http import OtlpHttpReceiver
from sources.replay import ReplaySource
from sources.spool import Spool
from sources.spool_source import SpoolSource
from telepipe.recovery import CommittedSnapshots

log = logging.getLogger("telepipe")



def shard_name(index: int) -> str:
    return f"shard-{index:03d}"


def local_shards(spool_dir: Path, process_id: int, processes: int) -> list[str]:
    """The spool shards process ``process_id`` of ``processes`` reads: its own, plus any shard
    left by a larger cluster (index >= processes) whose index % processes is ours, so that
    acknowledged data survives scaling down."""
    own = shard_name(process_id)
    left = []
    if spool_dir.is_dir():
        for p in sorted(spool_dir.iterdir()):
            name = p.name
            if name.startswith("shard-") and name[6:].isdigit():
                index = int(name[6:])
                if index >= processes and index % processes == process_id:
                    left.append(name)
    return [own, *left]


def init_recovery(db: Path) -> None:
    """Create bytewax's recovery partition once (the ``--processes`` supervisor does it before
    starting its children, so they never race for it)."""
    if not db.exists() or not any(db.iterdir()):
        db.mkdir(parents=True, exist_ok=True)
        init_db_dir(db, 1)


def await_recovery(db: Path, timeout_s: float = 120.0) -> None:
    """Members of a cluster started one by one (``--process-id``/``--addresses``, e.g. a
    StatefulSet sharing the recovery volume): process 0 creates the partition, the others
    wait for it instead of racing to create it too."""
    deadline = time.monotonic() + timeout_s
    while not any(db.glob("part-*.sqlite3")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no bytewax recovery partition appeared in {db} (process 0 creates it)")
        time.sleep(0.5)


def protobuf_backend() -> str:
    return api_implementation.Type()


def check_protobuf_backend() -> None:
    """upb is required: the pure-Python backend is ~10x slower and has recursion CVEs."""
    backend = protobuf_backend()
    if backend != "upb":
        raise RuntimeError(
            f"protobuf backend is {backend!r}, telepipe needs 'upb' "
            "(unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION and install protobuf>=4.21 wheels)"
        )


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Daemon:
    """``telepipe run``: OTLP in, spool, dataflow, /metrics and Loki out."""

    def __init__(
        self, cfg: Config, *, clock=time.time, process_id: int = 0, addresses: list[str] | None = None
    ) -> None:
        """``addresses``: every process of a cluster (``host:port`` for bytewax), this one at
        ``process_id``; None for a single process."""
        check_protobuf_backend()
        self.cfg = cfg
        self.process_id = process_id
        self.addresses = addresses
        processes = len(addresses) if addresses else 1
        self.metrics = SelfMetrics()
        data_dir = Path(cfg.spool.data_dir)
        sp = cfg.spool
        spools = {
            shard: Spool(
                data_dir / "spool" / shard,
                segment_bytes=sp.segment_bytes,
                budget_bytes=sp.budget_bytes,
                fsync=sp.fsync,
                fsync_interval_ms=sp.fsync_interval_ms,
                metrics=self.metrics,
            )
            for shard in local_shards(data_dir / "spool", process_id, processes)
        }
        self.spool = spools[shard_name(process_id)]  # the one this process's receiver appends to
        self.spools = spools
        self.recorder = None
        if cfg.output.record_dir:
            self.recorder = Spool(
                cfg.output.record_dir, segment_bytes=sp.segment_bytes, budget_bytes=2**62, fsync="never",
                metrics=SelfMetrics(),
            )  # fmt: skip
        self.series = SeriesState(cfg.prometheus.buckets, self.metrics, cfg.prometheus.stale_after_s, clock)
        self.stop_event = threading.Event()
        # One intake for both transports: one tenant table, one memory guard, one spool.
        self.intake = Intake(
            self.spool, self.metrics, max_future_s=cfg.otlp.max_future_s, retry_after_ms=sp.retry_after_ms,
            recorder=self.recorder, auth=BearerAuth.from_config(cfg.auth),
            memory=MemoryGuard(cfg.limits.max_rss_bytes), tenants=TenantLimiter(cfg.limits), clock=clock,
        )  # fmt: skip
        limits = decode_limits(cfg)
        self.receiver = OtlpReceiver(
            cfg.otlp, self.spool, self.metrics, tls=cfg.tls, reuse_port=processes > 1, intake=self.intake,
            limits=limits,
        )  # fmt: skip
        self.http_receiver = (
            OtlpHttpReceiver(cfg.otlp_http, cfg.otlp, self.intake, self.metrics, tls=cfg.tls,
                             reuse_port=processes > 1, limits=limits)  # fmt: skip
            if cfg.otlp_http.listen
            else None
        )
        host, port = _host_port(cfg.http.listen)
        self.http = MetricsHttpServer(host, port, self.series.render, self.ready)
        self.loki = LokiClient(cfg.loki, self.metrics) if cfg.loki.url else None
        # Scaling signals of every service and the KEDA server live on process 0.
        first = process_id == 0
        self.signals = ScalingSignals(stale_after_s=cfg.prometheus.service_stale_after_s)
        self.keda = (
            KedaScaler(cfg.keda.listen, self.signals.lookup, max_streams=cfg.keda.max_streams)
            if cfg.keda.listen and first
            else None
        )
        outputs = Outputs(result_sinks=[MetricsSink(self.series)], scaling_sinks=[SignalsSink(self.signals, first)])
        if cfg.output.emit_jsonl:
            outputs.file_sinks.append(JsonlSink(cfg.output.emit_jsonl, owner=first))
        if self.loki is not None:
            outputs.loki_sinks.append(LokiSink(self.loki))
        self.remote_write = RemoteWriteClient(cfg.remote_write, self.metrics) if cfg.remote_write.url else None
        if self.remote_write is not None:
            outputs.result_sinks.append(RemoteWriteSink(self.remote_write))
        rec = cfg.recovery
        self.recovery = None
        self.committed: CommittedSnapshots | None = None
        if rec.enabled:
            db = data_dir / "recovery"
            if process_id == 0 or not addresses:
                init_recovery(db)
            else:
                await_recovery(db)
            self.recovery = BytewaxRecovery(db, backup_interval=timedelta(seconds=rec.backup_interval_s))
            self.committed = CommittedSnapshots(db, metrics=self.metrics)
        self.source = SpoolSource(
            spools, stop=self.stop_event, committed=self.committed.spool_segment if self.committed else None,
            keep_for=timedelta(seconds=rec.backup_interval_s),
        )  # fmt: skip
        source = self.source
        self.flow = build_flow(
            cfg, source, outputs, self.metrics, clock=clock, close_at_eof=not rec.enabled,
            dead_letter_dir=str(data_dir / "deadletter"),
        )  # fmt: skip
        self._started = False
        self._shutdown_lock = threading.Lock()

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if self.stop_event.is_set():
            return False, "shutting down"
        if self.spool.over_budget():
            return False, "spool over its byte budget"
        unread, still_s = self.source.progress()
        if unread and still_s > self.cfg.http.ready_stall_s:
            return False, f"dataflow stalled: nothing read for {still_s:.0f} s with {unread} bytes waiting in the spool"
        return True, "ready"

    def run(self) -> None:
        """Serve until ``shutdown()``; returns after the drain."""
        self.http.start()
        if self.keda is not None:
            self.keda.start()
        seconds = compiled.warm()  # before OTLP is accepted: a first request must not wait for it
        if seconds > 1.0:
            log.info("compiled the span wire reader and span index in %.1f s (cached for the next start)", seconds)
        self.receiver.start()
        if self.http_receiver is not None:
            self.http_receiver.start()
        self._started = True
        log.info(
            "telepipe running: OTLP gRPC %s, OTLP/HTTP %s, HTTP %s, data dir %s, spool shards %s%s",
            self.cfg.otlp.grpc_listen, self.cfg.otlp_http.listen or "off", self.cfg.http.listen,
            self.cfg.spool.data_dir, ", ".join(self.spools),
            f", process {self.process_id} of {len(self.addresses)}" if self.addresses else "",
        )  # fmt: skip
        epoch = timedelta(seconds=self.cfg.recovery.snapshot_interval_s)
        try:
            if self.addresses:
                cluster_main(
                    self.flow, self.addresses, self.process_id, epoch_interval=epoch, recovery_config=self.recovery
                )
            else:
                run_main(self.flow, epoch_interval=epoch, recovery_config=self.recovery)
        finally:
            self.shutdown()
            if self.loki is not None:
                self.loki.close(timeout=10.0)
            if self.remote_write is not None:
                self.remote_write.close(timeout=10.0)
            for spool in self.spools.values():
                spool.close()
            if self.recorder is not None:
                self.recorder.close()
            if self.keda is not None:
                self.keda.stop()
            if self.committed is not None:
                self.committed.close()
            self.http.stop()
            log.info("telepipe stopped")

    def shutdown(self) -> None:
        """Stop accepting, then let the source drain and end the flow."""
        with self._shutdown_lock:
            if self.stop_event.is_set():
                return
            # Both receivers stop accepting and finish what is in flight (acknowledged =
            # appended) before the source is told to drain the spool.
            if self.http_receiver is not None:
                self.http_receiver.stop()
            self.receiver.stop(self.cfg.otlp.shutdown_grace_s)
            self.stop_event.set()


@dataclass
class ReplaySummary:
    spans: int = 0
    windows: int = 0
    late: int = 0
    seconds: float = 0.0


def replay(
    cfg: Config,
    paths: Sequence[str | Path],
    *,
    speed: float | None = None,
    emit_jsonl: str | None = None,
    progress: bool = False,
    extra_outputs: Outputs | None = None,
    process_id: int = 0,
    addresses: list[str] | None = None,
) -> tuple[ReplaySummary, SelfMetrics]:
    """Run the dataflow over recordings until they end (closing every window).

    In a cluster (``addresses``) every process lists every recording; bytewax reads each
    in one of them, and the summary counts what this process's windows saw."""
    check_protobuf_backend()
    metrics = SelfMetrics()
    limits = decode_limits(cfg)
    source = ReplaySource(paths, speed=speed, metrics=metrics, limits=limits)
    series = SeriesState(cfg.prometheus.buckets, metrics, stale_after_s=float("inf"))
    outputs = extra_outputs or Outputs()
    outputs.result_sinks.append(MetricsSink(series))
    if emit_jsonl:
        outputs.file_sinks.append(JsonlSink(emit_jsonl, owner=process_id == 0, ordered=True))
    loki = LokiClient(cfg.loki, metrics) if cfg.loki.url else None
    if loki is not None:
        outputs.loki_sinks.append(LokiSink(loki))
    flow = build_flow(cfg, source, outputs, metrics, idle_close=False)
    stop = threading.Event()
    reporter = None
    if progress:
        reporter = threading.Thread(target=_report_progress, args=(metrics, stop), daemon=True)
        reporter.start()
    t0 = time.perf_counter()
    try:
        if addresses:
            cluster_main(flow, addresses, process_id)
        else:
            run_main(flow)
    finally:
        stop.set()
        if loki is not None:
            loki.close(timeout=30.0)
    summary = ReplaySummary(
        spans=int(metrics.counter("processed_spans")),
        windows=int(metrics.counter("windows_closed")),
        late=int(metrics.counter("late_spans")),
        seconds=time.perf_counter() - t0,
    )
    return summary, metrics


def _report_progress(metrics: SelfMetrics, stop: threading.Event) -> None:
    import sys

    t0 = time.perf_counter()
    while not stop.wait(1.0):
        spans = metrics.counter("processed_spans")
        print(
            f"replay: {int(spans)} spans in closed windows, {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
