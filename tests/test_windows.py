import pickle
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_BUCKETS, WindowsConfig
from pipeline.model import OVERFLOW_OPERATION, LateSpans, LogBatch, ServiceWindow, SpanBatch, Tick
from pipeline.preaggregate import WindowSpec, preaggregate, preaggregate_logs
from pipeline.windows import CardinalityLimiter, ServiceWindows

S = 1_000_000_000


def spec(**kw):
    return WindowSpec.from_config(WindowsConfig(**kw), DEFAULT_BUCKETS)


def batch(rows, services=("svc",), operations=("op",), step=0, partition=0):
    """rows: (service_idx, op_idx, kind, status, end_ns, duration_ns)."""
    n = len(rows)
    cols = list(zip(*rows)) if rows else [[]] * 6
    return SpanBatch(
        services=services, operations=operations, instances=("i",),
        service_idx=np.array(cols[0], np.int32), op_idx=np.array(cols[1], np.int32),
        instance_idx=np.zeros(n, np.int32), kind=np.array(cols[2], np.int8),
        status=np.array(cols[3], np.int8), end_ns=np.array(cols[4], np.int64),
        duration_ns=np.array(cols[5], np.int64), trace_id=np.zeros(n, "S16"),
        span_id=np.zeros(n, "S8"), parent_span_id=np.zeros(n, "S8"), step=(partition, step),
    )  # fmt: skip


def test_preaggregate_groups_by_key_and_window():
    b = batch(
        [
            (0, 0, 2, 0, 1 * S, 10_000_000),
            (0, 0, 2, 2, 2 * S, 30_000_000),
            (0, 1, 2, 0, 3 * S, 1_000_000),
            (0, 0, 2, 0, 12 * S, 5_000_000),  # next window
            (0, 0, 3, 0, 4 * S, 5_000_000),  # other kind
        ],
        operations=("a", "b"),
    )
    parts = preaggregate(b, spec())
    assert [(p.service, p.window_start) for p in parts] == [("svc", 0), ("svc", 10 * S)]  # one per (service, window)
    got = {(op, k, p.window_start): (p, i) for p in parts for i, (op, k) in enumerate(zip(p.operations, p.kinds))}
    assert set(got) == {("a", 2, 0), ("b", 2, 0), ("a", 2, 10 * S), ("a", 3, 0)}
    p, i = got[("a", 2, 0)]
    assert p.status_counts[i].tolist() == [1, 0, 1]
    assert p.row_end_ns[i] == 2 * S and p.max_end_ns == 4 * S
    assert abs(p.status_sums[i].sum() - 0.04) < 1e-12
    # 10 ms falls in le=0.01, 30 ms in le=0.05
    assert p.bucket_counts[i][0][4] == 1 and p.bucket_counts[i][2][5] == 1
    assert sum(p.count for p in parts) == 5


