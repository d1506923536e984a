"""The telepipe dataflow, top to bottom.

    read batches (spool or recording)
      -> preaggregate on numpy: per (service, operation, kind, window) span aggregates,
         per (service, window) log counts and instance sets
      -> key by service -> service windows (cardinality limit, event-time windows of
         every operation of the service, closing together)
      -> window results -> /metrics state, --emit-jsonl file
    log batches -> Loki (when configured)

Stateful logic lives in plain classes (``pipeline/windows.py``); the bytewax
steps here only wrap them. No step reads the wall clock: the idle timer uses
the injected ``clock``, and replay turns idle closing off so that output depends
on the recording alone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulLogic
from bytewax.outputs import Sink

from pipeline.config import Config
from pipeline.model import LateSpans, LogBatch, ServiceWindow, SpanBatch, WindowResult
from pipeline.selfmetrics import SelfMetrics
from pipeline.windows import ServiceWindows, WindowSpec, instance_sets, preaggregate, preaggregate_logs

Clock = Callable[[], float]  # seconds since the epoch


@dataclass
class Outputs:
    """Where the flow's streams go. Window sinks get ``WindowResult | LateSpans`` items;
    keyed window sinks get them as ``("results", item)``; log sinks get ``LogBatch``."""

    window_sinks: list[Sink] = field(default_factory=list)
    keyed_window_sinks: list[Sink] = field(default_factory=list)
    log_sinks: list[Sink] = field(default_factory=list)


class _ServiceStep(StatefulLogic[object, object, ServiceWindows]):
    """bytewax wrapper of ``ServiceWindows`` for one service."""

    def __init__(self, cfg: Config, spec: WindowSpec, clock: Clock, idle: bool, resume) -> None:
        self.cfg, self.spec, self.clock, self.idle = cfg, spec, clock, idle
        self.state: ServiceWindows | None = resume

    def on_item(self, value):
        if self.state is None:
            self.state = ServiceWindows(
                value.service,
                self.spec,
                self.cfg.windows.max_operations_per_service,
                int(self.cfg.prometheus.stale_after_s * 1e9),
            )
        return _flatten(self.state.on_item(value, self.clock())), StatefulLogic.RETAIN

    def on_notify(self):
        return _flatten(self.state.on_idle(self.clock())), StatefulLogic.RETAIN

    def on_eof(self):
        return _flatten(self.state.close_all()), StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        deadline = self.state.idle_deadline() if (self.idle and self.state) else None
        return None if deadline is None else datetime.fromtimestamp(deadline, timezone.utc)

    def snapshot(self) -> ServiceWindows:
        return copy.deepcopy(self.state)


def _flatten(closed: list) -> list:
    """Closed service windows -> their per-operation results, then the service window."""
    out = []
    for item in closed:
        if isinstance(item, ServiceWindow):
            out.extend(item.results)
        out.append(item)
    return out


def _partials(spec: WindowSpec):
    def split(batch: SpanBatch | LogBatch) -> list:
        if isinstance(batch, SpanBatch):
            return [*preaggregate(batch, spec), *instance_sets(batch, spec)]
        return preaggregate_logs(batch, spec, batch.step)

    return split


def build_flow(
    cfg: Config,
    source: Source,
    outputs: Outputs,
    metrics: SelfMetrics,
    *,
    clock: Clock = time.time,
    idle_close: bool = True,
) -> Dataflow:
    spec = WindowSpec.from_config(cfg.windows, cfg.prometheus.buckets)
    flow = Dataflow("telepipe")

    batches = op.input("read", flow, source)

    # One small aggregate per (service, operation, kind, window) per batch, plus per-service
    # log counts and instance sets: the only per-span (and per-record) work, on numpy.
    partials = op.flat_map("preaggregate", batches, _partials(spec))
    by_service = op.key_on("key_by_service", partials, lambda p: p.service)
    closed = op.stateful(
        "service_windows", by_service, lambda resume: _ServiceStep(cfg, spec, clock, idle_close, resume)
    )
    results = op.filter("window_results", op.key_rm("unkey", closed), lambda x: not isinstance(x, ServiceWindow))

    for i, sink in enumerate(outputs.window_sinks):
        op.output(f"window_out_{i}", results, sink)
    if outputs.keyed_window_sinks:
        keyed = op.key_on("key_for_file", results, lambda _: "results")
        for i, sink in enumerate(outputs.keyed_window_sinks):
            op.output(f"window_file_{i}", keyed, sink)

    # Logs: counted, then shipped.
    logs = op.filter("logs", batches, lambda b: isinstance(b, LogBatch))

    def count_logs(_step: str, batch: LogBatch) -> None:
        metrics.inc("processed_logs", len(batch))

    op.inspect("count_logs", logs, count_logs)
    for i, sink in enumerate(outputs.log_sinks):
        op.output(f"log_out_{i}", logs, sink)
    return flow


__all__ = ["Outputs", "build_flow", "WindowResult", "LateSpans"]
