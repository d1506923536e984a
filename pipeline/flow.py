"""The telepipe dataflow, top to bottom.

    read batches (spool or recording), joining parent/child spans across services
      -> preaggregate on numpy: per (service, window) span aggregates with a row per
         (operation, kind), and the service's instances; per (service, window) log counts
         and metric points
      -> key by service -> per-service state (pipeline/service.py):
           event-time windows of every operation, closing together (cardinality limit),
           with the latest value of each of the service's metric series
           -> anomaly detection and alerts -> scaling signal
      -> every service's window summary -> one incident tracker: alerts on linked
         services grouped, root causes ranked
    database calls in span batches (read partition, next to the join): statements counted,
      slow queries and N+1 findings -> the outputs below
      -> window results, anomaly/scaling updates -> /metrics state
         window results, alert, scaling and incident events, findings -> --emit-jsonl file
         scaling updates of every service -> the KEDA process
         alert, scaling and incident events, findings -> Loki (when configured)
    log batches -> Loki (when configured)

Stateful logic lives in plain classes (``pipeline/windows.py``, ``anomaly.py``,
``scaling.py``, ``servicegraph.py``, gathered per service in ``service.py``); the
bytewax steps that wrap them are in ``pipeline/steps.py``. No step reads the wall
clock: the idle timer uses the injected ``clock``, and replay turns idle closing off
so that output depends on the recording alone. Steps that touch input data run each
item through ``DeadLetters``: a poison record is set aside, not crash-looped on, and
a step that changes state is never retried (pipeline/deadletter.py). The flow counts
its own progress (spans and windows processed, late and expired items) in
``SelfMetrics``, whatever sinks are attached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource
from bytewax.outputs import Sink

from pipeline.config import Config
from pipeline.db_analysis import DbCalls, Finding
from pipeline.deadletter import DeadLetters
from pipeline.exceptions import ExceptionCounts
from pipeline.graph_calls import GraphCalls
from pipeline.incident_model import IncidentEvent, ServiceSummary
from pipeline.metric_model import LateMetrics, MetricBatch, MetricPoints
from pipeline.model import (
    OVERFLOW_OPERATION,
    AlertEvent,
    EdgePartial,
    KeyExpired,
    LateEdges,
    LateLogs,
    LateSpans,
    LogBatch,
    ScalingEvent,
    ScalingUpdate,
    ServiceExpired,
    SpanBatch,
    TemplatedSpans,
    WindowResult,
)
from pipeline.preaggregate import WindowSpec, preaggregate, preaggregate_logs, preaggregate_metrics
from pipeline.selfmetrics import SelfMetrics
from pipeline.steps import IncidentStep, JoinedSource, ServiceStep

Clock = Callable[[], float]  # seconds since the epoch


@dataclass
class Outputs:
    """Where the flow's streams go.

    ``result_sinks`` get every item the per-service step emits (``WindowResult``,
    ``LateSpans``, ``AnomalyUpdate``, ``AlertEvent``, ``ScalingUpdate``,
    ``ScalingEvent``), the ``IncidentEvent`` items and the database analysis's ``DbCalls`` and
    ``Finding`` items; ``file_sinks`` get the same keyed as ``("results", item)``;
    ``loki_sinks`` get ``LogBatch`` items and the alert, scaling and incident events and findings;
    ``scaling_sinks`` get every ``ScalingUpdate`` keyed as ``("scaling", item)`` (one
    partition: the process serving KEDA sees every service).
    """

    result_sinks: list[Sink] = field(default_factory=list)
    file_sinks: list[Sink] = field(default_factory=list)
    loki_sinks: list[Sink] = field(default_factory=list)
    scaling_sinks: list[Sink] = field(default_factory=list)


def _partials(spec: WindowSpec, dead: DeadLetters):
    def split(item: SpanBatch | LogBatch | MetricBatch | EdgePartial) -> list:
        if isinstance(item, SpanBatch):
            return preaggregate(item, spec)
        if isinstance(item, LogBatch):
            return preaggregate_logs(item, spec, item.step)
        if isinstance(item, MetricBatch):
            return preaggregate_metrics(item, spec, item.step)
        return [item]  # an EdgePartial is already an aggregate; a Tick goes as it is

    return lambda item: dead.run("preaggregate", split, item) or []


def _progress_counter(metrics: SelfMetrics):
    """What the flow has done, counted where it happens (not by a sink: replay's summary and
    /metrics agree whatever sinks are attached)."""
    late = {LateSpans: "late_spans", LateLogs: "late_logs", LateEdges: "late_edges", LateMetrics: "late_metric_points"}
    expired = {KeyExpired: "expired_keys", ServiceExpired: "expired_services"}

    def count(_step: str, item) -> None:
        if isinstance(item, WindowResult):
            metrics.inc("windows_closed", 1)
            metrics.inc("processed_spans", item.count)
            if item.operation == OVERFLOW_OPERATION:
                metrics.inc("overflow_spans", item.count)
        elif isinstance(item, TemplatedSpans):
            metrics.inc("templated_spans", item.count)
        elif isinstance(item, MetricPoints):
            metrics.inc("processed_metric_points", item.processed)
            metrics.inc("overflow_metric_points", item.overflow)
        elif type(item) in late:
            metrics.inc(late[type(item)], item.count)
        elif type(item) in expired:
            metrics.inc(expired[type(item)], 1)

    return count


def _incident_counter(metrics: SelfMetrics):
    open_ids: set[str] = set()

    def count(_step: str, event: IncidentEvent) -> None:
        metrics.inc("incidents", 1, event.state)
        if event.state == "resolved":
            open_ids.discard(event.id)
        else:
            open_ids.add(event.id)
        metrics.set_gauge("incidents_open", len(open_ids))

    return count


def build_flow(
    cfg: Config,
    source: FixedPartitionedSource,
    outputs: Outputs,
    metrics: SelfMetrics,
    *,
    clock: Clock = time.time,
    idle_close: bool = True,
    close_at_eof: bool = True,
    dead_letter_dir: str | None = None,
) -> Dataflow:
    spec = WindowSpec.from_config(cfg.windows, cfg.prometheus.buckets)
    dead = DeadLetters(dead_letter_dir, metrics)
    flow = Dataflow("telepipe")

    # Read batches; the service-graph join runs in the reading partition, in read order,
    # and puts each span batch's cross-service calls (EdgePartial) right after it.
    # Counts made there go straight to the outputs: the service graph's requests per (client,
    # server) (GraphCalls: graph_calls.py), the database analysis's calls and findings (DbCalls,
    # Finding: db_analysis.py), and the exceptions of span events (ExceptionCounts: exceptions.py).
    sg = cfg.servicegraph
    db = (cfg.db, cfg.prometheus.buckets) if cfg.db.enabled else None
    joined = JoinedSource(source, sg.sample_one_in, int(sg.ttl_s * 1e9), spec.length_ns, dead, db,
                          cfg.prometheus.buckets)  # fmt: skip
    read = op.input("read", flow, joined)
    analytics = DbCalls | Finding | GraphCalls | ExceptionCounts
    read_counts = op.filter("read_counts", read, lambda x: isinstance(x, analytics))
    batches = op.filter("batches", read, lambda x: not isinstance(x, analytics))

    # One aggregate per (service, window) per batch (a row per operation and kind, so a batch
    # touching thousands of operations is still a few items), and per-service log counts:
    # the only per-span (and per-record) work, on numpy.
    partials = op.flat_map("preaggregate", batches, _partials(spec, dead))
    by_service = op.key_on("key_by_service", partials, lambda p: p.service)
    per_service = op.stateful(
        "services", by_service, lambda resume: ServiceStep(cfg, spec, clock, idle_close, close_at_eof, dead, resume)
    )
    # Window results, late counts, anomaly and scaling updates and events, per service in order.
    per_service_out = op.key_rm("unkey", per_service)
    op.inspect("count_progress", per_service_out, _progress_counter(metrics))

    # Incidents: every service's window summary, to one tracker that groups alerts on linked
    # services and ranks root causes (pipeline/incidents.py).
    summaries = op.filter("summaries", per_service_out, lambda x: isinstance(x, ServiceSummary | ServiceExpired))
    to_tracker = op.key_on("key_for_incidents", summaries, lambda _: "incidents")
    incidents = op.key_rm("incidents_out", op.stateful(
        "incidents", to_tracker, lambda resume: IncidentStep(spec, clock, idle_close, close_at_eof, resume)
    ))  # fmt: skip
    op.inspect("count_incidents", incidents, _incident_counter(metrics))
    others = op.filter("not_summaries", per_service_out, lambda x: not isinstance(x, ServiceSummary))
    results = op.merge("results_and_incidents", others, incidents, read_counts)

    for i, sink in enumerate(outputs.result_sinks):
        op.output(f"results_out_{i}", results, sink)
    if outputs.file_sinks:
        keyed = op.key_on("key_for_file", results, lambda _: "results")
        for i, sink in enumerate(outputs.file_sinks):
            op.output(f"file_out_{i}", keyed, sink)

    if outputs.scaling_sinks:
        # Every service's scaling signal, to the one process that serves KEDA.
        updates = op.filter("scaling_updates", results, lambda x: isinstance(x, ScalingUpdate | ServiceExpired))
        to_keda = op.key_on("key_for_scaling", updates, lambda _: "scaling")
        for i, sink in enumerate(outputs.scaling_sinks):
            op.output(f"scaling_out_{i}", to_keda, sink)

    # Logs: counted, then shipped with the events.
    logs = op.filter("logs", batches, lambda b: isinstance(b, LogBatch))

    def count_logs(_step: str, batch: LogBatch) -> None:
        metrics.inc("processed_logs", len(batch))

    op.inspect("count_logs", logs, count_logs)
    if outputs.loki_sinks:
        events = op.filter(
            "events", results, lambda x: isinstance(x, AlertEvent | ScalingEvent | IncidentEvent | Finding)
        )
        to_loki = op.merge("logs_and_events", logs, events)
        for i, sink in enumerate(outputs.loki_sinks):
            op.output(f"loki_out_{i}", to_loki, sink)
    return flow


__all__ = ["Outputs", "build_flow"]