def test_windows_match_a_sketch_of_all_their_spans():
    """Many operations, several batches per window, zero durations, errors: every window result
    equals what one LogSketch of that key's spans gives (counts, sums, quantiles, max)."""
    from pipeline.sketch import LogSketch

    rng = np.random.default_rng(7)
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = ServiceWindows("s0", sp, 1000, 600 * S)
    other = ServiceWindows("s1", sp, 1000, 600 * S)
    spans: dict[tuple, list] = {}
    results = []
    ops = tuple(f"op{i}" for i in range(40))
    for step in range(12):
        n = 300
        svc = rng.integers(0, 2, n)
        op = rng.integers(0, len(ops), n)
        kind = rng.choice([2, 3], n)
        status = rng.choice([0, 1, 2], n, p=[0.8, 0.1, 0.1])
        end = (step * 3 + rng.integers(0, 3, n)) * S + rng.integers(0, S, n)
        dur = np.where(rng.random(n) < 0.05, 0, rng.lognormal(15, 1.5, n).astype(np.int64))
        b = batch(list(zip(svc, op, kind, status, end, dur)), services=("s0", "s1"), operations=ops, step=step)
        for s, o, k, st, e, d in zip(svc, op, kind, status, end, dur):
            spans.setdefault((int(s), ops[o], int(k), int(e // (10 * S))), []).append((int(st), d / 1e9))
        for p in preaggregate(b, sp):
            results += closed_results((sw if p.service == "s0" else other).on_item(p, 0.0))
    results += closed_results(sw.close_all()) + closed_results(other.close_all())
    assert len(results) == len(spans)
    for r in results:
        got = spans[(0 if r.service == "s0" else 1, r.operation, r.span_kind, r.window_start // (10 * S))]
        sk = LogSketch(sp.mapping)
        sk.add(np.array([d for _, d in got]))
        assert r.count == len(got) and r.errors == sum(st == 2 for st, _ in got)
        assert [r.p50, r.p90, r.p95, r.p99] == sk.quantiles((0.5, 0.9, 0.95, 0.99))
        assert r.max == max(d for _, d in got)
        assert r.status_counts == tuple(sum(st == c for st, _ in got) for c in range(3))
        assert abs(r.sum - sum(d for _, d in got)) < 1e-9
        assert sum(map(sum, r.bucket_counts)) == len(got)


def test_exemplars_are_the_slowest_and_the_error_spans_with_whole_ids():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp)
    for step in range(3):  # eight spans over three batches; the slowest five are kept
        rows = [(0, 0, 2, 2 if i == 1 else 0, (step + 1) * S, (step * 10 + i) * 1_000_000) for i in range(3)]
        b = batch(rows, step=step)
        ids = [bytes([step, i]) + bytes(13) + b"\x00" for i in range(3)]  # trace ids ending in a zero byte
        b = SpanBatch(**{**b.__dict__, "trace_id": np.array(ids, "S16")})
        for p in preaggregate(b, sp):
            sw.on_item(p, 0.0)
    (r,) = closed_results(sw.close_all())
    assert all(len(t) == 32 for t in r.slow_traces + r.error_traces)
    assert r.slow_traces == tuple(f"{s:02x}{i:02x}" + "00" * 14 for s, i in [(2, 2), (2, 1), (2, 0), (1, 2), (1, 1)])
    assert r.error_traces == tuple(f"{s:02x}01" + "00" * 14 for s in range(3))
def service_windows(sp, limit=100):
    return ServiceWindows("svc", sp, limit, 600 * S)


def closed_results(out):
    return [r for w in out if isinstance(w, ServiceWindow) for r in w.results]


def test_window_closes_when_watermark_passes_end_plus_lateness():
    sp = spec(length_s=10, allowed_lateness_s=5)
    sw = service_windows(sp)
    p1 = preaggregate(batch([(0, 0, 2, 0, 3 * S, 1_000_000)], step=1), sp)[0]
    assert sw.on_item(p1, now=0.0) == []
    p2 = preaggregate(batch([(0, 0, 2, 0, 15 * S, 1_000_000)], step=2), sp)[0]
    assert sw.on_item(p2, now=0.0) == []  # watermark 3 s (step 1) < 10 + 5
    p3 = preaggregate(batch([(0, 0, 2, 2, 16 * S, 2_000_000)], step=3), sp)[0]
    out = sw.on_item(p3, now=0.0)  # watermark 15 s (step 2): [0, 10) closes
    assert len(out) == 1 and isinstance(out[0], ServiceWindow)
    (r,) = out[0].results
    assert (r.window_start, r.window_end, r.count, r.errors) == (0, 10 * S, 1, 0)
    assert out[0].server_calls == 1 and out[0].server_p95 > 0
    # a span for the closed window is late: counted, not merged
    late = sw.on_item(preaggregate(batch([(0, 0, 2, 0, 9 * S, 1)], step=4), sp)[0], now=0.0)
    assert late == [LateSpans("svc", "op", 2, 1)]
    rest = closed_results(sw.close_all())
    assert [(r.window_start, r.count, r.errors) for r in rest] == [(10 * S, 2, 1)]


def test_every_operation_of_a_service_closes_together():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp)
    b1 = batch([(0, 0, 2, 0, 1 * S, 1), (0, 1, 3, 0, 2 * S, 1)], operations=("busy", "rare"), step=1)
    for p in preaggregate(b1, sp):
        assert sw.on_item(p, 0.0) == []
    b2 = batch([(0, 0, 2, 0, 11 * S, 1)], operations=("busy",), step=2)
    b3 = batch([(0, 0, 2, 0, 12 * S, 1)], operations=("busy",), step=3)
    sw.on_item(preaggregate(b2, sp)[0], 0.0)
    (window,) = sw.on_item(preaggregate(b3, sp)[0], 0.0)  # the rare operation closes with the busy one
    assert [(r.operation, r.span_kind) for r in window.results] == [("busy", 2), ("rare", 3)]


def test_a_step_cannot_close_a_window_before_all_its_spans_are_merged():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp)
    # one step with spans in two windows, the later one first: its own times do not
    # count until the step is over, so window [0, 10) is still open for the earlier span
    parts = preaggregate(batch([(0, 0, 2, 0, 25 * S, 1), (0, 0, 2, 0, 5 * S, 1)], step=1), sp)
    out = [r for p in sorted(parts, key=lambda p: -p.window_start) for r in sw.on_item(p, now=0.0)]
    assert out == []
    closed = closed_results(sw.on_item(preaggregate(batch([(0, 0, 2, 0, 26 * S, 1)], step=2), sp)[0], now=0.0))
    assert [(r.window_start, r.count) for r in closed] == [(0, 1)]


def test_logs_and_instances_join_the_service_window():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp)
    b = batch([(0, 0, 2, 0, 1 * S, 1)], step=1)
    b = SpanBatch(**{**b.__dict__, "instances": ("pod-a",)})
    logs = LogBatch(
        time_ns=np.array([1 * S, 2 * S, 3 * S], np.int64), severity=np.array([9, 17, 21], np.int8),
        severity_text=["INFO", "ERROR", "FATAL"], body=["a", "b", "c"], trace_id=["", "", ""],
        span_id=["", "", ""], service=["svc", "svc", "svc"], instance=["", "", ""], attributes=[{}, {}, {}],
    )  # fmt: skip
    items = [*preaggregate(b, sp), *preaggregate_logs(logs, sp, (0, 1))]
    for item in items:
        assert sw.on_item(item, 0.0) == []
    (window,) = sw.close_all()
    assert window.instances == ("pod-a",) and (window.logs, window.error_logs) == (3, 2)


def test_idle_timeout_on_injected_clock():
    sp = spec(idle_timeout_s=30)
    sw = service_windows(sp)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1)]), sp)[0], now=100.0)
    assert sw.idle_deadline() == 130.0
    assert sw.on_idle(129.9) == []
    out = closed_results(sw.on_idle(130.0))
    assert len(out) == 1 and out[0].count == 1
    assert sw.idle_deadline() is None


