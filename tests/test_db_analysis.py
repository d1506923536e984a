"""The database analysis on span batches (pipeline/db_analysis.py): statements counted per
service, system and normalized statement; slow queries; N+1 by Sentry's rule, with parents
that come in a later batch or never."""

from __future__ import annotations

import pickle

import numpy as np

from pipeline.config import DEFAULT_BUCKETS, DbConfig
from pipeline.db_analysis import OVERFLOW_STATEMENT, DbAnalyzer, DbCalls, Finding
from pipeline.model import SpanBatch

from .factories import attribute_table

MS = 1_000_000
T0 = 1_700_000_000 * 10**9
KEYS = ("db.system.name", "db.system", "db.query.text", "db.statement", "db.operation.name")


def batch(spans: list[dict], weight=None) -> SpanBatch:
    """spans: dicts of name, kind, start (ms), dur (ms), id, parent, trace, service and attributes."""
    n = len(spans)
    services = tuple(dict.fromkeys(s.get("service", "shop") for s in spans))
    names = tuple(dict.fromkeys(s["name"] for s in spans))
    values, attrs = attribute_table(spans, KEYS)
    return SpanBatch(
        services=services, operations=names, instances=("",),
        service_idx=np.array([services.index(s.get("service", "shop")) for s in spans], np.int32),
        op_idx=np.array([names.index(s["name"]) for s in spans], np.int32), instance_idx=np.zeros(n, np.int32),
        kind=np.array([s.get("kind", 3) for s in spans], np.int8), status=np.zeros(n, np.int8),
        end_ns=np.array([T0 + (s["start"] + s["dur"]) * MS for s in spans], np.int64),
        duration_ns=np.array([s["dur"] * MS for s in spans], np.int64),
        trace_id=np.array([s.get("trace", 1).to_bytes(16, "big") for s in spans], dtype="S16"),
        span_id=np.array([s["id"].to_bytes(8, "big") for s in spans], dtype="S8"),
        parent_span_id=np.array([s.get("parent", 0).to_bytes(8, "big") for s in spans], dtype="S8"),
        weight=weight, attr_keys=KEYS, attr_values=values, attrs=attrs,
    )  # fmt: skip


def query(i: int, parent: int, statement: str, start: int, dur: int = 10, **extra) -> dict:
    attrs = {"db.system.name": "postgresql", "db.query.text": statement}
    return {"name": "SELECT", "kind": 3, "start": start, "dur": dur, "id": i, "parent": parent, "attrs": attrs,
            **extra}  # fmt: skip


def analyzer(**cfg) -> DbAnalyzer:
    return DbAnalyzer(DbConfig(**cfg), DEFAULT_BUCKETS, 30 * 10**9)


def findings(items) -> list[Finding]:
    return [x for x in items if isinstance(x, Finding)]


def test_statements_are_counted_normalized_and_weighted():
    spans = [query(i + 10, 1, f"SELECT * FROM t WHERE id = {i}", i * 12) for i in range(3)]
    spans.append({"name": "redis GET", "kind": 3, "start": 50, "dur": 1, "id": 20,
                  "attrs": {"db.system": "redis", "db.operation.name": "GET"}})  # fmt: skip
    out = analyzer().process(batch(spans, weight=np.array([4, 4, 4, 1], np.int32)))
    calls = {(c.db_system, c.statement): c for c in out if isinstance(c, DbCalls)}
    sql = calls[("postgresql", "SELECT * FROM t WHERE id = ?")]
    assert sql.calls == 12 and sum(sql.bucket_counts) == 12 and abs(sql.sum_s - 0.12) < 1e-9
    assert calls[("redis", "GET")].calls == 1


def test_n_plus_one_when_the_parent_comes_in_a_later_batch():
    a = analyzer()
    children = [query(100 + k, 1, f"SELECT * FROM items WHERE order_id = {k}", 1 + k * 11) for k in range(6)]
    assert findings(a.process(batch(children))) == []  # the parent is not here yet
    parent = {"name": "GET /orders", "kind": 2, "start": 0, "dur": 100, "id": 1}
    (f,) = findings(a.process(batch([parent])))
    assert (f.kind, f.service, f.operation, f.statement, f.repeats) == (
        "n_plus_one", "shop", "GET /orders", "SELECT * FROM items WHERE order_id = ?", 6)
    assert abs(f.duration_s - 0.06) < 1e-9 and f.trace_id == (1).to_bytes(16, "big").hex()
    assert a.waiting == {}


