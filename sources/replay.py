"""Recordings as a bytewax source, for ``telepipe replay`` and benchmarks.

Accepted forms (one partition per path):

- OTLP/JSON lines, as the Collector's file exporter writes them (``.jsonl``,
  also ``.jsonl.zst`` / ``.jsonl.gz``): traces, logs and metrics requests;
- native recordings: spool segment files (``*.seg``) or a directory of them,
  as written by ``telepipe run --record DIR``.

Both become the same batches as live traffic. Event time is kept as recorded.
With ``speed`` a factor, batches are paced by their event time (``next_awake``,
never sleeping), every recording from the same origin (the earliest event time of
any); with ``speed=None`` (max) they are read as fast as possible.
The output does not depend on the speed: windows work on event time only.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import zstandard
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from pipeline.batch_codec import Batch, Steps, coalesce
from pipeline.batch_codec import decode as batch_from_bytes
from pipeline.decode import DecodeLimits, MalformedRequest, decode_json_line
from pipeline.metric_model import MetricBatch
from pipeline.model import LogBatch, SpanBatch
from pipeline.selfmetrics import SelfMetrics
from sources.spool import list_segments, read_records, segment_name

# Records read per step and merged into one batch: a fixed count, so the batches the
# flow sees (and so its output) do not depend on the replay speed.
RECORDS_PER_STEP = 32


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def open_text(path: Path) -> io.BufferedIOBase:
    """Open a possibly compressed file for reading bytes."""
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(raw, buffer_size=1 << 20)  # adds line iteration
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def is_native(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".seg"


def iter_batches(
    path: Path, metrics: SelfMetrics, limits: DecodeLimits = DecodeLimits()
) -> Iterator[Batch]:
    """Every batch of one recording, in file order. Bad lines are counted, not fatal."""
    if is_native(path):
        files = [path / segment_name(s) for s in list_segments(path)] if path.is_dir() else [path]
        for seg in files:
            size = seg.stat().st_size
            with open(seg, "rb") as f:
                offset = 0
                while offset < size:
                    res = read_records(f, offset, size, 256, 16 * 1024 * 1024)
                    for payload in res.payloads:
                        try:
                            yield batch_from_bytes(payload)
                        except ValueError as exc:
                            metrics.dropped("recording_undecodable_record", 1, detail=f"{seg}: {exc}")
                    offset = res.offset
                    if res.corrupt:
                        metrics.dropped("recording_corrupt_record", 1, detail=f"{seg} at {offset}")
                        break
                    if not res.payloads:
                        break
        return
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                decoded = decode_json_line(line, limits)
            except MalformedRequest as exc:
                metrics.dropped("recording_bad_line", 1, detail=f"{path}:{lineno}: {exc}")
                continue
            for d in decoded:
                signal = {LogBatch: "logs", MetricBatch: "metric_points"}.get(type(d.batch), "spans")
                if d.rejected:
                    metrics.inc(f"rejected_{signal}", d.rejected, "invalid")
                if d.batch is not None:
                    yield d.batch


def iter_steps(batches: Iterator[Batch]) -> Iterator[list[Batch]]:
    """Fixed groups of ``RECORDS_PER_STEP`` batches, span batches of a group merged."""
    group: list[Batch] = []
    for b in batches:
        group.append(b)
        if len(group) == RECORDS_PER_STEP:
            yield coalesce(group)
            group = []
    if group:
        yield coalesce(group)


def _step_time(step: list[Batch]) -> int:
    return max(_event_time(b) for b in step)


def _event_time(batch: Batch) -> int:
    if isinstance(batch, SpanBatch):
        return batch.last_end_ns()
    return int(batch.time_ns.max()) if len(batch) else 0


class _ReplayPartition(StatefulSourcePartition[Batch, int]):
    def __init__(
        self, index: int, path: Path, resume: int | None, speed: float | None, metrics, limits, now, start_ns: int
    ) -> None:  # fmt: skip
        self.steps = iter_steps(iter_batches(path, metrics, limits))
        self.position = resume or 0
        self.stamp = Steps(index, self.position).stamp
        for _ in range(self.position):  # resume: skip what was already emitted
            next(self.steps, None)
        self.speed = speed
        self.now = now
        self.pending: list[Batch] | None = None
        self.origin: tuple[datetime, int] | None = None  # (wall, event ns) when reading began
        self.start_ns = start_ns  # event time of the earliest first step over all the recordings
        self.wake: datetime | None = None

    def next_batch(self) -> list[Batch]:
        if self.pending is None:
            self.pending = next(self.steps, None)
            if self.pending is None:
                raise StopIteration()
        if self.speed is None:
            out, self.pending = self.pending, None
            self.position += 1
            return self.stamp(out)
        t = _step_time(self.pending)
        now = self.now()
        if self.origin is None:
            # Every recording is paced from the same event time: a metrics file that begins ten
            # minutes before its traces is read ten minutes (at speed 1) ahead of them, not beside.
            self.origin = (now, min(t, self.start_ns) if self.start_ns else t)
        due = self.origin[0] + timedelta(seconds=max(0, t - self.origin[1]) / 1e9 / self.speed)
        if due > now:
            self.wake = due
            return []
        self.wake = None
        out, self.pending = self.pending, None
        self.position += 1
        return self.stamp(out)

    def next_awake(self) -> datetime | None:
        return self.wake

    def snapshot(self) -> int:
        return self.position


class ReplaySource(FixedPartitionedSource[Batch, int]):
    """One partition per recording path; resume state: the number of steps emitted."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        speed: float | None = None,
        metrics: SelfMetrics | None = None,
        limits: DecodeLimits = DecodeLimits(),
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"recording not found: {p}")
        self.speed = speed
        self.metrics = metrics or SelfMetrics()
        self.limits = limits
        self.now = now
        self.start_ns = 0 if speed is None else min(self._first_step_time(p) for p in self.paths)

    def _first_step_time(self, path: Path) -> int:
        first = next(iter_steps(iter_batches(path, SelfMetrics(), self.limits)), None)
        return _step_time(first) if first else 2**63 - 1

    def list_parts(self) -> list[str]:
        return [f"{i}:{p}" for i, p in enumerate(self.paths)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None):
        index = int(for_part.split(":", 1)[0])
        return _ReplayPartition(
            index, self.paths[index], resume_state, self.speed, self.metrics, self.limits, self.now, self.start_ns
        )