def test_service_windows_pickle_round_trip():
    sp = spec()
    sw = service_windows(sp)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1_000), (0, 0, 2, 0, 2 * S, 3_000)]), sp)[0], 0.0)
    back = pickle.loads(pickle.dumps(sw))
    assert back.close_all() == sw.close_all()


def test_cardinality_limit_folds_excess_operations():
    lim = CardinalityLimiter(limit=2, expire_ns=60 * S)
    names = [lim.admit([name], [(i + 1) * S])[0] for i, name in enumerate(["a", "b", "c", "a", "d"])]
    assert names == ["a", "b", OVERFLOW_OPERATION, "a", OVERFLOW_OPERATION]
    # after "b" has not been seen for longer than expire_ns, a new operation gets its slot
    assert lim.admit(["a", "e"], [99 * S, 100 * S]) == ["a", "e"]
    assert pickle.loads(pickle.dumps(lim)).last_seen == lim.last_seen


def test_a_partition_behind_holds_the_window_open_until_it_passes_or_goes_idle():
    """Two spool shards (processes) feed one service; shard 1 has a backlog (e.g. after a restart)."""
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = ServiceWindows("svc", sp, 100, 600 * S, partition_idle_s=15.0)

    def part(end_s, partition, step, now):
        p = preaggregate(batch([(0, 0, 2, 0, end_s * S, 1_000_000)], step=step, partition=partition), sp)[0]
        return sw.on_item(p, now=now)

    assert part(5, 0, 1, 0.0) == []
    assert part(6, 1, 1, 0.0) == []
    assert part(25, 0, 2, 1.0) == []  # shard 0 is far ahead ...
    assert part(7, 1, 2, 1.0) == []  # ... shard 1 still sends window 0: not late, window still open
    assert closed_results(part(26, 0, 3, 2.0)) == []  # shard 1 has completed only 6 s: window 0 waits
    assert part(12, 1, 3, 3.0) == []
    out = part(13, 1, 4, 4.0)  # shard 1's step with 12 s is complete: both passed 10 s
    assert [r.count for r in closed_results(out)] == [3]
    # shard 1 goes silent for this service (its clients moved); after partition_idle_s it stops counting
    assert closed_results(part(27, 0, 4, 10.0)) == []
    out = part(28, 0, 5, 20.0)
    assert [(r.window_start, r.count) for r in closed_results(out)] == [(10 * S, 2)]