def test_ids_ending_in_zero_bytes():
    """Trace and parent span ids whose last bytes are zero (1 in 256 of real ids) keep all their
    bytes: numpy's bytes scalars drop trailing zeros, which shortened trace ids in findings and
    misaligned the awaited parents (a failure that lost the whole batch's output)."""
    a = analyzer()
    trace = 0xAB << 16  # ...ab0000
    kids = [query(100 + k, 0x100, f"SELECT * FROM items WHERE order_id = {k}", 1 + k * 11, trace=trace)
            for k in range(5)]  # fmt: skip
    kids += [query(200 + k, 0x101, f"SELECT * FROM items WHERE order_id = {k}", 1 + k * 11) for k in range(5)]
    assert findings(a.process(batch(kids))) == []
    parents = [{"name": "GET /a", "kind": 2, "start": 0, "dur": 100, "id": 0x100, "trace": trace},
               {"name": "GET /b", "kind": 2, "start": 0, "dur": 100, "id": 0x101}]  # fmt: skip
    got = findings(a.process(batch(parents)))
    assert sorted((f.operation, f.trace_id) for f in got) == [
        ("GET /a", trace.to_bytes(16, "big").hex()), ("GET /b", (1).to_bytes(16, "big").hex())]
    assert a.waiting == {}
    slow = findings(analyzer().process(batch([query(7, 0, "SELECT 1", 0, dur=900, trace=trace)])))
    assert [f.trace_id for f in slow] == [trace.to_bytes(16, "big").hex()]


def test_runs_are_consecutive_and_need_both_thresholds():
    a = analyzer()
    # 3 + (another statement) + 3: no run of 5; then 5 of 5 ms (25 ms < 50 ms); then 5 of 10 ms
    same = "SELECT a FROM b WHERE c = 1"
    spans = [query(10 + k, 1, same, k * 11) for k in range(3)] + [query(20, 1, "SELECT 2", 40)]
    spans += [query(30 + k, 1, same, 50 + k * 11) for k in range(3)]
    spans += [query(40 + k, 2, same, k * 6, dur=5) for k in range(5)]
    spans += [query(50 + k, 3, same, k * 11) for k in range(5)]
    parents = [{"name": f"GET /{p}", "kind": 2, "start": 0, "dur": 200, "id": p} for p in (1, 2, 3)]
    got = findings(a.process(batch(spans + parents)))
    assert [(f.operation, f.repeats) for f in got] == [("GET /3", 5)]


def test_a_parent_that_never_comes_is_judged_when_its_children_are_old():
    a = analyzer()
    assert findings(a.process(batch([query(10 + k, 7, "SELECT x FROM y WHERE z = 3", k * 11) for k in range(5)]))) == []
    later = {"name": "GET /other", "kind": 2, "start": 40_000, "dur": 5, "id": 99}  # 40 s later: past the ttl
    (f,) = findings(a.process(batch([later])))
    assert f.operation == "" and f.repeats == 5


def test_slow_queries_and_the_statement_bound():
    a = analyzer(max_statements_per_service=2, slow_query_s=0.5)
    spans = [query(10 + k, 0, f"SELECT * FROM t{k}", k * 10) for k in range(4)]
    spans.append(query(20, 0, "SELECT * FROM t0", 100, dur=700))
    out = a.process(batch(spans))
    statements = {c.statement: c.calls for c in out if isinstance(c, DbCalls)}
    assert statements == {"SELECT * FROM t0": 2, "SELECT * FROM t1": 1, OVERFLOW_STATEMENT: 2}
    (slow,) = findings(out)
    assert (slow.kind, slow.statement, slow.operation) == ("slow_query", "SELECT * FROM t0", "SELECT")
    assert abs(slow.duration_s - 0.7) < 1e-9


def test_state_survives_a_snapshot():
    a = analyzer()
    a.process(batch([query(10 + k, 1, "SELECT 1", k * 11) for k in range(5)]))
    b = pickle.loads(pickle.dumps(a))
    b.bind(DbConfig(), DEFAULT_BUCKETS, 30 * 10**9)
    (f,) = findings(b.process(batch([{"name": "GET /x", "kind": 2, "start": 0, "dur": 100, "id": 1}])))
    assert f.operation == "GET /x" and f.repeats == 5
