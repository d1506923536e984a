"""Dimensions (windows.dimensions): operations split by attribute values, from span or resource."""

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pipeline.config import ConfigError, WindowsConfig
from pipeline.decode import decode_traces, decode_traces_json, decode_traces_upb
from pipeline.decode.common import DecodeLimits
from pipeline.dimensions import compose, dense_unique, label_name, readable, split, with_dimensions
from pipeline.model import SpanBatch
from pipeline.preaggregate import WindowSpec, preaggregate

from .factories import attribute_table

KEYS = ("deployment.environment", "http.route")


def test_compose_split_and_labels():
    op = compose("GET /x", [("deployment.environment", "prod"), ("http.route", "/x/{id}")])
    assert split(op) == ("GET /x", (("deployment.environment", "prod"), ("http.route", "/x/{id}")))
    assert split("GET /plain") == ("GET /plain", ())
    assert split("odd\x1fname") == ("odd\x1fname", ())  # a stray separator, no pairs: a name
    assert label_name("deployment.environment") == "deployment_environment" and label_name("9.x-y") == "_9_x_y"
    doc = readable({"type": "window", "operation": op, "ranking": [{"operation": op, "score": 1.0}]})
    assert doc["operation"] == "GET /x" and doc["dimensions"] == {"deployment.environment": "prod",
                                                                  "http.route": "/x/{id}"}  # fmt: skip
    assert doc["ranking"][0]["dimensions"]["http.route"] == "/x/{id}"


def test_dimension_keys_are_checked():
    WindowsConfig(dimensions=KEYS)
    for bad in (("span.name",), ("a.b", "a_b"), ("",), tuple(f"k{i}" for i in range(9))):
        with pytest.raises(ConfigError, match="windows.dimensions"):
            WindowsConfig(dimensions=bad)


def _batch(spans):
    n = len(spans)
    values, attrs = attribute_table(spans, KEYS)
    return SpanBatch(
        services=("shop",), operations=("GET /a", "GET /b"), instances=("",),
        service_idx=np.zeros(n, np.int32), op_idx=np.array([s["op"] for s in spans], np.int32),
        instance_idx=np.zeros(n, np.int32), kind=np.full(n, 2, np.int8), status=np.zeros(n, np.int8),
        end_ns=np.full(n, 10**18, np.int64), duration_ns=np.full(n, 10**6, np.int64),
        trace_id=np.array([i.to_bytes(16, "big") for i in range(1, n + 1)], "S16"),
        span_id=np.array([i.to_bytes(8, "big") for i in range(1, n + 1)], "S8"),
        parent_span_id=np.zeros(n, "S8"), attr_keys=KEYS, attr_values=values, attrs=attrs,
    )  # fmt: skip


def test_operations_are_split_by_their_values_and_missing_ones_take_the_default():
    prod, staging = {"deployment.environment": "prod"}, {"deployment.environment": "staging"}
    spans = [{"op": 0, "attrs": prod}] * 3 + [{"op": 0, "attrs": staging}] * 2 + [{"op": 1, "attrs": {}}]
    spans += [{"op": 0, "attrs": {**prod, "http.route": "/a"}}]
    out = with_dimensions(_batch(spans), KEYS, "unknown")
    counts = {}
    for i in out.op_idx.tolist():
        counts[split(out.operations[i])] = counts.get(split(out.operations[i]), 0) + 1
    env, route = KEYS
    assert counts == {
        ("GET /a", ((env, "prod"), (route, "unknown"))): 3, ("GET /a", ((env, "staging"), (route, "unknown"))): 2,
        ("GET /b", ((env, "unknown"), (route, "unknown"))): 1, ("GET /a", ((env, "prod"), (route, "/a"))): 1}
    spec = WindowSpec.from_config(WindowsConfig(dimensions=KEYS), (0.1,))
    rows = [(p.operations, sum(p.status_counts.sum(axis=1).tolist())) for p in preaggregate(_batch(spans), spec)]
    assert sum(n for _, n in rows) == 7 and len(rows[0][0]) == 4  # four series in the one window
    assert with_dimensions(_batch(spans), (), "").operations == ("GET /a", "GET /b")


def test_dense_unique_is_numpys_unique():
    rng = np.random.default_rng(7)
    for space, n in ((10, 1), (50, 1000), (1 << 16, 500), (1 << 20, 300), (1 << 40, 2000)):
        code = rng.integers(0, space, size=n, dtype=np.int64)
        unique, inverse = dense_unique(code, space)
        want_unique, want_inverse = np.unique(code, return_inverse=True)
        assert unique.tolist() == want_unique.tolist() and inverse.tolist() == want_inverse.tolist()
        assert dense_unique(code, space, inverse=False).tolist() == want_unique.tolist()