def test_without_partition_idleness_only_the_input_decides():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = ServiceWindows("svc", sp, 100, 600 * S)  # replay: partition_idle_s None
    for step, (end_s, partition, now) in enumerate([(5, 0, 0.0), (6, 1, 0.0), (25, 0, 1e6), (26, 0, 2e6)]):
        p = preaggregate(batch([(0, 0, 2, 0, end_s * S, 1_000_000)], step=step, partition=partition), sp)[0]
        assert closed_results(sw.on_item(p, now=now)) == []  # shard 1 never passed 10 s
    assert [r.count for r in closed_results(sw.close_all())] == [2, 2]


def test_a_recovery_snapshot_from_before_the_columnar_windows_is_read():
    """tests/data/service_windows_before_columns.pickle: a ServiceWindows with one open window
    (two operations, 40 spans, errors, an instance) pickled by the per-operation window code;
    the values below are what that code closed it to (its trace ids came out cut short of
    their trailing zero bytes; read back they are whole)."""
    sw = pickle.loads((Path(__file__).parent / "data" / "service_windows_before_columns.pickle").read_bytes())
    (w,) = sw.close_all()
    assert (w.instances, w.server_calls, w.server_errors, w.server_p95) == (("pod-1",), 40, 8, 0.03800038419011715)
    a, b = w.results
    assert (a.operation, a.count, a.errors, a.p50, a.p90, a.p99, a.max, a.sum) == (
        "GET /a", 20, 4, 0.018869991995869057, 0.03507868226597899, 0.03724790133486731, 0.039, 0.4000000000000001)
    assert (b.operation, b.count, b.errors, b.p95) == ("GET /b", 20, 4, 0.03800038419011715)
    whole = lambda ids: tuple(f"{i:02x}" + "00" * 15 for i in ids)  # noqa: E731
    assert a.slow_traces == whole([0x27, 0x25, 0x23, 0x21, 0x1F]) and a.error_traces == whole([0x1F, 0x15, 0x0B, 0x01])
    assert b.slow_traces == whole([0x28, 0x26, 0x24, 0x22, 0x20]) and b.error_traces == whole([0x24, 0x1A, 0x10, 0x06])


