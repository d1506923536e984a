"""Alerts and scaling events through the whole dataflow: detected, deterministic, same on 2 workers."""

import orjson
import pytest
from bytewax.testing import TestingSink, cluster_main

from bench.amplify import load, write_native
from bench.anomaly_eval import Incident, inject, looped
from pipeline.config import Config
from pipeline.flow import Outputs, build_flow
from pipeline.model import SpanBatch
from pipeline.selfmetrics import SelfMetrics
from sources.replay import ReplaySource
from telepipe import daemon

from .conftest import ONLINEBOUTIQUE

S = 10**9
OP = ("productcatalogservice", "hipstershop.ProductCatalogService/GetProduct")


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    base = [b for b in load([ONLINEBOUTIQUE]) if isinstance(b, SpanBatch)]
    clean, first, _ = looped(base, 0.33)
    start = (first // (10 * S) + 1) * 10 * S + 12 * 60 * S
    incident = Incident("latency", *OP, start, start + 90 * S)
    path = tmp_path_factory.mktemp("rec") / "native"
    write_native(inject(clean, [incident]), path)
    return path, incident


def test_latency_incident_fires_and_output_is_byte_identical(recording, tmp_path):
    path, incident = recording
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.jsonl"
        daemon.replay(Config(), [str(path)], emit_jsonl=str(out))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    docs = [orjson.loads(x) for x in outs[0].splitlines()]
    alerts = [d for d in docs if d["type"] == "alert"]
    firing = [d for d in alerts if d["state"] == "firing"]
    assert [(d["service"], d["operation"]) for d in firing] == [OP]
    assert incident.start <= firing[0]["time"] <= incident.start + 20 * S  # within two windows
    assert firing[0]["feature"].startswith("latency_") and len(firing[0]["trace_ids"]) == 5
    assert firing[0]["ranking"][0]["operation"] == OP[1]
    assert any(d["state"] == "resolved" for d in alerts)
    assert {"type", "state", "service", "operation", "feature", "time"} <= set(firing[0])
    scaling = [d for d in docs if d["type"] == "scaling"]
    assert scaling and {"service", "time", "observed", "desired", "reason"} <= set(scaling[0])


def test_events_identical_on_one_and_two_workers(recording):
    path, _ = recording

    def events(workers):
        got = []
        m = SelfMetrics()
        flow = build_flow(Config(), ReplaySource([path], metrics=m), Outputs(result_sinks=[TestingSink(got)]), m,
                          idle_close=False)  # fmt: skip
        if workers == 1:
            from bytewax.testing import run_main

            run_main(flow)
        else:
            cluster_main(flow, [], 0, worker_count_per_proc=workers)
        return sorted(orjson.dumps(x.to_json()) for x in got if hasattr(x, "to_json"))

    one = events(1)
    assert any(b'"alert"' in x for x in one)
    assert one == events(2)
