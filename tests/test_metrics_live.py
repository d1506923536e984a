"""Scaling on OTLP metrics, live: two instances of a service that sends only metrics report
container.cpu.utilization 0.9 through the real Python SDK (OTLP/gRPC); with target 0.7 the
daemon asks for ceil(2 * 0.9 / 0.7) = 3 replicas, and says the metric decided; the
service-level detector judges the metric (its band on /metrics)."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from .conftest import samples, total, wait_for

pytestmark = pytest.mark.integration

CONFIG = """
[windows]
idle_timeout_s = 1.0

[[scaling.metrics]]
name = "container.cpu.utilization"
target = 0.7
aggregation = "avg"
"""


def _provider(target: str, instance: str) -> MeterProvider:
    exporter = OTLPMetricExporter(endpoint=f"http://{target}", insecure=True)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)  # flushed by hand
    resource = Resource.create({"service.name": "cpu-only", "service.instance.id": instance})
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    provider.get_meter("test").create_observable_gauge(
        "container.cpu.utilization", callbacks=[lambda _options: [Observation(0.9)]], unit="1"
    )
    return provider


def test_two_instances_at_90_percent_cpu_ask_for_three_replicas(daemon_factory) -> None:
    d = daemon_factory(CONFIG)
    providers = [_provider(d.grpc_target, f"cpu-only-{i}") for i in (1, 2)]
    try:
        for p in providers:
            assert p.force_flush(10_000)
        wait_for(lambda: total(d.metrics_text(), "telepipe_accepted_metric_points_total") >= 2)

        def desired() -> float:
            return total(d.metrics_text(), "telepipe_desired_replicas", service_name="cpu-only")

        wait_for(lambda: desired() == 3, timeout=40)
        page = d.metrics_text()
        assert total(page, "telepipe_observed_replicas", service_name="cpu-only") == 2
        reasons = [dict(lb)["reason"] for (name, lb) in samples(page)
                   if name == "telepipe_scaling_reason" and ("service_name", "cpu-only") in lb]  # fmt: skip
        assert reasons == ["metric:container.cpu.utilization"]
        features = [dict(lb)["feature"] for (name, lb) in samples(page)
                    if name == "telepipe_anomaly_observed" and ("service_name", "cpu-only") in lb]  # fmt: skip
        assert "metric:container.cpu.utilization" in features
    finally:
        for p in providers:
            p.shutdown()
