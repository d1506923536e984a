"""Configuration: nested frozen dataclasses, one per TOML section, each validating its keys.

Every key has a default here and is documented in ``telepipe.example.toml`` and
``docs/configuration.md`` (generated from these classes: ``python -m
pipeline.config_docs``). Bad values raise ``ConfigError`` naming the key and what is
allowed. Reading a TOML file into them is ``pipeline/config_file.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.dimensions import RESERVED_LABELS, label_name

MiB = 1024 * 1024

# OTel Collector spanmetrics default explicit buckets (2 ms .. 15 s), in seconds.
DEFAULT_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0)


class ConfigError(ValueError):
    """A configuration key is unknown or has a value that is not allowed."""


def _host_port(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT with a port 0-65535, got {value!r}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _all_positive(section: str, obj: object, keys: tuple[str, ...], *, zero_ok: bool = False) -> None:
    for key in keys:
        _positive(f"{section}.{key}", getattr(obj, key), zero_ok=zero_ok)


@dataclass(frozen=True)
class OtlpConfig:
    grpc_listen: str = "127.0.0.1:4317"
    max_message_bytes: int = 4 * MiB
    server_threads: int = 8
    max_log_attributes: int = 16
    max_attribute_value_bytes: int = 4096
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 10.0
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 30.0
    shutdown_grace_s: float = 5.0
    max_future_s: float = 300.0

    def __post_init__(self) -> None:
        _host_port("otlp.grpc_listen", self.grpc_listen)
        _all_positive("otlp", self, ("max_future_s", "keepalive_time_s", "keepalive_timeout_s", "min_ping_interval_s",
                                     "server_threads", "max_attribute_value_bytes"))  # fmt: skip
        _all_positive("otlp", self, ("max_connection_age_s", "max_connection_age_grace_s", "shutdown_grace_s",
                                     "max_log_attributes"), zero_ok=True)  # fmt: skip
        if not 1024 <= self.max_message_bytes <= 64 * MiB:
            raise ConfigError(
                f"otlp.max_message_bytes: allowed 1024..{64 * MiB} (64 MiB), got {self.max_message_bytes}"
            )


@dataclass(frozen=True)
class OtlpHttpConfig:
    """The OTLP/HTTP receiver (POST /v1/traces, /v1/logs, /v1/metrics; protobuf and JSON).

    Shares ``[otlp]``'s body limit (``max_message_bytes``, after decompression), ``max_future_s``
    and log limits, ``[auth]``, ``[tls]`` and ``[limits]`` with the gRPC receiver."""

    listen: str = "127.0.0.1:4318"  # empty: the OTLP/HTTP receiver is off
    server_threads: int = 8
    allowed_origins: tuple[str, ...] = ()  # CORS: origins (fnmatch wildcards) a browser page may send from
    allowed_headers: tuple[str, ...] = ()  # CORS: request headers allowed besides Content-Type
    cors_max_age_s: int = 7200
    max_in_flight: int = 64  # requests read or being decoded at once; more: 503 with Retry-After

    def __post_init__(self) -> None:
        if self.listen:
            _host_port("otlp_http.listen", self.listen)
        _all_positive("otlp_http", self, ("server_threads", "max_in_flight"))
        _positive("otlp_http.cors_max_age_s", self.cors_max_age_s, zero_ok=True)


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"
    ready_stall_s: float = 60.0

    def __post_init__(self) -> None:
        _host_port("http.listen", self.listen)
        _positive("http.ready_stall_s", self.ready_stall_s)


FSYNC_POLICIES = ("always", "interval", "never")


@dataclass(frozen=True)
class SpoolConfig:
    data_dir: str = "./.telepipe"
    segment_bytes: int = 64 * MiB
    budget_bytes: int = 1024 * MiB
    fsync: str = "interval"
    fsync_interval_ms: int = 1000
    retry_after_ms: int = 1000

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"spool.fsync: allowed {', '.join(FSYNC_POLICIES)}; got {self.fsync!r}")
        if self.segment_bytes < 4096:
            raise ConfigError(f"spool.segment_bytes: must be >= 4096, got {self.segment_bytes}")
        if self.budget_bytes < self.segment_bytes:
            raise ConfigError(
                f"spool.budget_bytes: must be >= spool.segment_bytes ({self.segment_bytes}), "
                f"got {self.budget_bytes}"
            )
        _all_positive("spool", self, ("fsync_interval_ms", "retry_after_ms"))


@dataclass(frozen=True)
class WindowsConfig:
    length_s: float = 10.0
    allowed_lateness_s: float = 5.0
    idle_timeout_s: float = 15.0
    max_operations_per_service: int = 500
    relative_accuracy: float = 0.01
    dimensions: tuple[str, ...] = ()
    dimension_default: str = ""

    def __post_init__(self) -> None:
        _all_positive("windows", self, ("length_s", "idle_timeout_s", "max_operations_per_service"))
        _positive("windows.allowed_lateness_s", self.allowed_lateness_s, zero_ok=True)
        if not 0.0001 <= self.relative_accuracy <= 0.1:
            raise ConfigError(f"windows.relative_accuracy: allowed 0.0001..0.1, got {self.relative_accuracy}")
        labels = [label_name(d) for d in self.dimensions]
        if len(self.dimensions) > 8 or len(set(labels)) < len(labels) or set(labels) & RESERVED_LABELS or "" in labels:
            raise ConfigError(f"windows.dimensions: at most 8 attribute keys, distinct as labels and none of "
                              f"{sorted(RESERVED_LABELS)}, got {list(self.dimensions)}")  # fmt: skip
        if (self.length_s * 1e9) % 1:
            raise ConfigError("windows.length_s: must be a whole number of nanoseconds")


AGGREGATIONS = ("avg", "max", "sum", "rate")


@dataclass(frozen=True)
class MetricsConfig:
    """OTLP metrics in: how many series a service may have, how long a value holds."""

    max_series_per_service: int = 2000
    stale_after_s: float = 180.0

    def __post_init__(self) -> None:
        _all_positive("metrics", self, ("max_series_per_service", "stale_after_s"))


@dataclass(frozen=True)
class MetricTargetConfig:
    """One OTLP metric a service is scaled on (``[[scaling.metrics]]``) or watched on
    (``[[anomaly.metrics]]``): the window's value is the aggregation over the service's series
    of their latest value (``rate``: per-second increase of a counter, per observed replica)."""

    name: str = ""
    target: float = 0.0  # scaling: the value per replica wanted (0 in a service override: not scaled on it)
    aggregation: str = "avg"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("metrics: every [[scaling.metrics]] / [[anomaly.metrics]] entry needs a name")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"metrics.aggregation: allowed {', '.join(AGGREGATIONS)}; got {self.aggregation!r}")
        _positive("metrics.target", self.target, zero_ok=True)


@dataclass(frozen=True)
class PrometheusConfig:
    stale_after_s: float = 600.0
    service_stale_after_s: float = 3600.0
    buckets: tuple[float, ...] = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        _positive("prometheus.stale_after_s", self.stale_after_s)
        if self.service_stale_after_s < self.stale_after_s:
            raise ConfigError(
                f"prometheus.service_stale_after_s: must be >= prometheus.stale_after_s ({self.stale_after_s:g}), "
                f"got {self.service_stale_after_s:g}"
            )
        b = list(self.buckets)
        if not b or b != sorted(set(b)) or b[0] <= 0:
            raise ConfigError(
                "prometheus.buckets: must be a non-empty list of increasing positive seconds"
            )


@dataclass(frozen=True)
class LokiConfig:
    url: str = ""
    tenant: str = ""
    batch_max_bytes: int = 1 * MiB
    batch_max_wait_ms: int = 1000
    max_line_bytes: int = 256 * 1024
    queue_max_batches: int = 64
    timeout_s: float = 10.0
    retry_min_ms: int = 500
    retry_max_ms: int = 300_000
    max_retries: int = 10
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    max_streams: int = 1000
    stream_idle_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"loki.url: must start with http:// or https://, got {self.url!r}")
        _all_positive("loki", self, ("max_streams", "stream_idle_s", "breaker_failures", "breaker_cooldown_s"))
        for key in ("batch_max_bytes", "batch_max_wait_ms", "max_line_bytes", "queue_max_batches",
                    "timeout_s", "retry_min_ms", "retry_max_ms"):  # fmt: skip
            _positive(f"loki.{key}", getattr(self, key))
        _positive("loki.max_retries", self.max_retries, zero_ok=True)
        if self.retry_max_ms < self.retry_min_ms:
            raise ConfigError("loki.retry_max_ms: must be >= loki.retry_min_ms")


FEATURES = ("latency_p50", "latency_p95", "latency_p99", "error_rate", "call_rate", "error_log_rate")
DETECTORS = ("band", "hst", "band_and_hst", "band_or_hst")


@dataclass(frozen=True)
class RuleConfig:
    """A static threshold rule; it goes through the same pending/firing/resolved lifecycle."""

    name: str = ""
    feature: str = "error_rate"
    above: float = math.inf
    below: float = -math.inf
    for_s: float = 60.0
    service: str = "*"
    operation: str = "*"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("anomaly.rules.name: every rule needs a name")
        if self.feature not in FEATURES:
            raise ConfigError(f"anomaly.rules.feature: allowed {', '.join(FEATURES)}; got {self.feature!r}")
        if math.isinf(self.above) and math.isinf(self.below):
            raise ConfigError(f"anomaly.rules ({self.name}): set 'above' or 'below'")
        _positive("anomaly.rules.for_s", self.for_s, zero_ok=True)


@dataclass(frozen=True)
class AnomalyConfig:
    detector: str = "band"
    band_k: float = 4.0
    fading_factor: float = 0.05
    warmup_windows: int = 12
    min_calls: int = 10
    latency_resolution_s: float = 0.0002
    pending_windows: int = 2
    resolve_windows: int = 3
    hst_threshold: float = 0.95
    hst_window: int = 60
    seed: int = 42
    max_trace_ids: int = 5
    metric_warmup_points: int = 6
    rules: tuple[RuleConfig, ...] = ()
    metrics: tuple[MetricTargetConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"anomaly.detector: allowed {', '.join(DETECTORS)}; got {self.detector!r}")
        _positive("anomaly.band_k", self.band_k)
        if not 0 < self.fading_factor <= 1:
            raise ConfigError(f"anomaly.fading_factor: allowed (0, 1], got {self.fading_factor}")
        _all_positive("anomaly", self, ("warmup_windows", "pending_windows", "resolve_windows", "hst_window",
                                        "metric_warmup_points"))  # fmt: skip
        _all_positive("anomaly", self, ("min_calls", "latency_resolution_s"), zero_ok=True)
        if not 0 < self.hst_threshold < 1:
            raise ConfigError(f"anomaly.hst_threshold: allowed (0, 1), got {self.hst_threshold}")


@dataclass(frozen=True)
class ServiceScalingConfig:
    """Per-service overrides of the scaling targets (0 or empty: use the [scaling] default)."""

    name: str = ""
    target_rps_per_replica: float = 0.0
    target_p95_s: float = 0.0
    target_error_rate: float = 0.0
    min_replicas: int = 0
    max_replicas: int = 0
    replicas: int = 0  # observed replicas when spans carry no service.instance.id
    metrics: tuple[MetricTargetConfig, ...] = ()  # overrides of [[scaling.metrics]] by name

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("scaling.services.name: every entry needs the service name")


@dataclass(frozen=True)
class ScalingConfig:
    target_rps_per_replica: float = 100.0
    target_p95_s: float = 0.0
    target_error_rate: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 100
    default_replicas: int = 1
    tolerance: float = 0.1
    scale_up_pods: int = 4
    scale_up_percent: float = 100.0
    scale_up_period_s: float = 15.0
    scale_down_stabilization_s: float = 300.0
    forecast_horizon_s: float = 60.0
    season_s: float = 86400.0
    downstream_error_rate: float = 0.2
    metrics: tuple[MetricTargetConfig, ...] = ()
    services: tuple[ServiceScalingConfig, ...] = ()

    def __post_init__(self) -> None:
        _positive("scaling.target_rps_per_replica", self.target_rps_per_replica)
        for key in ("target_p95_s", "target_error_rate", "tolerance", "scale_up_percent", "scale_up_period_s",
                    "scale_down_stabilization_s", "forecast_horizon_s", "season_s"):  # fmt: skip
            _positive(f"scaling.{key}", getattr(self, key), zero_ok=True)
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError("scaling.min_replicas/max_replicas: need 1 <= min_replicas <= max_replicas")
        _positive("scaling.default_replicas", self.default_replicas)
        _positive("scaling.scale_up_pods", self.scale_up_pods, zero_ok=True)
        if not 0 < self.downstream_error_rate <= 1:
            raise ConfigError("scaling.downstream_error_rate: allowed (0, 1]")
        for m in self.metrics:
            if m.target <= 0:
                raise ConfigError(f"scaling.metrics: {m.name!r} needs a target > 0")


@dataclass(frozen=True)
class ServiceGraphConfig:
    sample_one_in: int = 4
    ttl_s: float = 30.0

    def __post_init__(self) -> None:
        _all_positive("servicegraph", self, ("sample_one_in", "ttl_s"))


@dataclass(frozen=True)
class DbConfig:
    enabled: bool = True
    slow_query_s: float = 0.5
    n_plus_one_min_repeats: int = 5
    n_plus_one_min_total_s: float = 0.05
    max_statements_per_service: int = 1000
    max_statement_chars: int = 200

    def __post_init__(self) -> None:
        _all_positive("db", self, ("slow_query_s", "n_plus_one_min_repeats", "max_statements_per_service",
                                   "max_statement_chars"))  # fmt: skip
        _positive("db.n_plus_one_min_total_s", self.n_plus_one_min_total_s, zero_ok=True)


@dataclass(frozen=True)
class KedaConfig:
    listen: str = ""  # empty: the KEDA external scaler is off
    max_streams: int = 1000

    def __post_init__(self) -> None:
        if self.listen:
            _host_port("keda.listen", self.listen)
        _positive("keda.max_streams", self.max_streams)


@dataclass(frozen=True)
class RemoteWriteConfig:
    url: str = ""
    batch_max_samples: int = 5000
    batch_max_wait_ms: int = 1000
    queue_max_batches: int = 64
    stale_after_s: float = 600.0
    timeout_s: float = 10.0
    retry_min_ms: int = 500
    retry_max_ms: int = 30_000
    max_retries: int = 10
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"remote_write.url: must start with http:// or https://, got {self.url!r}")
        for key in ("batch_max_samples", "batch_max_wait_ms", "queue_max_batches", "stale_after_s", "timeout_s",
                    "retry_min_ms", "retry_max_ms", "breaker_failures", "breaker_cooldown_s"):  # fmt: skip
            _positive(f"remote_write.{key}", getattr(self, key))
        _positive("remote_write.max_retries", self.max_retries, zero_ok=True)


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens for OTLP clients (``authorization: Bearer <token>``); none set: no auth."""

    tokens_file: str = ""
    tokens_env: str = ""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # set: clients must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls.cert_file and tls.key_file: set both or neither")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls.client_ca_file: needs tls.cert_file and tls.key_file")


