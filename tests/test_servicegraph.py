import pickle

import numpy as np
import pytest

from pipeline.anomaly import ServiceAnomaly
from pipeline.config import AnomalyConfig
from pipeline.model import Dependency, SpanBatch
from pipeline.selfmetrics import SelfMetrics
from pipeline.servicegraph import LinkJoiner
from sources.replay import iter_batches

from .conftest import ONLINEBOUTIQUE, TRAINTICKET
from .factories import result, service_window

S = 10**9


def spans(rows, services=("front", "back")):
    """rows: (service_idx, trace, span, parent, end_s, error)."""
    n = len(rows)
    return SpanBatch(
        services=services, operations=("op",), instances=("",),
        service_idx=np.array([r[0] for r in rows], np.int32), op_idx=np.zeros(n, np.int32),
        instance_idx=np.zeros(n, np.int32), kind=np.full(n, 2, np.int8),
        status=np.array([2 if r[5] else 0 for r in rows], np.int8),
        end_ns=np.array([r[4] * S for r in rows], np.int64), duration_ns=np.full(n, 5_000_000, np.int64),
        trace_id=np.array([r[1].to_bytes(16, "little") for r in rows], "S16"),
        span_id=np.array([r[2].to_bytes(8, "little") for r in rows], "S8"),
        parent_span_id=np.array([r[3].to_bytes(8, "little") if r[3] else b"" for r in rows], "S8"),
    )  # fmt: skip


def test_parent_first_child_first_and_same_service():
    j = LinkJoiner(1, 30 * S, 10 * S)
    # trace 1: front span 10 calls back span 11 (parent first); back 12 is a child of back 11
    e1 = j.process(spans([(0, 1, 10, 0, 1, 0), (1, 1, 11, 10, 1, 0), (1, 1, 12, 11, 1, 0)]))
    assert [(e.service, e.callee, e.calls, e.errors) for e in e1] == [("front", "back", 1, 0)]
    # trace 2: the child (an error) arrives one batch before its parent
    assert j.process(spans([(1, 2, 21, 20, 12, 1)])) == []
    e2 = j.process(spans([(0, 2, 20, 0, 12, 0)]))
    assert [(e.service, e.callee, e.window_start, e.errors) for e in e2] == [("front", "back", 10 * S, 1)]
    assert pickle.loads(pickle.dumps(j)).high == j.high


def test_children_of_a_missing_parent_are_summed_while_they_wait():
    """A parent id that many children name (a client reusing span ids) costs one waiting entry per
    callee and window, not one per child; when the parent comes, the edge has every call."""
    j = LinkJoiner(1, 30 * S, 10 * S)
    for k in range(200):
        assert j.process(spans([(1, 7, 100 + k, 99, 1 + k % 2 * 10, k % 4 == 0)])) == []
    waiting = {pid: children for _, table in j.waiting for pid, children in table.items()}
    assert list(waiting) == [int.from_bytes((99).to_bytes(8, "little"), "little")]
    assert sorted(waiting[next(iter(waiting))]) == [("back", 0), ("back", 10 * S)]
    assert len(pickle.dumps(j.waiting)) < 300
    edges = j.process(spans([(0, 7, 99, 0, 1, 0)]))
    assert [(e.window_start, e.calls, e.errors) for e in edges] == [(0, 100, 50), (10 * S, 100, 0)]
    assert abs(edges[0].duration_sum - 100 * 0.005) < 1e-12


def test_waiting_parents_are_bounded(monkeypatch):
    monkeypatch.setattr("pipeline.servicegraph.MAX_WAITING", 50)
    j = LinkJoiner(1, 30 * S, 10 * S)
    j.process(spans([(1, 7, 1000 + k, 100 + k, 1, 0) for k in range(80)]))  # 80 parents never seen
    assert sum(len(t) for _, t in j.waiting) == 50 and j.unjoined == 30


def test_snapshots_with_waiting_child_lists_are_converted():
    """Snapshots taken before children were summed (the joiner's dict, with a list of
    (callee, error, duration, end) per waiting parent) restore into the summed form."""
    j = LinkJoiner(1, 30 * S, 10 * S)
    j.process(spans([(0, 1, 5, 0, 1, 0)]))  # sets up the generations
    j.waiting = [(0, {99: [("back", True, 0.005, 1 * S), ("back", False, 0.005, 2 * S)]})]
    restored = pickle.loads(pickle.dumps(j))
    # the graph part (weighted buckets, failed, seconds) is empty: not counted in the request metrics
    assert restored.waiting == [(0, {99: {("back", 0): [2, 1, 0.01, 2 * S, {}, 0, 0.0]}})]
    edges = restored.process(spans([(0, 1, 99, 0, 3, 0)]))
    assert [(e.service, e.callee, e.calls, e.errors) for e in edges] == [("front", "back", 2, 1)]


