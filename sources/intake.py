"""What every OTLP receiver does with a request, whatever the transport: guards, decode,
clock check, tenant limit, spool append (acknowledged = appended), counters.

``Intake.take`` returns an ``Outcome``: accepted with its ``Decoded`` (the transport
answers with ``partial_success`` from it), or refused with a ``reason`` the transport
maps to its own answer (gRPC status, HTTP status):

- ``unauthenticated``: the bearer token is missing or wrong (checked before decoding);
- ``memory``, ``spool_budget``, ``spool_append``: retry later (``retry_after_s``);
- ``tenant_rate``: the tenant is over its ingest rate, retry after ``retry_after_s``;
- ``invalid``: the request is malformed (``message`` says why); never retried.

Counters: ``received_{x}``, ``accepted_{x}``, ``rejected_{x}{reason}`` (``x`` is ``spans``,
``logs`` or ``metric_points``) and ``refused_requests{reason}``; the transport counts
``requests{signal, code}`` with its own code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from pipeline import batch_codec
from pipeline.decode import Decoded, MalformedRequest, accept_times
from pipeline.selfmetrics import SelfMetrics
from sources.guards import BearerAuth, MemoryGuard, TenantLimiter
from sources.spool import Spool, SpoolFull

log = logging.getLogger("telepipe.otlp")

# signal (the ``requests`` label) -> what its items are called in the item counters
ITEMS = {"spans": "spans", "logs": "logs", "metrics": "metric_points"}

Metadata = Callable[[], tuple]  # -> ((key, value), ...): the bearer token header, the tenant key
Decode = Callable[[bytes], Decoded]

UNAUTHENTICATED = "unauthenticated"
MEMORY = "memory"
SPOOL_BUDGET = "spool_budget"
SPOOL_APPEND = "spool_append"
TENANT_RATE = "tenant_rate"
INVALID = "invalid"
RETRY_LATER = (MEMORY, SPOOL_BUDGET, SPOOL_APPEND)


@dataclass(frozen=True)
class Outcome:
    """``decoded`` when accepted; else ``refused`` (one of the reasons above) and ``message``."""

    decoded: Decoded | None = None
    refused: str = ""
    message: str = ""
    retry_after_s: float = 0.0  # tenant_rate: when its tokens will be there; memory/spool: spool.retry_after_ms

    @property
    def ok(self) -> bool:
        return not self.refused


class Intake:
    """The transport-independent part of an OTLP receiver. Thread-safe (the spool and the
    guards lock what they share); ``recorder`` (optional) receives a copy of every accepted batch."""

    def __init__(
        self,
        spool: Spool,
        metrics: SelfMetrics,
        *,
        max_future_s: float,
        retry_after_ms: int = 1000,
        recorder: Spool | None = None,
        auth: BearerAuth | None = None,
        memory: MemoryGuard | None = None,
        tenants: TenantLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.max_future_ns = int(max_future_s * 1e9)
        self.retry_after_ms = retry_after_ms
        self.recorder = recorder
        self.auth = auth
        self.memory = memory
        self.tenants = tenants if tenants is not None and tenants.active else None
        self.clock = clock

    @property
    def needs_metadata(self) -> bool:
        return self.auth is not None or self.tenants is not None

    def take(self, signal: str, body: bytes, decode: Decode, metadata: Metadata) -> Outcome:
        """Guards, then ``ingest``."""
        refused = self.admit(metadata)
        return refused if refused is not None else self.ingest(signal, body, decode, metadata)

    def admit(self, metadata: Metadata) -> Outcome | None:
        """The checks made before the body is looked at: token, memory, spool budget.
        None when the request may go on."""
        if self.auth is not None and not self.auth.allows(metadata()):
            return self._refused(UNAUTHENTICATED, "missing or wrong bearer token")
        if self.memory is not None and self.memory.over():
            return self._refused(MEMORY, "memory over its limit; retry later", self.retry_after_ms / 1000)
        if self.spool.over_budget():
            return self._refused(SPOOL_BUDGET, "spool over its byte budget; retry later", self.retry_after_ms / 1000)
        return None

    def ingest(self, signal: str, body: bytes, decode: Decode, metadata: Metadata) -> Outcome:
        """Decode (already decompressed bytes), clock check, tenant limit, spool append."""
        items = ITEMS[signal]
        try:
            decoded: Decoded = decode(body)
        except MalformedRequest as exc:
            return Outcome(refused=INVALID, message=str(exc))
        except Exception as exc:  # a decoder bug must not become an error clients retry forever
            log.warning("unexpected error decoding a %s request (answered as malformed)", signal, exc_info=True)
            return Outcome(refused=INVALID, message=f"malformed request: {type(exc).__name__}: {exc}")
        decoded = accept_times(decoded, int(self.clock() * 1e9), self.max_future_ns)
        if self.tenants is not None:
            tenant = self.tenants.tenant(metadata())
            wait = self.tenants.wait_for(tenant, decoded.received)
            if wait > 0:
                return self._refused(TENANT_RATE, f"tenant {tenant!r} over its ingest rate", wait)
        self.metrics.inc(f"received_{items}", decoded.received)
        if decoded.batch is not None:
            payload = batch_codec.encode(decoded.batch)
            try:
                self.spool.append(payload)
            except SpoolFull as exc:
                return self._refused(SPOOL_APPEND, str(exc), self.retry_after_ms / 1000)
            if self.recorder is not None:
                try:
                    self.recorder.append(payload)
                except SpoolFull:
                    self.metrics.dropped("recording_full", len(decoded.batch))
            self.metrics.inc(f"accepted_{items}", len(decoded.batch))
        if decoded.rejected - decoded.future:
            self.metrics.inc(f"rejected_{items}", decoded.rejected - decoded.future, "invalid")
        if decoded.future:
            self.metrics.inc(f"rejected_{items}", decoded.future, "future_timestamp")
        return Outcome(decoded=decoded)

    def _refused(self, reason: str, message: str, retry_after_s: float = 0.0) -> Outcome:
        self.metrics.inc("refused_requests", 1, reason)
        return Outcome(refused=reason, message=message, retry_after_s=retry_after_s)


def export_response(signal: str, decoded: Decoded) -> Message:
    """The Export*ServiceResponse for an accepted request. Full success: no ``partial_success``.
    Rejected items: their count and why. Warnings only (items kept but cut down): count 0 and a
    message."""
    resp: Message
    if signal == "spans":
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if decoded.rejected or decoded.message:
            resp.partial_success.rejected_spans = decoded.rejected
            resp.partial_success.error_message = decoded.message
    elif signal == "logs":
        resp = logs_service_pb2.ExportLogsServiceResponse()
        if decoded.rejected or decoded.message:
            resp.partial_success.rejected_log_records = decoded.rejected
            resp.partial_success.error_message = decoded.message
    else:
        resp = metrics_service_pb2.ExportMetricsServiceResponse()
        if decoded.rejected or decoded.message:
            resp.partial_success.rejected_data_points = decoded.rejected
            resp.partial_success.error_message = decoded.message
    return resp