def _request(resource_env: str | None, span_env: str | None) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "shop"
    if resource_env:
        rs.resource.attributes.add(key="deployment.environment").value.string_value = resource_env
    span = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="GET /a", kind=2,
                                          start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 10**6)  # fmt: skip
    if span_env:
        span.attributes.add(key="deployment.environment").value.string_value = span_env
    return req.SerializeToString()


@pytest.mark.parametrize(("resource_env", "span_env", "want"), [
    ("prod", None, "prod"), ("prod", "canary", "canary"), (None, "canary", "canary"), (None, None, None)])
def test_a_span_takes_its_resources_value_in_every_decoder(resource_env, span_env, want):
    from google.protobuf.json_format import MessageToDict

    limits = DecodeLimits(span_attributes=KEYS, resource_attributes=KEYS)
    body = _request(resource_env, span_env)
    obj = MessageToDict(ExportTraceServiceRequest.FromString(body), use_integers_for_enums=True)
    obj["resourceSpans"][0]["scopeSpans"][0]["spans"][0].update(traceId="01" * 16, spanId="02" * 8)
    for decoded in (decode_traces(body, limits), decode_traces_upb(body, limits), decode_traces_json(obj, limits)):
        col = decoded.batch.attribute("deployment.environment") if decoded.batch.attrs is not None else None
        got = None if col is None or col[0] < 0 else decoded.batch.attr_values[col[0]]
        assert got == want
    without = decode_traces(body, DecodeLimits(span_attributes=KEYS)).batch  # not asked: the span's own only
    col = without.attribute("deployment.environment") if without.attrs is not None else None
    assert (None if col is None or col[0] < 0 else without.attr_values[col[0]]) == span_env


def test_interning_values_in_compiled_code_matches_the_plain_dict():
    """``_walked_attributes`` (values told apart in compiled code, ``intern_ranges``) gives the
    table and codes a dict would, in order of first appearance over key 0's spans, then key 1's,
    one table for all keys; values with trailing zero bytes, long ones and absent ones included."""
    from pipeline.decode.spans import _walked_attributes

    rng = np.random.default_rng(7)
    short = [b"/items/{id}", b"prod", b"prod\x00", b"\x00", b"staging", b"/items/{id}\x00\x00", b"p"]
    for pool, n in [(p, n) for p in (short, [*short, b"x" * 300]) for n in (1, 3, 50, 500)]:
        picks = [pool[i] for i in rng.integers(0, len(pool), 2 * n)]
        data = b"".join(picks)
        ends = np.cumsum([len(p) for p in picks])
        ranges = np.stack([ends - [len(p) for p in picks], ends]).reshape(2, 2, n).transpose(1, 0, 2).reshape(4, n)
        ranges[:, rng.random(n) < 0.3] = -1  # absent in some spans
        want: dict[bytes, int] = {}
        codes_want = [[want.setdefault(data[x:y], len(want)) if x >= 0 else -1
                       for x, y in zip(ranges[2 * j], ranges[2 * j + 1])] for j in range(2)]  # fmt: skip
        got = _walked_attributes(data, ("a", "b"), ranges)
        if not want:
            assert got is None
            continue
        keys, values, idx = got
        assert keys == ("a", "b") and idx.dtype == np.int32 and idx.tolist() == codes_want
        assert values == tuple(v.decode(errors="replace") for v in want)


def test_outputs_with_labels_split_the_operation():
    """Remote write and /metrics: span_name the name, a label per dimension."""
    from pipeline.selfmetrics import SelfMetrics
    from sinks.prometheus import SeriesState
    from sinks.remote_write.encoder import samples_of

    from .factories import result

    op = compose("GET /a", [("deployment.environment", "prod")])
    r = result(op=op, service="shop")
    labels = {dict(lb)["__name__"]: dict(lb) for lb, _, _ in samples_of(r)}
    assert labels["telepipe_window_calls"]["span_name"] == "GET /a"
    assert labels["telepipe_window_calls"]["deployment_environment"] == "prod"
    state = SeriesState((0.1,), SelfMetrics())
    state.update([r])
    page = b"".join(state.render()).decode()
    assert 'telepipe_calls_total{service_name="shop",span_name="GET /a",span_kind="SPAN_KIND_SERVER",' in page
    assert 'deployment_environment="prod"' in page and "\x1f" not in page