@dataclass(frozen=True)
class TierConfig:
    name: str = ""
    spans_per_s: float = 0.0
    burst: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("limits.tiers.name: every tier needs a name")
        _positive("limits.tiers.spans_per_s", self.spans_per_s)
        _positive("limits.tiers.burst", self.burst, zero_ok=True)


@dataclass(frozen=True)
class TenantConfig:
    name: str = ""
    tier: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.tier:
            raise ConfigError("limits.tenants: every entry needs a name and a tier")


@dataclass(frozen=True)
class LimitsConfig:
    max_rss_bytes: int = 0
    max_tenants: int = 10000
    tenant_metadata_key: str = "x-scope-orgid"
    default_tier: str = ""
    tiers: tuple[TierConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()

    def __post_init__(self) -> None:
        _positive("limits.max_rss_bytes", self.max_rss_bytes, zero_ok=True)
        _positive("limits.max_tenants", self.max_tenants)
        names = {t.name for t in self.tiers}
        for ref in [self.default_tier] * bool(self.default_tier) + [t.tier for t in self.tenants]:
            if ref not in names:
                raise ConfigError(f"limits: tier {ref!r} is not defined; defined: {', '.join(sorted(names)) or 'none'}")
        if self.tenant_metadata_key != self.tenant_metadata_key.lower():
            raise ConfigError("limits.tenant_metadata_key: gRPC metadata keys are lowercase")


@dataclass(frozen=True)
class RecoveryConfig:
    enabled: bool = True
    snapshot_interval_s: float = 5.0
    backup_interval_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.05 <= self.snapshot_interval_s <= 3600:
            raise ConfigError(f"recovery.snapshot_interval_s: allowed 0.05..3600, got {self.snapshot_interval_s}")
        _positive("recovery.backup_interval_s", self.backup_interval_s, zero_ok=True)


@dataclass(frozen=True)
class OutputConfig:
    emit_jsonl: str = ""
    record_dir: str = ""


@dataclass(frozen=True)
class Config:
    otlp: OtlpConfig = field(default_factory=OtlpConfig)
    otlp_http: OtlpHttpConfig = field(default_factory=OtlpHttpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    loki: LokiConfig = field(default_factory=LokiConfig)
    remote_write: RemoteWriteConfig = field(default_factory=RemoteWriteConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    servicegraph: ServiceGraphConfig = field(default_factory=ServiceGraphConfig)
    db: DbConfig = field(default_factory=DbConfig)
    keda: KedaConfig = field(default_factory=KedaConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
