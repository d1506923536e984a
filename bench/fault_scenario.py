"""Scenarios of bench/fault_eval.py, built in memory, and the dataflow run over them.

A scenario is a fault-free recording looped back to back (trace, span and log ids rewritten
per loop, times shifted), then a labelled fault recording as it is, with its metrics file
merged in by time. Loops follow each other every ``period``: the recording's span-end
span rounded up to whole windows, so every loop sits at the same phase against the
window boundaries. The last loop's last span ends one window before the fault
recording's first span.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.testing import TestingSink, run_main

from bench.amplify import _span_bounds, load, shifted
from pipeline.batch_codec import Steps
from pipeline.config import Config, MetricTargetConfig, ScalingConfig
from pipeline.flow import Outputs, build_flow
from pipeline.metric_model import MetricBatch
from pipeline.model import LogBatch, SpanBatch
from pipeline.selfmetrics import SelfMetrics
from sources.replay import iter_steps

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FAULTS = DATA / "faults"
RECORDINGS = DATA / "recordings"
S = 1_000_000_000
WINDOW = 10 * S
LOOPS = 12
CPU = "container.cpu.utilization"


@dataclass(frozen=True)
class Label:
    name: str
    service: str
    pod: str
    type: str
    inject_unix_s: int
    baseline: str
    phase_ns: int = 0  # the whole scenario moved this much later (its phase against the windows)

    @property
    def inject_ns(self) -> int:
        return self.inject_unix_s * S + self.phase_ns


@dataclass
class Scenario:
    label: Label
    batches: list  # SpanBatch | LogBatch | MetricBatch, in event-time order
    loops_first_ns: int  # first span end of the first loop
    loops_last_ns: int  # last span end of the last loop
    fault_first_ns: int  # first span end of the fault recording
    fault_last_ns: int
    period_ns: int
    spans: int


def labels(faults_dir: Path = FAULTS) -> list[Label]:
    return [Label(**f) for f in json.loads((faults_dir / "faults.json").read_text())]


def default_config(system: str) -> Config:
    """Defaults; OnlineBoutique scenarios also scale on (and so judge) pod CPU."""
    if system == "ob":
        return Config(scaling=ScalingConfig(metrics=(MetricTargetConfig(name=CPU, target=0.7),)))
    return Config()


def system_of(name: str) -> str:
    return name.split("-", 1)[0]  # "ob" or "tt" (scenarios and baselines alike)


# ------------------------------------------------------------------------------ construction


def _rewrite_hex(ids: list[str], k: int) -> list[str]:
    """Log records' hex ids rewritten as ``_rewrite`` does span ids ('' stays '')."""
    out = []
    for h in ids:
        if not h:
            out.append(h)
            continue
        raw = bytearray.fromhex(h)
        raw[-1] ^= k & 0xFF
        raw[0] ^= (k >> 8) & 0xFF
        out.append(raw.hex())
    return out


def copy_of(batch, shift_ns: int, k: int):
    """``batch`` shifted by ``shift_ns`` with its ids rewritten for copy ``k`` (k > 0)."""
    if isinstance(batch, MetricBatch):
        return dataclasses.replace(batch, time_ns=batch.time_ns + shift_ns, start_ns=batch.start_ns + shift_ns)
    out = shifted(batch, shift_ns, k)
    if isinstance(batch, LogBatch):
        out = dataclasses.replace(out, trace_id=_rewrite_hex(batch.trace_id, k), span_id=_rewrite_hex(batch.span_id, k))
    return out


def moved(batch, shift_ns: int):
    """``batch`` with every time ``shift_ns`` later, ids kept."""
    if isinstance(batch, SpanBatch):
        return dataclasses.replace(batch, end_ns=batch.end_ns + shift_ns)
    if isinstance(batch, MetricBatch):
        return dataclasses.replace(batch, time_ns=batch.time_ns + shift_ns, start_ns=batch.start_ns + shift_ns)
    return dataclasses.replace(batch, time_ns=batch.time_ns + shift_ns)


