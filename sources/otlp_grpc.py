"""OTLP/gRPC receiver: TraceService/Export, LogsService/Export and MetricsService/Export.

grpcio hands us raw request bytes (no deserializer), so every answer is ours:

- malformed protobuf -> INVALID_ARGUMENT (grpcio's own deserializer would say INTERNAL);
- some spans/log records/data points invalid -> OK with ``partial_success`` (count and reason),
  the valid rest is processed; items ending more than ``otlp.max_future_s`` after the
  receiver's clock are rejected the same way (``rejected{reason="future_timestamp"}``),
  and every accepted batch is stamped with its acceptance time, so no client's clock can
  move event time past the receiver's (``pipeline/model.progress_ns``);
- empty request -> OK without ``partial_success``;
- over ``max_message_bytes`` after decompression -> RESOURCE_EXHAUSTED (grpcio enforces
  it before inflating further); gzip is accepted;
- wrong or missing bearer token (when tokens are configured) -> UNAUTHENTICATED, before decoding;
- spool over its budget, disk full, memory over its limit -> UNAVAILABLE with
  ``google.rpc.RetryInfo`` (clients retry);
- a tenant over its ingest rate -> RESOURCE_EXHAUSTED with RetryInfo;
- OK only after the decoded batch was appended to the spool.

Everything but the transport (guards, decode, clock check, tenant limit, append, counters)
is ``sources/intake.py``, shared with the OTLP/HTTP receiver.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pipeline.config import OtlpConfig, TlsConfig
from pipeline.decode import DecodeLimits, decode_logs, decode_metrics, decode_traces
from pipeline.selfmetrics import SelfMetrics
from sources import intake
from sources.guards import BearerAuth, MemoryGuard, TenantLimiter
from sources.intake import Intake
from sources.spool import Spool

log = logging.getLogger("telepipe.otlp")

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
LOGS_SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


def retry_status(code: int, message: str, retry_ms: int) -> grpc.Status:
    """A gRPC status carrying RetryInfo, so OTLP clients retry after ``retry_ms``."""
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=retry_ms // 1000, nanos=(retry_ms % 1000) * 1_000_000)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


def grpc_options(cfg: OtlpConfig, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Server options: message size limit, keepalive enforcement, connection age.

    SO_REUSEPORT only when asked (``--processes N``: every process binds the OTLP port and
    the kernel spreads connections over them); otherwise a second daemon on the same
    port fails to start instead of silently sharing it.
    """
    ms = lambda s: int(s * 1000)  # noqa: E731
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_time_ms", ms(cfg.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(cfg.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if cfg.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", ms(cfg.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(cfg.max_connection_age_grace_s)),
        ]
    return options


class OtlpReceiver:
    """The gRPC server. ``recorder`` (optional) receives a copy of every accepted batch."""

    def __init__(
        self,
        cfg: OtlpConfig,
        spool: Spool,
        metrics: SelfMetrics,
        *,
        retry_after_ms: int = 1000,
        recorder: Spool | None = None,
        auth: BearerAuth | None = None,
        memory: MemoryGuard | None = None,
        tenants: TenantLimiter | None = None,
        tls: TlsConfig | None = None,
        reuse_port: bool = False,
        clock: Callable[[], float] = time.time,
        intake: Intake | None = None,
        limits: DecodeLimits | None = None,
    ) -> None:
        """``intake``: shared with the OTLP/HTTP receiver (one tenant table, one spool); made
        here from the other arguments when not given."""
        self.cfg = cfg
        self.metrics = metrics
        self.intake = intake or Intake(
            spool, metrics, max_future_s=cfg.max_future_s, retry_after_ms=retry_after_ms, recorder=recorder,
            auth=auth, memory=memory, tenants=tenants, clock=clock,
        )  # fmt: skip
        self.limits = limits or DecodeLimits(cfg.max_log_attributes, cfg.max_attribute_value_bytes)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.server_threads, thread_name_prefix="otlp"),
            options=grpc_options(cfg, reuse_port),
        )
        raw = dict(request_deserializer=None, response_serializer=None)
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    TRACE_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self.export_traces, **raw)}
                ),
                grpc.method_handlers_generic_handler(
                    LOGS_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self.export_logs, **raw)}
                ),
                grpc.method_handlers_generic_handler(
                    METRICS_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self.export_metrics, **raw)}
                ),
            )
        )
        if tls is not None and tls.cert_file:
            creds = grpc.ssl_server_credentials(
                [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
                root_certificates=Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None,
                require_client_auth=bool(tls.client_ca_file),
            )
            self.port = self.server.add_secure_port(cfg.grpc_listen, creds)
        else:
            self.port = self.server.add_insecure_port(cfg.grpc_listen)
        if self.port == 0:
            raise OSError(f"cannot bind the OTLP gRPC address {cfg.grpc_listen}")

    def start(self) -> None:
        self.server.start()
        log.info("OTLP/gRPC receiver on port %d", self.port)

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting (new calls get UNAVAILABLE); in-flight calls get ``grace`` seconds."""
        self.server.stop(grace).wait()

    # -- handlers
    def export_traces(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._export("spans", request, context, lambda data: decode_traces(data, self.limits))

    def export_logs(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._export("logs", request, context, lambda data: decode_logs(data, self.limits))

    def export_metrics(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._export("metrics", request, context, decode_metrics)

    def _export(self, signal: str, request: bytes, context, decode) -> bytes:
        outcome = self.intake.take(signal, request, decode, lambda: context.invocation_metadata())
        if outcome.ok:
            assert outcome.decoded is not None
            self.metrics.inc("requests", 1, signal, "OK")
            return intake.export_response(signal, outcome.decoded).SerializeToString()
        reason = outcome.refused
        if reason == intake.UNAUTHENTICATED:
            self.metrics.inc("requests", 1, signal, "UNAUTHENTICATED")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, outcome.message)
        if reason == intake.INVALID:
            self.metrics.inc("requests", 1, signal, "INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, outcome.message)
        # the tenant's wait, or spool.retry_after_ms (memory, spool budget, spool append): the intake says
        wait_ms = max(1, math.ceil(outcome.retry_after_s * 1000))
        code = code_pb2.RESOURCE_EXHAUSTED if reason == intake.TENANT_RATE else code_pb2.UNAVAILABLE
        self.metrics.inc("requests", 1, signal, code_pb2.Code.Name(code))
        context.abort_with_status(retry_status(code, outcome.message, wait_ms))
        raise AssertionError("unreachable: abort raises")
