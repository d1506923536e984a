"""OTLP metrics in: decoding (protobuf and JSON), series state (rates, resets, staleness,
the series limit), and the flow: scaling and detection on metrics, from replayed files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from pipeline import batch_codec
from pipeline.config import AnomalyConfig, Config, MetricTargetConfig, ScalingConfig
from pipeline.decode import MalformedRequest, decode_json_line, decode_metrics, decode_metrics_json
from pipeline.metric_model import METRIC_GAUGE, METRIC_HISTOGRAM, METRIC_SUM, MetricValues
from pipeline.metric_series import ServiceMetrics, aggregate
from telepipe import daemon

S = 10**9
T0 = 1_700_000_000 * S
FAULTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "faults"


def _attr(key: str, value: str) -> dict:
    return {"key": key, "value": {"stringValue": value}}


def request(service: str, instance: str, metrics: list[dict]) -> dict:
    resource = {"attributes": [_attr("service.name", service), _attr("service.instance.id", instance)]}
    return {"resourceMetrics": [{"resource": resource, "scopeMetrics": [{"metrics": metrics}]}]}


def gauge(name: str, t: int, value: float, **attrs: str) -> dict:
    point = {"timeUnixNano": str(t), "asDouble": value, "attributes": [_attr(k, v) for k, v in attrs.items()]}
    return {"name": name, "gauge": {"dataPoints": [point]}}


def counter(name: str, start: int, t: int, value: int, temporality: int = 2) -> dict:
    point = {"startTimeUnixNano": str(start), "timeUnixNano": str(t), "asInt": str(value)}
    return {"name": name, "sum": {"dataPoints": [point], "aggregationTemporality": temporality, "isMonotonic": True}}


def test_json_and_protobuf_decode_alike() -> None:
    hist = {"name": "http.server.duration", "histogram": {"aggregationTemporality": 2, "dataPoints": [
        {"startTimeUnixNano": str(T0), "timeUnixNano": str(T0 + 10 * S), "count": "4", "sum": 2.0,
         "bucketCounts": ["1", "3"], "explicitBounds": [0.5]}]}}  # fmt: skip
    obj = request("cart", "cart-1", [gauge("container.cpu.utilization", T0, 0.5, cpu="0"),
                                     counter("requests", T0, T0 + 10 * S, 100), hist])  # fmt: skip
    from_json = decode_metrics_json(obj)
    from_proto = decode_metrics(json_format.Parse(json.dumps(obj), ExportMetricsServiceRequest()).SerializeToString())
    for d in (from_json, from_proto):
        b = d.batch
        assert d.received == 3 and d.rejected == 0
        assert b.names == ("container.cpu.utilization", "requests", "http.server.duration")
        assert b.services == ("cart",) and b.instances == ("cart-1",)
        assert b.attrs == ("cpu=0", "")
        assert b.kind.tolist() == [METRIC_GAUGE, METRIC_SUM, METRIC_HISTOGRAM]
        assert b.value.tolist() == [0.5, 100.0, 2.0] and b.count.tolist() == [0.0, 0.0, 4.0]
        again = batch_codec.decode(batch_codec.encode(b))
        assert again.names == b.names and again.value.tolist() == b.value.tolist()
    line = orjson.dumps(obj)
    assert [len(d.batch) for d in decode_json_line(line)] == [3]


def test_invalid_points_are_rejected_and_counted() -> None:
    no_value = {"name": "g", "gauge": {"dataPoints": [{"timeUnixNano": str(T0)}]}}
    no_time = gauge("g", 0, 1.0)
    unnamed = gauge("", T0, 1.0)
    unspecified = counter("c", T0, T0 + S, 5, temporality=0)
    stale_marker = {"name": "g", "gauge": {"dataPoints": [{"timeUnixNano": str(T0), "flags": 1}]}}
    d = decode_metrics_json(request("a", "a-1", [no_value, no_time, unnamed, unspecified, stale_marker,
                                                 gauge("ok", T0, 2.0)]))  # fmt: skip
    assert d.received == 6 and d.rejected == 4 and len(d.batch) == 1
    assert "without a value" in d.message and "unspecified aggregation temporality" in d.message
    with pytest.raises(MalformedRequest):
        decode_metrics(b"\xff\xff\xff")
    with pytest.raises(MalformedRequest):
        decode_metrics_json({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x", "gauge": 5}]}]}]})


def _point(t, name, value, kind=METRIC_GAUGE, temporality=0, start=0, instance="i1", count=0.0, attrs=""):
    return (t, name, instance, attrs, kind, temporality, 1, start, float(value), count)


def test_counter_rates_resets_and_staleness() -> None:
    m = ServiceMetrics(max_series=10, stale_ns=180 * S)
    # cumulative counter: 100 at 10 s since start, 160 at 40 s (+60 in 30 s = 2/s)
    m.close_window([_point(T0 + 10 * S, "req", 100, METRIC_SUM, 2, T0)], T0 + 20 * S)
    values, taken, overflow = m.close_window([_point(T0 + 40 * S, "req", 160, METRIC_SUM, 2, T0)], T0 + 50 * S)
    assert values[0].rates == (2.0,) and values[0].fresh and (taken, overflow) == (1, 0)
    # a restart: a new start time, the count begins again from 0 (30 in 10 s since its start)
    values, _, _ = m.close_window([_point(T0 + 70 * S, "req", 30, METRIC_SUM, 2, T0 + 60 * S)], T0 + 80 * S)
    assert values[0].rates == (3.0,)
    # no new point: the latest value and rate hold, not fresh
    values, _, _ = m.close_window([], T0 + 90 * S)
    assert values[0].rates == (3.0,) and not values[0].fresh
    # stale after 180 s without points: gone
    values, _, _ = m.close_window([], T0 + 260 * S)
    assert values == () and m.series == {}


def test_delta_sums_histograms_and_the_series_limit() -> None:
    m = ServiceMetrics(max_series=2, stale_ns=180 * S)
    points = [
        _point(T0 + 10 * S, "bytes", 500, METRIC_SUM, 1, T0 + 5 * S),  # delta: 500 in 5 s
        _point(T0 + 10 * S, "lat", 3.0, METRIC_HISTOGRAM, 1, T0, count=6),  # mean 0.5 s, 0.6/s
        _point(T0 + 10 * S, "third", 1.0),  # over the limit of 2 series
    ]
    values, taken, overflow = m.close_window(points, T0 + 20 * S)
    assert (taken, overflow) == (2, 1)
    by = {v.name: v for v in values}
    assert by["bytes"].rates == (100.0,)
    assert by["lat"].values == (0.5,) and by["lat"].rates == (0.6,)


def test_aggregations() -> None:
    mv = MetricValues("cpu", (0.9, 0.5), (2.0, 4.0), ("a", "b"), True)
    assert aggregate(mv, "avg", 2) == pytest.approx(0.7)
    assert aggregate(mv, "max", 2) == 0.9 and aggregate(mv, "sum", 2) == pytest.approx(1.4)
    assert aggregate(mv, "rate", 2) == 3.0
    assert math.isnan(aggregate(None, "avg", 1))


def _cpu_lines(path: Path, minutes: int, values: dict[str, list[float]], every_s: int = 60) -> None:
    with open(path, "wb") as f:
        for i in range(minutes):
            for instance, series in values.items():
                t = T0 + i * every_s * S
                f.write(orjson.dumps(request("api", instance, [gauge("container.cpu.utilization", t, series[i])])))
                f.write(b"\n")


def _replay(cfg: Config, paths: list[Path], out: Path) -> tuple[list[dict], object]:
    _, metrics = daemon.replay(cfg, [str(p) for p in paths], emit_jsonl=str(out))
    return [json.loads(line) for line in out.read_text().splitlines()], metrics


def test_two_instances_at_90_percent_cpu_scale_to_three_from_metrics_alone(tmp_path: Path) -> None:
    rec = tmp_path / "metrics.jsonl"
    _cpu_lines(rec, 5, {"api-1": [0.9] * 5, "api-2": [0.9] * 5})
    target = MetricTargetConfig(name="container.cpu.utilization", target=0.7, aggregation="avg")
    cfg = Config(scaling=ScalingConfig(metrics=(target,)))
    events, metrics = _replay(cfg, [rec], tmp_path / "out.jsonl")
    scaling = [e for e in events if e["type"] == "scaling" and e["service"] == "api"]
    assert scaling and scaling[0]["observed"] == 2 and scaling[0]["desired"] == 3
    assert scaling[0]["reason_code"] == "metric:container.cpu.utilization"
    assert metrics.counter("processed_metric_points") == 10
    assert not [e for e in events if e["type"] == "window"]  # no spans: no span windows


def test_cpu_alert_on_a_metric_only_service(tmp_path: Path) -> None:
    """A service's CPU goes from ~20 % to 90 %: the service-level detector alerts on the metric
    (judged from its 6th point on). A point exported once a minute stands for the whole minute
    (six windows of evidence, more than the two the lifecycle asks for), so it fires on the
    first high point, in the window the point arrives in."""
    quiet = [0.2, 0.22, 0.18, 0.21, 0.19, 0.2, 0.23, 0.2, 0.21, 0.19]
    rec = tmp_path / "metrics.jsonl"
    _cpu_lines(rec, 12, {"api-1": quiet + [0.9, 0.92]})
    cfg = Config(anomaly=AnomalyConfig(metrics=(MetricTargetConfig(name="container.cpu.utilization"),)))
    events, _ = _replay(cfg, [rec], tmp_path / "out.jsonl")
    alerts = [(e["state"], e["feature"], (e["time"] - T0) // S) for e in events if e["type"] == "alert"]
    assert alerts[:1] == [("firing", "metric:container.cpu.utilization", 600)]


def test_one_high_point_among_points_every_window_only_goes_pending(tmp_path: Path) -> None:
    """Exported every window (10 s), a point is one window of evidence: one high point goes
    pending and back, two in a row fire."""
    quiet = [0.2, 0.22, 0.18, 0.21, 0.19, 0.2, 0.23, 0.2, 0.21, 0.19]
    cfg = Config(anomaly=AnomalyConfig(metrics=(MetricTargetConfig(name="container.cpu.utilization"),)))
    for name, tail, want in (("one", [0.9, 0.2, 0.21], ["pending"]),
                             ("two", [0.9, 0.92, 0.2, 0.21, 0.2], ["pending", "firing", "resolved"])):  # fmt: skip
        rec = tmp_path / f"{name}.jsonl"
        _cpu_lines(rec, len(quiet) + len(tail), {"api-1": quiet + tail}, every_s=10)
        events, _ = _replay(cfg, [rec], tmp_path / f"{name}.out.jsonl")
        assert [e["state"] for e in events if e["type"] == "alert"] == want


@pytest.mark.skipif(not FAULTS.exists(), reason="../shared/data/faults is not beside the checkout")
@pytest.mark.parametrize("name", ["ob-cpu-contention-ad-1631", "ob-cpu-contention-payment-1421",
                                  "ob-cpu-contention-recommendation-1521", "ob-cpu-contention-email-1345"])  # fmt: skip
def test_real_cpu_contention_alerts_on_the_faulty_service(tmp_path: Path, name: str) -> None:
    label = next(f for f in json.loads((FAULTS / "faults.json").read_text()) if f["name"] == name)
    target = MetricTargetConfig(name="container.cpu.utilization", target=0.7)
    cfg = Config(scaling=ScalingConfig(metrics=(target,)))
    events, metrics = _replay(cfg, [FAULTS / f"{name}.otlp.jsonl.zst", FAULTS / f"{name}.metrics.otlp.jsonl.zst"],
                              tmp_path / "out.jsonl")  # fmt: skip
    firing = [e for e in events if e["type"] == "alert" and e["state"] == "firing"
              and e["feature"] == "metric:container.cpu.utilization"]  # fmt: skip
    assert [e["service"] for e in firing] == [label["service"]]
    assert firing[0]["time"] >= label["inject_unix_s"] * S - 10 * S
    assert metrics.counter("processed_metric_points") > 600


def test_per_service_overrides_and_the_largest_recommendation_wins() -> None:
    from pipeline.config import ServiceScalingConfig
    from pipeline.model import ServiceWindow
    from pipeline.scaling import ServiceScaler

    cpu = MetricTargetConfig(name="cpu", target=0.5)
    mem = MetricTargetConfig(name="mem", target=0.8, aggregation="max")
    cfg = ScalingConfig(metrics=(cpu, mem), forecast_horizon_s=0.0, services=(
        ServiceScalingConfig(name="calm", metrics=(MetricTargetConfig(name="cpu", target=0.0),)),
        ServiceScalingConfig(name="busy", metrics=(MetricTargetConfig(name="cpu", target=0.25),)),
    ))  # fmt: skip
    metrics = (MetricValues("cpu", (0.5, 0.5), (math.nan,) * 2, ("a", "b"), True),
               MetricValues("mem", (0.4, 1.2), (math.nan,) * 2, ("a", "b"), True))  # fmt: skip
    sw = ServiceWindow("x", 0, L10, (), ("a", "b"), 0, 0, 0, 0, math.nan, silent_run=1, metrics=metrics)
    want = {"plain": (3, "metric:mem"),  # cpu 0.5/0.5 -> 2; mem max 1.2/0.8 -> 3: the largest wins
            "calm": (3, "metric:mem"),  # not scaled on cpu
            "busy": (4, "metric:cpu")}  # cpu 0.5/0.25 -> 4
    for service, (desired, code) in want.items():
        update, _ = ServiceScaler(cfg, service, 10.0).on_window(sw.__class__(**{**sw.__dict__, "service": service}),
                                                               False)  # fmt: skip
        assert (update.desired, update.reason_code) == (desired, code), service


L10 = 10 * S