def loop_period(batches: list, window_ns: int = WINDOW) -> int:
    """Back to back: the next copy's first span ends one mean span spacing after this copy's last
    (a period rounded up to whole windows left up to a window without spans at every loop, a dip
    in every call rate that made its learned spread, and so any drop, several times too wide)."""
    first, last = _span_bounds(batches)
    spans = sum(len(b) for b in batches if isinstance(b, SpanBatch))
    return (last - first) + max(1, (last - first) // max(spans, 1))


def looped(batches: list, copies: int, first_shift_ns: int, window_ns: int = WINDOW) -> Iterator:
    """``copies`` back-to-back copies; copy k shifted by ``first_shift_ns + k * period``, ids
    rewritten with k + 1 (no copy keeps the recording's own ids)."""
    period = loop_period(batches, window_ns)
    for k in range(copies):
        for b in batches:
            yield copy_of(b, first_shift_ns + k * period, k + 1)


def event_time(batch) -> int:
    if isinstance(batch, SpanBatch):
        return batch.last_end_ns()
    return int(batch.time_ns.max()) if len(batch) else 0


def merge_by_time(stream: Iterable, extra: list) -> Iterator:
    """``stream`` in its own order, with the batches of ``extra`` (sorted by time) put in
    before the first batch of ``stream`` that moves event time past them."""
    pending = sorted(extra, key=event_time)
    i, high = 0, None
    for b in stream:
        t = event_time(b)
        high = t if high is None else max(high, t)
        while i < len(pending) and event_time(pending[i]) <= high:
            yield pending[i]
            i += 1
        yield b
    yield from pending[i:]


def build_scenario(
    label: Label, base: list, fault: list, metrics: list = (), loops: int = LOOPS, window_ns: int = WINDOW
) -> Scenario:
    """The baseline ``base`` looped ``loops`` times so that its last span ends one window before
    the fault recording's first span, then ``fault``; ``metrics`` (not shifted) merged in by time."""
    first, last = _span_bounds(base)
    period = loop_period(base, window_ns)
    fault_first, fault_last = _span_bounds(fault)
    last_shift = fault_first - window_ns - last
    first_shift = last_shift - (loops - 1) * period
    stream = list(merge_by_time([*looped(base, loops, first_shift, window_ns), *fault], list(metrics)))
    spans = sum(len(b) for b in stream if isinstance(b, SpanBatch))
    if label.phase_ns:  # everything, the fault recording and its metrics too, moved against the windows
        stream = [moved(b, label.phase_ns) for b in stream]
    d = label.phase_ns
    return Scenario(label, stream, first + first_shift + d, last + last_shift + d, fault_first + d, fault_last + d,
                    period, spans)  # fmt: skip


class Cache:
    """Recordings read once per process (batches are never changed in place)."""

    def __init__(self, faults_dir: Path = FAULTS, recordings_dir: Path = RECORDINGS) -> None:
        self.faults_dir, self.recordings_dir = faults_dir, recordings_dir
        self.loaded: dict[Path, list] = {}

    def get(self, path: Path) -> list:
        if path not in self.loaded:
            self.loaded[path] = load([path])
        return self.loaded[path]

    def baseline(self, name: str) -> list:
        return self.get(self.recordings_dir / name)

    def scenario(self, label: Label, loops: int = LOOPS) -> Scenario:
        fault = self.get(self.faults_dir / f"{label.name}.otlp.jsonl.zst")
        mpath = self.faults_dir / f"{label.name}.metrics.otlp.jsonl.zst"
        metrics = self.get(mpath) if mpath.exists() else []
        return build_scenario(label, self.baseline(label.baseline), fault, metrics, loops)


def quiet_batches(base: list, hours: float, phase_ns: int, window_ns: int = WINDOW) -> tuple[list, float]:
    """``base`` looped for ``hours`` of traffic, every time moved ``phase_ns`` later; returns the
    batches and the hours they cover (whole loops)."""
    period = loop_period(base, window_ns)
    copies = max(1, math.ceil(hours * 3600 * S / period))
    return list(looped(base, copies, phase_ns, window_ns)), copies * period / 3600 / S


# ------------------------------------------------------------------------------ the dataflow


class _Partition(StatefulSourcePartition):
    def __init__(self, batches: list) -> None:
        self.steps = iter_steps(iter(batches))  # the replay source's steps: 32 batches, spans merged
        self.stamp = Steps(0, 0).stamp

    def next_batch(self) -> list:
        step = next(self.steps, None)
        if step is None:
            raise StopIteration()
        return self.stamp(step)

    def snapshot(self) -> None:
        return None


class MemorySource(FixedPartitionedSource):
    """Batches in memory, in the given order, through one partition."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def list_parts(self) -> list[str]:
        return ["memory"]

    def build_part(self, step_id: str, for_part: str, resume_state):
        return _Partition(self.batches)


def run(batches: list, cfg: Config) -> tuple[list, float]:
    """Every item the per-service step emits, at max speed, idle closing off (deterministic)."""
    got: list = []
    flow = build_flow(cfg, MemorySource(batches), Outputs(result_sinks=[TestingSink(got)]), SelfMetrics(),
                      idle_close=False)  # fmt: skip
    t0 = time.perf_counter()
    run_main(flow)
    return got, time.perf_counter() - t0