def test_open_windows_hold_folded_aggregates_not_the_batches():
    """Sketch entries are copies (not views pinning a whole batch's arrays) and are folded as they
    pile up, so an open window's size follows its distinct (operation, bucket) pairs."""
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp)
    rng = np.random.default_rng(3)
    for step in range(600):  # 600 batches of 200 spans over 20 operations, one window
        rows = [(0, int(o), 2, 0, 1 * S + step, int(d)) for o, d in zip(rng.integers(0, 20, 200),
                                                                      rng.lognormal(15, 2, 200))]  # fmt: skip
        for p in preaggregate(batch(rows, operations=tuple(f"op{i}" for i in range(20)), step=step), sp):
            assert p.sk_idx.base is None and p.sk_cnt.base is None
            sw.on_item(p, 0.0)
    ops = sw.open[0].ops
    assert len(ops.sketch) <= 256 and len(ops.slow) <= 64 and len(ops.errors) <= 64
    assert ops.folded_len < 20 * 1_000  # folded: distinct (operation, bucket) pairs ...
    assert sum(r.size for r, _, _ in ops.sketch) <= 65_536 + 200  # ... and pending ones stay under the fold size
    (w,) = sw.close_all()
    assert sum(r.count for r in w.results) == 600 * 200


def test_a_clock_ahead_moves_event_time_no_further_than_the_acceptance_time():
    """A span from a client whose clock runs ahead (accepted: within otlp.max_future_s) must not make
    the service's other spans late: event time moves at most to when its batch was accepted."""
    import dataclasses

    sp = spec(length_s=10, allowed_lateness_s=5)
    sw = service_windows(sp)
    now = 1000 * S
    ahead = dataclasses.replace(batch([(0, 0, 2, 0, now + 200 * S, 1)], step=1), received_ns=now)
    out = [x for p in preaggregate(ahead, sp) for x in sw.on_item(p, 0.0)]
    for k in range(2, 40):  # the service's own spans, ending now, one batch a step
        b = dataclasses.replace(batch([(0, 0, 2, 0, now + k * S // 10, 1)], step=k), received_ns=now + k * S // 10)
        out += [x for p in preaggregate(b, sp) for x in sw.on_item(p, 0.0)]
    out += sw.close_all()
    assert not [x for x in out if isinstance(x, LateSpans)]
    assert sum(r.count for r in closed_results(out)) == 39
    # without the acceptance time (an OTLP/JSON recording) the recorded times decide, as before
    sw = service_windows(sp)
    for k, end in enumerate([now, now + 200 * S, now + 201 * S]):
        sw.on_item(preaggregate(batch([(0, 0, 2, 0, end, 1)], step=k), sp)[0], 0.0)
    late = sw.on_item(preaggregate(batch([(0, 0, 2, 0, now + S, 1)], step=3), sp)[0], 0.0)
    assert late == [LateSpans("svc", "op", 2, 1)]


def test_late_log_records_and_late_calls_are_counted():
    from pipeline.model import EdgePartial, LateEdges, LateLogs

    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1)], step=1), sp)[0], 0.0)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 25 * S, 1)], step=2), sp)[0], 0.0)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 26 * S, 1)], step=3), sp)[0], 0.0)  # [0, 10) closed
    logs = LogBatch(
        time_ns=np.array([2 * S, 3 * S], np.int64), severity=np.array([9, 17], np.int8), severity_text=["", ""],
        body=["a", "b"], trace_id=["", ""], span_id=["", ""], service=["svc", "svc"], instance=["", ""],
    )  # fmt: skip
    (late_logs,) = [x for p in preaggregate_logs(logs, sp, (0, 4)) for x in sw.on_item(p, 0.0)]
    edge = EdgePartial("svc", "db", 0, 5 * S, (0, 5), calls=3, errors=1, duration_sum=0.1)
    assert (late_logs, *sw.on_item(edge, 0.0)) == (LateLogs("svc", 2), LateEdges("svc", 3))


