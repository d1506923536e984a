"""bench/load's requests: the recording's call trees, fresh ids on every send, timestamps now."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.load import RecordedTraces, SyntheticTraces, Template, recorded_traces


def spans_of(body: bytes) -> list[tuple[str, object]]:
    req = ExportTraceServiceRequest.FromString(body)
    out = []
    for rs in req.resource_spans:
        svc = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
        out += [(svc, s) for ss in rs.scope_spans for s in ss.spans]
    return out


def edges(spans) -> Counter:
    service = {s.span_id: svc for svc, s in spans}
    return Counter((service[s.parent_span_id], svc) for svc, s in spans
                   if s.parent_span_id and service[s.parent_span_id] != svc)  # fmt: skip


@pytest.fixture(scope="module")
def recorded():
    return RecordedTraces()


def test_recorded_traces_keep_the_recordings_call_tree():
    traces = recorded_traces()
    assert sum(map(len, traces)) == 22_969 and len(traces) == 502  # every span of the recording, in its trace
    for trace in traces:
        assert all(-1 <= p < i for i, (*_, p) in enumerate(trace))  # parents first


@pytest.mark.parametrize("spans", [1, 64, 512])
def test_every_parent_is_in_the_request_and_edges_are_the_recordings(recorded, spans):
    recording_edges = set()
    for trace in recorded_traces():
        recording_edges |= {(trace[p][0], svc) for svc, _, _, p in trace if p >= 0 and trace[p][0] != svc}
    for seed in range(4):
        got = spans_of(Template(spans, seed, recorded).at(time.time_ns(), salt=seed + 1))
        assert len(got) == spans
        ids = {s.span_id for _, s in got}
        assert len(ids) == spans and all(len(i) == 8 and any(i) for i in ids)
        assert all(s.parent_span_id in ids for _, s in got if s.parent_span_id)
        assert set(edges(got)) <= recording_edges
    big = spans_of(Template(4096, 1, recorded).at(time.time_ns()))
    assert len(set(edges(big))) >= 8  # the recording has 13 (service -> service) edges


def test_each_send_is_new_traffic_with_the_same_tree(recorded):
    t = Template(512, 3, recorded)
    now = time.time_ns()
    a, b = spans_of(t.at(now, salt=1)), spans_of(t.at(now, salt=2**64 - 1))
    assert not {s.span_id for _, s in a} & {s.span_id for _, s in b}
    assert not {s.trace_id for _, s in a} & {s.trace_id for _, s in b}
    assert len({s.trace_id for _, s in a}) > 1  # several traces in a request
    # same spans, same parents (by position), same traces (by grouping)
    assert [(svc, s.name, s.kind, s.status.code) for svc, s in a] == [(svc, s.name, s.kind, s.status.code) for svc, s in b]
    pos_a = {s.span_id: i for i, (_, s) in enumerate(a)}
    pos_b = {s.span_id: i for i, (_, s) in enumerate(b)}
    assert [pos_a.get(s.parent_span_id) for _, s in a] == [pos_b.get(s.parent_span_id) for _, s in b]
    group_a = [sorted(i for i, (_, s) in enumerate(a) if s.trace_id == t) for t in {s.trace_id for _, s in a}]
    group_b = [sorted(i for i, (_, s) in enumerate(b) if s.trace_id == t) for t in {s.trace_id for _, s in b}]
    assert sorted(group_a) == sorted(group_b)
    for _, s in a:  # ending within the second before now, heavy-tailed but positive durations
        assert now - 1_000_000_000 <= s.end_time_unix_nano < now and s.start_time_unix_nano < s.end_time_unix_nano
        assert len(s.attributes) == 10


def test_synthetic_traces_cover_the_pairs_and_stay_mostly_within_a_service():
    traces = SyntheticTraces(1000)
    seen, cross, children = set(), 0, 0
    for seed in range(2):
        got = spans_of(Template(512, seed, traces, start=seed * 512).at(time.time_ns(), salt=seed + 7))
        ids = {s.span_id for _, s in got}
        assert all(s.parent_span_id in ids for _, s in got if s.parent_span_id)
        seen |= {(svc, s.name) for svc, s in got}
        cross += sum(edges(got).values())
        children += sum(1 for _, s in got if s.parent_span_id)
    assert len(seen) == 1000
    assert 0 < cross < children / 10
