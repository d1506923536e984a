"""The telepipe dataflow, top to bottom.

    read batches (spool or recording)
      -> split spans / logs
      spans -> preaggregate per (service, operation, kind, window) on numpy
            -> key by service -> cardinality limit (excess operations -> overflow series)
            -> key by (service, operation, kind) -> event-time windows
            -> window results -> /metrics state, --emit-jsonl file
      logs  -> Loki (when configured)

Stateful logic lives in plain classes (``pipeline/windows.py``); the bytewax
steps here only wrap them. No step reads the wall clock: the idle timer uses
the injected ``clock``, and replay turns idle closing off so that output depends
on the recording alone.
"""

from __future__ import annotations

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
from pipeline.model import LateSpans, LogBatch, SpanBatch, WindowResult
from pipeline.selfmetrics import SelfMetrics
from pipeline.windows import CardinalityLimiter, KeyWindows, Partial, WindowSpec, preaggregate

Clock = Callable[[], float]  # seconds since the epoch


@dataclass
class Outputs:
    """Where the flow's streams go. Window sinks get ``WindowResult | LateSpans`` items;
    keyed window sinks get them as ``("results", item)``; log sinks get ``LogBatch``."""

    window_sinks: list[Sink] = field(default_factory=list)
    keyed_window_sinks: list[Sink] = field(default_factory=list)
    log_sinks: list[Sink] = field(default_factory=list)


class _WindowStep(StatefulLogic[Partial, WindowResult | LateSpans, KeyWindows]):
    """bytewax wrapper of ``KeyWindows`` for one key."""

    def __init__(self, spec: WindowSpec, clock: Clock, idle: bool, resume: KeyWindows | None) -> None:
        self.spec, self.clock, self.idle = spec, clock, idle
        self.state = resume

    def on_item(self, value: Partial):
        if self.state is None:
            self.state = KeyWindows(value.service, value.operation, value.span_kind, self.spec)
        return self.state.on_partial(value, self.clock()), StatefulLogic.RETAIN

    def on_notify(self):
        return self.state.on_idle(self.clock()), StatefulLogic.RETAIN

    def on_eof(self):
        return self.state.close_all(), StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        deadline = self.state.idle_deadline() if (self.idle and self.state) else None
        return None if deadline is None else datetime.fromtimestamp(deadline, timezone.utc)

    def snapshot(self) -> KeyWindows:
        return self.state


def _limit_step(limit: int, expire_ns: int):
    def step(state: CardinalityLimiter | None, p: Partial):
        state = state or CardinalityLimiter(limit, expire_ns)
        return state, state.admit(p)

    return step


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
    signals = op.branch("split_signals", batches, lambda b: isinstance(b, SpanBatch))
    spans, logs = signals.trues, signals.falses

    # Spans: one small aggregate per (key, window) per batch; the only per-span work.
    partials = op.flat_map("preaggregate", spans, lambda b: preaggregate(b, spec))
    by_service = op.key_on("key_by_service", partials, lambda p: p.service)
    expire_ns = int(cfg.prometheus.stale_after_s * 1e9)
    limited = op.stateful_map(
        "cardinality_limit", by_service, _limit_step(cfg.windows.max_operations_per_service, expire_ns)
    )
    by_key = op.key_on("key_by_operation", op.key_rm("unkey_service", limited), lambda p: p.key())
    windowed = op.stateful("windows", by_key, lambda resume: _WindowStep(spec, clock, idle_close, resume))
    results = op.key_rm("window_results", windowed)

    for i, sink in enumerate(outputs.window_sinks):
        op.output(f"window_out_{i}", results, sink)
    if outputs.keyed_window_sinks:
        keyed = op.key_on("key_for_file", results, lambda _: "results")
        for i, sink in enumerate(outputs.keyed_window_sinks):
            op.output(f"window_file_{i}", keyed, sink)

    # Logs: counted, then shipped.
    def count_logs(_step: str, batch: LogBatch) -> None:
        metrics.inc("processed_logs", len(batch))

    op.inspect("count_logs", logs, count_logs)
    for i, sink in enumerate(outputs.log_sinks):
        op.output(f"log_out_{i}", logs, sink)
    return flow


__all__ = ["Outputs", "build_flow", "WindowResult", "LateSpans"]