def test_a_silent_service_closes_empty_windows_on_gaps_and_on_the_clock():
    sp = spec(length_s=10, allowed_lateness_s=0, idle_timeout_s=15)
    sw = ServiceWindows("svc", sp, 100, 600 * S, silent_limit=6)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1)], step=1), sp)[0], now=0.0)
    sw.on_item(Tick("svc", (10 * S, 20 * S, 30 * S), (0, 2)), now=1.0)  # others' data was read meanwhile
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 41 * S, 1)], step=2), sp)[0], now=1.0)
    out = sw.on_item(preaggregate(batch([(0, 0, 2, 0, 42 * S, 1)], step=3), sp)[0], now=2.0)
    assert [(w.window_start // S, len(w.results)) for w in out] == [(0, 1)]
    # live: the open window closes after the idle timeout; the gap before it closes empty, in order
    assert sw.idle_deadline() == 17.0
    out = sw.on_idle(17.0)
    assert [(w.window_start // S, len(w.results), w.silent_run) for w in out] == [(10, 0, 1), (20, 0, 2), (30, 0, 3),
                                                                                 (40, 1, 0)]  # fmt: skip
    # then one empty window per window length
    # event time is taken to run on with the clock from 42 s: [50, 60) is due at 60 s + 15 s idle
    assert sw.idle_deadline() == 2.0 + 15 + (60 - 42)
    silent = sw.on_idle(1000.0)  # long after: at most silent_limit empty windows in a row
    assert [(w.window_start // S, w.silent_run) for w in silent] == [(50 + 10 * i, i + 1) for i in range(6)]
    assert all(not w.results and w.logs == 0 for w in silent)
    assert sw.idle_deadline() is None and sw.on_idle(5000.0) == []


def test_a_gap_in_everyone_s_data_is_blind_not_silence():
    """Filling a gap when data returns: windows in which nobody's data was read (no Tick) are a
    gap in the input, not judged, counted in no silent run; covered ones are silence."""
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = ServiceWindows("svc", sp, 100, 600 * S, silent_limit=6)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1)], step=1), sp)[0], now=0.0)
    sw.on_item(Tick("svc", (30 * S,), (0, 2)), now=0.0)  # others sent in [30, 40) only
    out = []
    for k, end in ((3, 51), (4, 62), (5, 75)):
        out += sw.on_item(preaggregate(batch([(0, 0, 2, 0, end * S, 1)], step=k), sp)[0], now=0.0)
    assert [(w.window_start // S, w.blind, w.silent_run) for w in out] == [
        (0, False, 0), (10, True, 0), (20, True, 0), (30, False, 1), (40, True, 1), (50, False, 0)]  # fmt: skip


def test_bind_closes_windows_of_another_shape_and_applies_limits():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = service_windows(sp, limit=100)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1)], step=1), sp)[0], 0.0)
    assert sw.bind(spec(length_s=10, allowed_lateness_s=3), 100, 600 * S, None, 0) == []  # same shape: kept open
    assert sw.open
    (closed,) = sw.bind(spec(length_s=15, allowed_lateness_s=0), 1, 600 * S, None, 0)
    assert (closed.window_start, closed.window_end, closed.results[0].count) == (0, 10 * S, 1)
    b = batch([(0, 0, 2, 0, 16 * S, 1), (0, 1, 2, 0, 17 * S, 1)], operations=("op", "new"), step=2)
    for p in preaggregate(b, sw.spec):
        sw.on_item(p, 0.0)
    (w,) = sw.close_all()
    assert (w.window_start, w.window_end) == (15 * S, 30 * S)  # the new length, on its own boundaries
    assert [r.operation for r in w.results] == [OVERFLOW_OPERATION, "op"]  # the new limit of 1