def test_snapshots_with_span_dicts_are_converted():
    """Snapshots taken before SpanIndex kept each generation's span ids in a dict of service
    names; they restore into the index and their spans are still found as parents."""
    j = LinkJoiner(1, 30 * S, 10 * S)
    j.process(spans([(0, 1, 5, 0, 1, 0)]))
    old = dict(j.__dict__)
    del old["names"], old["codes"], old["unstored"]
    old["generations"] = [(0, {5: "front", 6: "back"})]
    restored = LinkJoiner.__new__(LinkJoiner)
    restored.__setstate__(pickle.loads(pickle.dumps(old)))
    assert [len(index) for _, index in restored.generations] == [2] and restored.names == ["front", "back"]
    edges = restored.process(spans([(1, 1, 50, 5, 3, 0), (0, 1, 60, 6, 3, 1)]))
    assert [(e.service, e.callee, e.calls, e.errors) for e in edges] == [("back", "front", 1, 1), ("front", "back", 1, 0)]


def test_sampled_spans_kept_are_bounded(monkeypatch):
    monkeypatch.setattr("pipeline.servicegraph.MAX_SPANS", 100)
    j = LinkJoiner(1, 30 * S, 10 * S)
    j.process(spans([(0, 1, 1000 + k, 0, 1, 0) for k in range(150)]))
    assert sum(map(len, (index for _, index in j.generations))) == 100 and j.unstored == 50
    edges = j.process(spans([(1, 1, 5000 + k, 1000 + k, 2, 0) for k in range(150)]))
    assert sum(e.calls for e in edges) == 100 and sum(len(t) for _, t in j.waiting) == 50


def test_service_names_that_come_and_go_do_not_pile_up(monkeypatch):
    """Each 10 s brings 50 new services (a name per deployment): codes of services no longer
    held are dropped when generations expire, and joins across the renumbering still work."""
    monkeypatch.setattr("pipeline.servicegraph.MAX_NAMES", 100)
    j = LinkJoiner(1, 20 * S, 10 * S)
    for g in range(20):
        names = tuple(f"svc-{g}-{k}" for k in range(50))
        parents = [(k, g * 1000 + k, g * 1000 + k + 1, 0, 10 * g + 1, 0) for k in range(50)]
        assert j.process(spans(parents, names)) == []
        # children in the next generation, of the parents above, in another service each
        edges = j.process(spans([((k + 1) % 50, g * 1000 + k, 10**6 + g * 1000 + k, g * 1000 + k + 1,
                                  10 * g + 11, 0) for k in range(50)], names))  # fmt: skip
        assert sorted((e.service, e.callee) for e in edges) == sorted(
            (names[k], names[(k + 1) % 50]) for k in range(50))  # fmt: skip
        assert len(j.names) <= 100 + 50 and len(j.codes) == len(j.names)
    again = pickle.loads(pickle.dumps(j))
    assert again.names == j.names


def test_the_reading_partition_counts_spans_not_kept_and_children_not_joined(monkeypatch):
    from pipeline.deadletter import DeadLetters
    from pipeline.steps import _JoinedPartition

    monkeypatch.setattr("pipeline.servicegraph.MAX_SPANS", 10)
    monkeypatch.setattr("pipeline.servicegraph.MAX_WAITING", 5)

    class Inner:
        def __init__(self, batches):
            self.batches = batches

        def next_batch(self):
            return [self.batches.pop(0)] if self.batches else []

    metrics = SelfMetrics()
    part = _JoinedPartition(Inner([
        spans([(0, 1, 100 + k, 0, 1, 0) for k in range(12)]),  # 2 not kept
        spans([(1, 1, 200 + k, 300 + k, 1, 0) for k in range(8)]),  # 8 more not kept; 5 of 8 children wait
    ]), LinkJoiner(1, 30 * S, 10 * S), DeadLetters(None, metrics))  # fmt: skip
    part.next_batch()
    part.next_batch()
    assert metrics.counter("dropped", "servicegraph_unstored") == 10
    assert metrics.counter("dropped", "servicegraph_unjoined") == 3


def test_sampling_keeps_whole_traces_and_ttl_bounds_memory():
    j = LinkJoiner(4, 20 * S, 10 * S)
    rows = [(0, t, 1000 + t, 0, 1, 0) for t in range(400)] + [(1, t, 5000 + t, 1000 + t, 1, 0) for t in range(400)]
    edges = j.process(spans(rows))
    assert 60 < sum(e.calls for e in edges) < 140  # about a quarter of the traces, each fully joined
    again = LinkJoiner(4, 20 * S, 10 * S).process(spans(rows))
    assert sum(e.calls for e in again) == sum(e.calls for e in edges)  # the same traces every time
    for i in range(10):
        j.process(spans([(0, 4 * i, 9000 + i, 0, 100 + 10 * i, 0)]))
    assert len(j.generations) <= 3 and sum(len(t) for _, t in j.generations) <= 3


