"""Steps that fail lose nothing twice: analysis failures are set aside per window, with their
traceback, and the window results still come out; nothing that changes state is retried."""

import pickle
import random

import orjson
from bytewax.testing import TestingSink, run_main

from bench.amplify import amplify, load, write_native
from pipeline.anomaly import ServiceAnomaly
from pipeline.config import Config
from pipeline.deadletter import DeadLetters
from pipeline.flow import Outputs, build_flow
from pipeline.model import SpanBatch, WindowResult
from pipeline.scaling import ServiceScaler
from pipeline.selfmetrics import SelfMetrics
from sources.replay import ReplaySource

from .conftest import ONLINEBOUTIQUE


def replay(path, dead_dir=None):
    got: list = []
    metrics = SelfMetrics()
    flow = build_flow(Config(), ReplaySource([path], metrics=metrics), Outputs(result_sinks=[TestingSink(got)]), metrics,
                      idle_close=False, dead_letter_dir=dead_dir)  # fmt: skip
    run_main(flow)
    return got, metrics


def windows(got):
    return sorted(orjson.dumps(x.to_json()) for x in got if isinstance(x, WindowResult))


def test_random_exceptions_in_analysis_leave_the_window_counts_identical(tmp_path, monkeypatch):
    base = [b for b in load([ONLINEBOUTIQUE]) if isinstance(b, SpanBatch)]
    write_native(list(amplify(base, 5)), tmp_path / "rec")
    clean, _ = replay(tmp_path / "rec")

    rng = random.Random(11)
    injected = []

    def flaky(method, name):
        def wrapper(self, sw, *args):
            if rng.random() < 0.3:
                injected.append(name)
                raise RuntimeError(f"injected failure in {name}")
            return method(self, sw, *args)

        return wrapper

    monkeypatch.setattr(ServiceAnomaly, "on_window", flaky(ServiceAnomaly.on_window, "anomaly"))
    monkeypatch.setattr(ServiceScaler, "on_window", flaky(ServiceScaler.on_window, "scaling"))
    got, metrics = replay(tmp_path / "rec", dead_dir=tmp_path / "dead")
    assert len(injected) > 50 and {"anomaly", "scaling"} == set(injected)
    assert windows(got) == windows(clean)  # every window result, every count, as without failures
    assert metrics.counter("dropped", "dead_letter") == len(injected)  # each failure set aside once, never retried
    letters = [pickle.loads(p.read_bytes()) for p in (tmp_path / "dead").glob("*.pkl")]
    assert len(letters) == len(injected)
    for doc in letters:
        assert doc["step"] in ("anomaly", "scaling") and doc["item"].window_end > doc["item"].window_start
        assert doc["traceback"].startswith("Traceback (most recent call last)")
        assert f"injected failure in {doc['step']}" in doc["traceback"] and "in wrapper" in doc["traceback"]


def test_a_stateful_step_is_tried_once_and_a_pure_one_again():
    metrics = SelfMetrics()
    dead = DeadLetters(None, metrics, tries=3)
    calls = []

    def fails(item):
        calls.append(item)
        raise ValueError("no")

    assert dead.run("merge", fails, 1, tries=1) is None and calls == [1]
    assert dead.run("preaggregate", fails, 2) is None and calls == [1, 2, 2, 2]
    assert metrics.counter("dropped", "dead_letter") == 2


def test_a_dead_letter_that_cannot_be_written_never_escapes(tmp_path):
    metrics = SelfMetrics()
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    dead = DeadLetters(blocked, metrics)
    assert dead.run("merge", lambda item: 1 / 0, "poison", tries=1) is None
    unpicklable = lambda: None  # noqa: E731
    dead = DeadLetters(tmp_path / "dead", metrics)
    dead.set_aside("merge", unpicklable, RuntimeError("x"))
    assert metrics.counter("dropped", "dead_letter") == 2
    assert metrics.counter("dropped", "dead_letter_unsaved") == 2


def test_dead_letters_on_disk_are_bounded(tmp_path):
    metrics = SelfMetrics()
    dead = DeadLetters(tmp_path / "dead", metrics, max_files=5)
    for i in range(12):
        dead.set_aside("merge", i, RuntimeError(str(i)))
    assert len(list((tmp_path / "dead").glob("*.pkl"))) == 5
    assert metrics.counter("dropped", "dead_letter") == 12  # all counted, the first 5 kept