def test_ticks_name_the_windows_a_step_read_data_in_once_per_window():
    from pipeline.steps import _Ticks

    ticks = _Ticks(10 * S)
    two = ("a", "b")
    assert ticks.step([batch([(0, 0, 2, 0, 1 * S, 1), (1, 0, 2, 0, 2 * S, 1)], services=two, step=1)]) == []
    # only a sends, across a hole from 3 s to 61 s: b is told of windows 0 and 60, not of the hole
    (tick,) = ticks.step([batch([(0, 0, 2, 0, 3 * S, 1), (0, 0, 2, 0, 61 * S, 1)], services=two, step=2)])
    assert (tick.service, tick.windows, tick.step) == ("b", (0, 60 * S), (0, 2))
    # the same window again: no tick; b itself present: none for b; a string table entry alone is no data
    assert ticks.step([batch([(0, 0, 2, 0, 62 * S, 1)], services=two, step=3)]) == []
    assert ticks.step([batch([(1, 0, 2, 0, 71 * S, 1)], services=two, step=4)])[0].service == "a"


def test_gaps_in_the_input_are_pauses_longer_than_the_input_makes():
    """A stretch without anyone's spans or logs is a gap once the partition has learned its pauses
    (GAP_WARMUP_S) and when it is GAP_FACTOR times the longest of them lately."""
    from pipeline.steps import GAP_WARMUP_S, _Ticks

    def spans(seconds, step):
        return batch([(0, 0, 2, 0, int(t * S), 1) for t in seconds], step=step)

    ticks, step = _Ticks(10 * S), 0
    for t0 in range(0, GAP_WARMUP_S + 40, 10):  # a span every 0.5 s, a pause of 3 s at 100 s: learned
        step += 1
        assert ticks.step([spans([t / 2 for t in range(2 * t0, 2 * t0 + 20) if not 100 <= t / 2 < 103], step)]) == []
    t0 = GAP_WARMUP_S + 40  # the last span ended in the second before
    # 8 empty seconds: a gap (twice the longest pause, 3 s, a little faded, is 5.4); then 5: a pause
    (g,) = ticks.step([spans([t0 + 8, t0 + 9], 100)])
    assert g.gaps == ((t0 * S, (t0 + 8) * S),) and g.windows == ()
    assert ticks.step([spans([t0 + 15], 101)]) == []
    # late data (behind the newest second read) neither makes nor fills a gap
    assert ticks.step([spans([t0 + 16, t0 + 3], 102)]) == []
    # a partition whose input pauses for 20 s as a matter of course: 30 s is no gap (then the
    # longest pause), 60 s is
    slow, times = _Ticks(10 * S), range(0, GAP_WARMUP_S + 100, 21)
    for k, t in enumerate(times):
        assert slow.step([spans([t], k)]) == []
    last = times[-1] + 31
    assert slow.step([spans([last], 900)]) == []
    assert slow.step([spans([last + 61], 901)])[0].gaps == (((last + 1) * S, (last + 61) * S),)


def test_windows_partly_in_a_gap_say_so():
    sp = spec(length_s=10, allowed_lateness_s=0)
    sw = ServiceWindows("svc", sp, 100, 600 * S, silent_limit=6)
    sw.on_item(preaggregate(batch([(0, 0, 2, 0, 1 * S, 1)], step=1), sp)[0], now=0.0)
    sw.on_item(Tick("svc", (), (0, 2), ((14 * S, 23 * S),)), now=0.0)
    out = []
    for k, end in ((3, 12), (4, 25), (5, 31), (6, 45), (7, 46)):
        out += sw.on_item(preaggregate(batch([(0, 0, 2, 0, end * S, 1)], step=k), sp)[0], now=0.0)
    assert [(w.window_start // S, w.gap) for w in out] == [(0, False), (10, True), (20, True), (30, False)]
    sw.on_item(Tick("svc", (), (0, 8), ((50 * S, 52 * S),)), now=0.0)
    assert sw.gaps == [(50 * S, 52 * S)]  # the one the closed windows passed is forgotten
