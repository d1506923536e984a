"""Service-graph request metrics and virtual nodes (pipeline/graph_calls.py, from the join)."""

import pickle

import numpy as np

from pipeline.config import DEFAULT_BUCKETS
from pipeline.graph_calls import GraphCalls
from pipeline.model import SpanBatch
from pipeline.servicegraph import LinkJoiner

from .factories import attribute_table

S, MS = 10**9, 10**6
T0 = 1_700_000_000 * S
KEYS = ("peer.service", "db.namespace", "db.system.name", "db.system", "messaging.system", "server.address")
SERVER, CLIENT, PRODUCER = 2, 3, 4


def batch(spans: list[dict], weight=None) -> SpanBatch:
    """spans: dicts of service, kind, id, parent, end (s), dur (ms), error, trace and attributes."""
    n = len(spans)
    services = tuple(dict.fromkeys(s["service"] for s in spans))
    values, attrs = attribute_table(spans, KEYS)
    return SpanBatch(
        services=services, operations=("op",), instances=("",),
        service_idx=np.array([services.index(s["service"]) for s in spans], np.int32),
        op_idx=np.zeros(n, np.int32), instance_idx=np.zeros(n, np.int32),
        kind=np.array([s["kind"] for s in spans], np.int8),
        status=np.array([2 if s.get("error") else 0 for s in spans], np.int8),
        end_ns=np.array([T0 + int(s.get("end", 1) * S) for s in spans], np.int64),
        duration_ns=np.array([s.get("dur", 5) * MS for s in spans], np.int64),
        trace_id=np.array([s.get("trace", 1).to_bytes(16, "little") for s in spans], "S16"),
        span_id=np.array([s["id"].to_bytes(8, "little") for s in spans], "S8"),
        parent_span_id=np.array([s.get("parent", 0).to_bytes(8, "little") for s in spans], "S8"),
        weight=weight, attr_keys=KEYS, attr_values=values, attrs=attrs,
    )  # fmt: skip


def joiner(sample: int = 1) -> LinkJoiner:
    return LinkJoiner(sample, 30 * S, 10 * S, DEFAULT_BUCKETS)


def calls(items) -> dict[tuple[str, str, str], GraphCalls]:
    return {(g.client, g.server, g.connection_type): g for g in items if isinstance(g, GraphCalls)}


def later(j: LinkJoiner, seconds: float = 45) -> dict:
    """A span well past the ttl: what waited in vain expires."""
    return calls(j.process(batch([{"service": "other", "kind": SERVER, "id": 999_999, "end": seconds}])))


def test_requests_between_instrumented_services_with_the_server_side_histogram():
    j = joiner()
    got = calls(j.process(batch([
        {"service": "front", "kind": CLIENT, "id": 10, "dur": 30, "attrs": {"server.address": "back.svc"}},
        {"service": "back", "kind": SERVER, "id": 11, "parent": 10, "dur": 20},
        {"service": "front", "kind": CLIENT, "id": 12, "dur": 30, "attrs": {"server.address": "back.svc"}},
        {"service": "back", "kind": SERVER, "id": 13, "parent": 12, "dur": 300, "error": True},
    ])))  # fmt: skip
    (g,) = got.values()
    assert (g.client, g.server, g.connection_type, g.calls, g.failed) == ("front", "back", "", 2, 1)
    assert abs(g.sum_s - 0.32) < 1e-9 and sum(g.bucket_counts) == 2
    assert g.bucket_counts[list(DEFAULT_BUCKETS).index(0.05)] == 1  # 20 ms: le 0.05
    assert later(j) == {}  # both calls had a child: no virtual node


def test_a_call_nobody_answered_is_a_virtual_node_named_by_peer_service_then_server_address():
    j = joiner()
    assert calls(j.process(batch([
        {"service": "front", "kind": CLIENT, "id": 20, "dur": 40, "attrs": {"peer.service": "payments-api",
                                                                             "server.address": "10.0.0.7"}},
        {"service": "front", "kind": CLIENT, "id": 21, "dur": 10, "error": True,
         "attrs": {"server.address": "maps.example.com"}},
        {"service": "front", "kind": CLIENT, "id": 22, "dur": 10},  # names no peer: nothing to draw
    ]))) == {}  # fmt: skip
    got = later(j)
    assert sorted((k, g.calls, g.failed) for k, g in got.items()) == [
        (("front", "maps.example.com", "virtual_node"), 1, 1), (("front", "payments-api", "virtual_node"), 1, 0)]
    assert abs(got[("front", "payments-api", "virtual_node")].sum_s - 0.04) < 1e-9  # the client's duration


def test_database_calls_count_at_once_and_messages_wait_like_calls():
    j = joiner()
    got = calls(j.process(batch([
        {"service": "shop", "kind": CLIENT, "id": 30,
         "attrs": {"db.system.name": "postgresql", "db.namespace": "orders", "server.address": "db-1"}},
        {"service": "shop", "kind": CLIENT, "id": 31, "attrs": {"db.system": "redis"}},
        {"service": "shop", "kind": PRODUCER, "id": 32, "attrs": {"messaging.system": "kafka"}},
        {"service": "shop", "kind": SERVER, "id": 33, "attrs": {"db.system": "redis"}},  # not a call
    ])))  # fmt: skip
    assert {k: g.calls for k, g in got.items()} == {("shop", "orders", "database"): 1, ("shop", "redis", "database"): 1}
    assert {k: g.calls for k, g in later(j).items()} == {("shop", "kafka", "messaging_system"): 1}


def test_a_child_that_came_first_or_later_pairs_the_call():
    """Children usually end, and are exported, before their parent: a call whose child waited
    for it is paired when it comes; a call whose child comes in a later batch stops waiting."""
    j = joiner()
    assert calls(j.process(batch([{"service": "back", "kind": SERVER, "id": 41, "parent": 40}]))) == {}
    first = calls(j.process(batch([{"service": "front", "kind": CLIENT, "id": 40,
                                    "attrs": {"server.address": "back"}}])))  # fmt: skip
    assert {k: g.calls for k, g in first.items()} == {("front", "back", ""): 1}
    call = {"service": "front", "kind": CLIENT, "id": 50, "attrs": {"server.address": "b"}}
    assert calls(j.process(batch([call]))) == {}
    second = calls(j.process(batch([{"service": "back", "kind": SERVER, "id": 51, "parent": 50, "end": 2}])))
    assert {k: g.calls for k, g in second.items()} == {("front", "back", ""): 1}
    assert later(j) == {}


def test_counts_are_scaled_by_the_join_sample_and_span_weights():
    spans = [{"service": "shop", "kind": CLIENT, "id": 100 + i, "trace": 1000 + i, "attrs": {"db.system": "redis"}}
             for i in range(4000)]  # fmt: skip
    got = calls(joiner(4).process(batch(spans)))[("shop", "redis", "database")]
    assert 3600 <= got.calls <= 4400 and got.calls % 4 == 0  # a quarter of the traces, each standing for 4
    weighted = calls(joiner().process(batch(spans[:10], weight=np.full(10, 4, np.int32))))
    assert weighted[("shop", "redis", "database")].calls == 40


def test_waiting_calls_survive_a_snapshot():
    j = joiner()
    j.process(batch([{"service": "front", "kind": CLIENT, "id": 60, "attrs": {"peer.service": "legacy"}}]))
    restored = pickle.loads(pickle.dumps(j))
    restored.bind(1, 30 * S, 10 * S, DEFAULT_BUCKETS)
    assert {k: g.calls for k, g in later(restored).items()} == {("front", "legacy", "virtual_node"): 1}