def test_recording_gives_the_onlineboutique_call_graph():
    j = LinkJoiner(1, 30 * S, 10 * S)
    calls = {}
    for b in iter_batches(ONLINEBOUTIQUE, SelfMetrics()):
        for e in j.process(b):
            calls[(e.service, e.callee)] = calls.get((e.service, e.callee), 0) + e.calls
    assert calls[("frontend", "productcatalogservice")] > 2000
    assert calls[("checkoutservice", "paymentservice")] > 0
    assert all(a != b for a, b in calls)


@pytest.mark.parametrize("path", [ONLINEBOUTIQUE, TRAINTICKET])
def test_edges_equal_a_join_of_the_whole_recording(path):
    """Every cross-service parent/child pair of the recording, found in whatever order the
    batches bring parents and children, summed per (caller, callee, window)."""
    batches = [b for b in iter_batches(path, SelfMetrics()) if isinstance(b, SpanBatch)]
    owner, children = {}, []
    for b in batches:
        for i in range(len(b)):
            svc = b.services[b.service_idx[i]]
            owner[bytes(b.span_id[i])] = svc
            if bytes(b.parent_span_id[i]).strip(b"\0"):
                children.append((bytes(b.parent_span_id[i]), svc, int(b.end_ns[i]), int(b.status[i]) == 2,
                                 int(b.duration_ns[i])))  # fmt: skip
    expected = {}
    for parent, callee, end, error, dur in children:
        caller = owner.get(parent)
        if caller is not None and caller != callee:
            e = expected.setdefault((caller, callee, end // (10 * S) * 10 * S), [0, 0, 0, 0])
            e[0] += 1
            e[1] += error
            e[2] += dur
            e[3] = max(e[3], end)
    j = LinkJoiner(1, 10**6 * S, 10 * S)
    got = {}
    for b in batches:
        for e in j.process(b):
            g = got.setdefault((e.service, e.callee, e.window_start), [0, 0, 0.0, 0])
            g[0] += e.calls
            g[1] += e.errors
            g[2] += e.duration_sum
            g[3] = max(g[3], e.max_end_ns)
    assert expected and got.keys() == expected.keys()
    for key, (calls, errors, dur, end) in expected.items():
        g = got[key]
        assert (g[0], g[1], g[3]) == (calls, errors, end), key
        assert abs(g[2] - dur / 1e9) <= 1e-9 * max(1.0, dur / 1e9), key


def test_downstream_service_ranked_when_the_caller_fires():
    det = ServiceAnomaly(AnomalyConfig(), "front", 10.0)
    normal = (Dependency("back", 100, 0, 0.005), Dependency("db", 100, 0, 0.002))
    for i in range(30):
        det.on_window(_with_deps(service_window(i, [result("GET /", count=200, p95=0.05)], service="front"), normal))
    slow = (Dependency("back", 100, 0, 0.05), Dependency("db", 100, 0, 0.002))
    events = []
    for i in range(30, 33):
        sw = _with_deps(service_window(i, [result("GET /", count=200, p95=0.5, p99=0.7)], service="front"), slow)
        events += det.on_window(sw)[1]
    firing = [e for e in events if e.state == "firing"]
    assert firing
    downstream = [r for r in firing[0].ranking if "downstream_service" in r]
    assert downstream[0]["downstream_service"] == "back" and downstream[0]["feature"] == "latency"
    assert all(r["downstream_service"] != "db" for r in downstream[1:]) or len(downstream) == 1


def _with_deps(sw, deps):
    from dataclasses import replace

    return replace(sw, dependencies=deps)


def test_a_restored_joiner_takes_the_config_in_force_and_carries_a_version():
    j = LinkJoiner(1, 30 * S, 10 * S)
    j.process(spans([(1, 1, 200, 300, 7, 0)]))  # a child ending at 7 s waits for parent 300
    blob = pickle.dumps(j)
    back = pickle.loads(blob)
    assert j.__getstate__()["version"] == 2 and "version" not in back.__dict__
    back.bind(4, 60 * S, 5 * S)
    assert (back.sample, back.ttl_ns, back.window_ns) == (4, 60 * S, 5 * S)
    ((_, table),) = back.waiting
    assert list(table[300]) == [("back", 5 * S)]  # realigned to the new window length
    state = j.__getstate__()
    state["version"] = 3
    with pytest.raises(RuntimeError, match="service graph has format 3"):
        LinkJoiner.__new__(LinkJoiner).__setstate__(state)
