"""The dataflow over the shared recordings: exact counts, accurate percentiles,
deterministic output, same results on 1 and 2 workers."""

import math
import subprocess
import sys
from collections import defaultdict

import orjson
import pytest
from bytewax.testing import TestingSink, cluster_main, run_main

from pipeline.config import Config, WindowsConfig
from pipeline.flow import Outputs, build_flow
from pipeline.model import SPAN_KINDS, LateSpans, WindowResult
from pipeline.selfmetrics import SelfMetrics
from sources.replay import ReplaySource

from .conftest import ONLINEBOUTIQUE, ROOT, TRAINTICKET, ZIPKIN

WINDOW_NS = 10_000_000_000


def exact_windows(path):
    """(service, operation, kind, window_start) -> sorted durations (s), straight from the JSON."""
    out = defaultdict(list)
    for line in path.open("rb"):
        obj = orjson.loads(line)
        for rs in obj.get("resourceSpans", []):
            attrs = {a["key"]: a["value"].get("stringValue") for a in rs["resource"]["attributes"]}
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    end, start = int(s["endTimeUnixNano"]), int(s["startTimeUnixNano"])
                    key = (attrs["service.name"], s["name"], s.get("kind", 0), end // WINDOW_NS * WINDOW_NS)
                    out[key].append((end - start) / 1e9)
    return {k: sorted(v) for k, v in out.items()}


def run_replay(paths, workers=1, cfg=None):
    cfg = cfg or Config()
    metrics = SelfMetrics()
    got = []
    flow = build_flow(
        cfg, ReplaySource(paths, metrics=metrics), Outputs(result_sinks=[TestingSink(got)]), metrics, idle_close=False
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return got, metrics


@pytest.mark.parametrize("path", [ONLINEBOUTIQUE, TRAINTICKET, ZIPKIN], ids=lambda p: p.name.split("-")[0])
def test_counts_and_percentiles_match_exact_values(path):
    got, _ = run_replay([path])
    windows = [r for r in got if isinstance(r, WindowResult)]
    assert not [r for r in got if isinstance(r, LateSpans)]
    exact = exact_windows(path)
    assert sum(r.count for r in windows) == sum(len(v) for v in exact.values())
    assert len(windows) == len(exact)
    for r in windows:
        values = exact[(r.service, r.operation, r.span_kind, r.window_start)]
        assert r.count == len(values)
        assert r.max == values[-1]
        for q, est in ((0.5, r.p50), (0.9, r.p90), (0.95, r.p95), (0.99, r.p99)):
            ex = values[math.floor(q * (len(values) - 1))]
            assert abs(est - ex) <= 0.01 * ex + 1e-12, (r.service, r.operation, q, est, ex)


def test_onlineboutique_total_is_22969():
    got, _ = run_replay([ONLINEBOUTIQUE])
    assert sum(r.count for r in got if isinstance(r, WindowResult)) == 22969


def _canonical(results):
    return sorted(orjson.dumps(r.to_json()) for r in results if isinstance(r, WindowResult))


def test_one_and_two_workers_give_identical_windows():
    one, _ = run_replay([ONLINEBOUTIQUE, TRAINTICKET])
    two, _ = run_replay([ONLINEBOUTIQUE, TRAINTICKET], workers=2)
    assert len(one) > 300
    assert _canonical(one) == _canonical(two)


def test_cardinality_limit_in_the_flow():
    cfg = Config(windows=WindowsConfig(max_operations_per_service=2))
    got, _ = run_replay([ONLINEBOUTIQUE], cfg=cfg)
    windows = [r for r in got if isinstance(r, WindowResult)]
    assert sum(r.count for r in windows) == 22969  # nothing lost: excess goes to the overflow series
    per_service = defaultdict(set)
    for r in windows:
        per_service[r.service].add(r.operation)
    assert all(len(ops - {"__overflow__"}) <= 2 for ops in per_service.values())
    assert any("__overflow__" in ops for ops in per_service.values())


def _cli_replay(out, *extra):
    subprocess.run(
        [sys.executable, "-m", "telepipe.cli", "replay", str(ONLINEBOUTIQUE), "--emit-jsonl", str(out), *extra],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out.read_bytes()


def test_cli_replay_output_is_byte_identical_across_runs_and_speeds(tmp_path):
    first = _cli_replay(tmp_path / "a.jsonl")
    again = _cli_replay(tmp_path / "b.jsonl", "--speed", "max")
    paced = _cli_replay(tmp_path / "c.jsonl", "--speed", "40")  # 1 min of traffic in ~1.5 s
    assert first == again == paced
    lines = [x for x in map(orjson.loads, first.splitlines()) if x["type"] == "window"]
    assert sum(x["count"] for x in lines) == 22969
    required = {"type", "service", "operation", "span_kind", "window_start", "window_end",
                "count", "errors", "p50", "p90", "p95", "p99", "max"}  # fmt: skip
    assert all(required <= set(x) and x["type"] == "window" for x in lines)
    assert {x["span_kind"] for x in lines} <= set(SPAN_KINDS)


def letters(n: int) -> str:
    """A name piece without digits (no id to fold into a template): n in base 26."""
    out = ""
    while True:
        n, r = divmod(n, 26)
        out = "abcdefghijklmnopqrstuvwxyz"[r] + out
        if not n:
            return out


def _flood(tmp_path, names_of, n_batches: int, per: int, limit: int = 500, step_ns: int = 10**8):
    import numpy as np

    from bench.amplify import write_native
    from pipeline.model import SpanBatch

    batches = []
    for k in range(n_batches):
        names = tuple(names_of(k * per + i) for i in range(per))
        batches.append(SpanBatch(
            services=("shop",), operations=names, instances=("pod",), service_idx=np.zeros(per, np.int32),
            op_idx=np.arange(per, dtype=np.int32), instance_idx=np.zeros(per, np.int32), kind=np.full(per, 2, np.int8),
            status=np.zeros(per, np.int8), end_ns=np.full(per, 1_700_000_000_000_000_000 + k * step_ns, np.int64),
            duration_ns=np.full(per, 10**6, np.int64), trace_id=np.full(per, b"\x01" * 16, "S16"),
            span_id=np.full(per, b"\x02" * 8, "S8"), parent_span_id=np.zeros(per, "S8"),
        ))  # fmt: skip
    write_native(batches, tmp_path / "flood")
    cfg = Config(windows=WindowsConfig(max_operations_per_service=limit))
    got, metrics = run_replay([tmp_path / "flood"], cfg=cfg)
    return [r for r in got if isinstance(r, WindowResult)], metrics


def test_urls_with_ids_fold_into_one_template_before_the_overflow_series(tmp_path):
    """100,000 URLs with ids (numbers, UUIDs, hex object ids) and a few plain routes: the ids fold
    into one template per route once they would not fit, counted; nothing goes to overflow."""
    import uuid

    def name(n: int) -> str:
        if n % 1000 == 0:
            return f"GET /health/{letters(n // 1000 % 3)}"  # plain names: kept as they are
        kind = n % 3
        ident = str(n) if kind == 0 else str(uuid.UUID(int=n)) if kind == 1 else f"{n:024x}"
        return f"GET /users/{ident}/orders"

    windows, metrics = _flood(tmp_path, name, 50, 2000, limit=100, step_ns=10**9)  # 50 s: 5 windows
    assert sum(r.count for r in windows) == 100_000  # nothing lost
    counts: dict[str, int] = {}
    for r in windows:
        counts[r.operation] = counts.get(r.operation, 0) + r.count
    assert "__overflow__" not in counts and counts["GET /users/{id}/orders"] > 99_000
    assert set(counts) - {"GET /users/{id}/orders"} <= {"GET /health/a", "GET /health/b", "GET /health/c"} | {
        n for n in counts if n.startswith("GET /users/") and "{id}" not in n}  # admitted before the limit
    last = max(r.window_start for r in windows)  # once folded, one series for all of them
    assert {r.operation for r in windows if r.window_start == last} <= {
        "GET /users/{id}/orders", "GET /health/a", "GET /health/b", "GET /health/c"}
    assert metrics.counter("templated_spans") == counts["GET /users/{id}/orders"]
    assert metrics.counter("overflow_spans") == 0


def test_a_flood_of_unique_span_names_is_capped_into_the_overflow_series(tmp_path):
    import numpy as np

    from bench.amplify import write_native
    from pipeline.model import SpanBatch

    n_batches, per = 100, 2000  # 200,000 spans, every one with its own name (no id in it to fold)
    batches = []
    for k in range(n_batches):
        names = tuple(f"GET /item/{letters(k * per + i)}" for i in range(per))
        batches.append(SpanBatch(
            services=("shop",), operations=names, instances=("pod",), service_idx=np.zeros(per, np.int32),
            op_idx=np.arange(per, dtype=np.int32), instance_idx=np.zeros(per, np.int32), kind=np.full(per, 2, np.int8),
            status=np.zeros(per, np.int8), end_ns=np.full(per, 1_700_000_000_000_000_000 + k * 10**8, np.int64),
            duration_ns=np.full(per, 10**6, np.int64), trace_id=np.full(per, b"\x01" * 16, "S16"),
            span_id=np.full(per, b"\x02" * 8, "S8"), parent_span_id=np.zeros(per, "S8"),
        ))  # fmt: skip
    write_native(batches, tmp_path / "flood")
    cfg = Config(windows=WindowsConfig(max_operations_per_service=500))
    got, metrics = run_replay([tmp_path / "flood"], cfg=cfg)
    windows = [r for r in got if isinstance(r, WindowResult)]
    assert sum(r.count for r in windows) == n_batches * per  # nothing lost
    operations = {r.operation for r in windows}
    assert len(operations) == 501 and "__overflow__" in operations
    assert sum(r.count for r in windows if r.operation == "__overflow__") == n_batches * per - 500


def test_a_record_with_broken_indexes_is_skipped_and_counted(tmp_path):
    import dataclasses

    from bench.amplify import load, write_native
    from pipeline.model import SpanBatch

    batches = [b for b in load([ONLINEBOUTIQUE]) if isinstance(b, SpanBatch)]
    broken = dataclasses.replace(batches[5], service_idx=batches[5].service_idx + 1000)  # no such service
    write_native([*batches[:5], broken, *batches[5:]], tmp_path / "rec")
    got, metrics = run_replay([tmp_path / "rec"])
    assert sum(r.count for r in got if isinstance(r, WindowResult)) == 22969
    assert metrics.counter("dropped", "recording_undecodable_record") == 1


def test_an_item_that_makes_a_step_raise_is_dead_lettered(tmp_path):
    import pickle

    from pipeline.deadletter import DeadLetters

    metrics = SelfMetrics()
    dead = DeadLetters(tmp_path / "dead", metrics, tries=3)
    calls = []

    def flaky(item):
        calls.append(item)
        if len(calls) < 3:
            raise MemoryError("transient")
        return [item * 2]

    assert dead.run("step", flaky, 21) == [42]  # passed on its third try
    assert dead.run("step", lambda item: 1 / 0, "poison") is None
    assert metrics.counter("dropped", "dead_letter") == 1
    (saved,) = list((tmp_path / "dead").glob("*.pkl"))
    doc = pickle.loads(saved.read_bytes())
    assert doc["step"] == "step" and doc["item"] == "poison" and "ZeroDivisionError" in doc["error"]


def test_the_flow_counts_its_own_progress_whatever_sinks_are_attached():
    from pipeline.flow import Outputs, build_flow

    metrics = SelfMetrics()
    run_main(build_flow(Config(), ReplaySource([ONLINEBOUTIQUE], metrics=metrics), Outputs(), metrics, idle_close=False))
    assert metrics.counter("processed_spans") == 22969 and metrics.counter("windows_closed") == 361
    assert metrics.counter("late_spans") == 0
