"""Event-time tumbling windows per (service, operation, span kind).

Plain, picklable state (no bytewax here; ``pipeline/steps.py`` wraps it), fed
with the partials of ``pipeline/preaggregate.py``:

- ``CardinalityLimiter`` (state per service): operations over the per-service
  limit are folded into one overflow operation, so series stay bounded.
- ``ServiceWindows`` (state per service): merges partials (into ``_Ops``, in
  ``pipeline/window_ops.py``: all operations of a window as rows of arrays), log counts and service-graph calls
  into open windows; all of a service's windows for
  a time range close together when its watermark passes ``window_end +
  allowed_lateness``, when it has been idle for ``idle_timeout`` on the injected
  clock, or at end of input. Spans for a window that already closed are counted
  as late, never merged silently.

A service's watermark follows its newest event time, taken into account only
once the source step that carried it is over (each batch carries its step,
``SpanBatch.step`` = (source partition, step number)). So every partial of one
step is merged before anything that step contains can close a window; sources
cut their input into fixed steps, so what closes when depends on the input
alone, not on timing. Per-service watermarks keep a service whose clock runs
behind from having its spans judged late by other services' clocks.

When a service's spans come from several source partitions (spool shards of a
``--processes`` cluster, several recordings), its watermark is the *lowest* of
the partitions' newest event times: a shard that is behind (a backlog after a
restart, a slower process) holds windows open instead of having its spans
judged late. A partition that has sent nothing for the service for
``partition_idle_s`` on the injected clock stops counting (its clients moved to
another process); replay passes None, so its output depends on the input alone.
"""

from __future__ import annotations

import math

from pipeline.config import MetricsConfig
from pipeline.metric_model import LateMetrics, MetricPartial, MetricPoints
from pipeline.metric_series import ServiceMetrics
from pipeline.model import (
    KIND_SERVER,
    OVERFLOW_OPERATION,
    Dependency,
    EdgePartial,
    LateEdges,
    LateLogs,
    LateSpans,
    LogPartial,
    Partial,
    ServiceWindow,
    TemplatedSpans,
    Tick,
)
from pipeline.preaggregate import WindowSpec
from pipeline.span_names import template
from pipeline.window_ops import _Ops, _ops_from_windows, _results, _Window

# Recovery snapshots name the classes they hold by module: these were defined here before
# (WindowSpec, _Ops, _Window), so their old names must keep resolving.
__all__ = ["CardinalityLimiter", "ServiceWindows", "WindowSpec", "_Ops", "_Window"]

MAX_GAPS = 64  # gaps in the input a service remembers (the newest), until its windows pass them


class CardinalityLimiter:
    """Per-service set of live operations; those past the limit become the overflow series.

    An operation stays live while it has been seen within ``expire_ns`` of event
    time; expired ones free their slot. State is small and picklable.
    """

    def __init__(self, limit: int, expire_ns: int) -> None:
        self.limit = limit
        self.expire_ns = expire_ns
        self.last_seen: dict[str, int] = {}
        self.watermark = 0

    def admit(self, operations: list[str], ends_ns: list[int], now_ns: int | None = None) -> list[str]:
        """The operations of a partial's rows as they are counted: each one, its template when
        names with ids in it (``pipeline/span_names.py``) would not fit otherwise, or the
        overflow operation when it does not fit. ``ends_ns``: each row's newest span end; ``now_ns``:
        how far the partial moves event time (``Partial.max_end_ns``). Within a batch,
        operations are admitted window by window, in the order of the operation table
        (deterministic: the input decides)."""
        self.watermark = max(self.watermark, max(ends_ns, default=0) if now_ns is None else now_ns)
        last_seen = self.last_seen
        out = []
        for op, end in zip(operations, ends_ns):
            seen = last_seen.get(op)
            if seen is None:
                folded = template(op)
                if folded != op and folded in last_seen:  # its template counts it already
                    op, seen = folded, last_seen[folded]
            if seen is None:
                if len(last_seen) >= self.limit:
                    self._expire()
                if len(last_seen) < self.limit:
                    last_seen[op] = end
                elif folded != op and self._fold(folded):
                    op = folded
                    last_seen[op] = end
                else:
                    op = OVERFLOW_OPERATION
            elif end > seen:
                last_seen[op] = end
            out.append(op)
        return out

    def _fold(self, folded: str) -> bool:
        """The limit is reached and a new name has ids in it: the live names with the same
        template give their slots to it (their next spans count under it). False when none
        does (no slot for the template either)."""
        same = [o for o in self.last_seen if template(o) == folded]
        for o in same:
            del self.last_seen[o]
        return bool(same)

    def _expire(self) -> None:
        horizon = self.watermark - self.expire_ns
        for op in [o for o, t in self.last_seen.items() if t < horizon]:
            del self.last_seen[op]


class _ServiceSlot:
    """Everything one service has in one open window."""

    __slots__ = ("ops", "logs", "error_logs", "instances", "calls_to", "metric_points")

    def __init__(self, nb: int, keep: int) -> None:
        self.ops = _Ops(nb, keep)
        self.metric_points: list[tuple] = []  # rows of MetricPartial
        self.logs = 0
        self.error_logs = 0
        self.instances: set[str] = set()
        self.calls_to: dict[str, list] = {}  # callee -> [sampled calls, errors, duration sum]


class ServiceWindows:
    """Open windows of one service (all its operations), its watermark and idle timer.

    Keyed by service so that every operation's window ``W`` closes at the same
    moment: what comes after (anomaly detection, scaling) sees the whole service
    for ``W`` at once, in an order that depends on the input alone. Picklable.

    A known service's windows are contiguous: a window in which it sent nothing
    closes *empty* (``ServiceWindow.silent_run`` counts such windows in a row), so
    what comes after sees its silence. Empty windows fill a gap when the next window
    with data closes (replay and live alike: the input decides; a window nothing was
    merged into stays open to late data until then, as before), and, live, keep
    closing on the injected clock while the service stays silent, one per window
    length after its idle timeout. At most ``silent_limit`` come in a row: by then
    the service is forgotten (``pipeline/service.py``).
    """

    def __init__(
        self, service: str, spec: WindowSpec, max_operations: int, expire_ns: int,
        partition_idle_s: float | None = None, silent_limit: int = 0, metrics: ServiceMetrics | None = None,
    ) -> None:  # fmt: skip
        self.service = service
        self.metrics = metrics if metrics is not None else ServiceMetrics.from_config(MetricsConfig())
        self.spec = spec
        self.limiter = CardinalityLimiter(max_operations, expire_ns)
        self.open: dict[int, _ServiceSlot] = {}
        self.watermark = -math.inf  # event time (ns) all contributing partitions have passed
        self.partition_idle_s = partition_idle_s
        # source partition -> [newest event time of its completed steps, its current step,
        #                      newest event time in that step, clock when last seen]
        self.partitions: dict[int, list] = {}
        self.closed_until = -math.inf  # end of the latest closed window (ns)
        self.last_activity = 0.0  # injected clock, seconds
        self.newest_ns = -math.inf  # newest event time any item moved (``progress_ns``)
        self.silent_limit = silent_limit  # empty windows in a row at most (0: none)
        self.silent_run = 0  # windows without spans, logs or calls closed since the last one with them
        self.idle_run = 0  # windows without anything (metric points neither) since the last one with data
        self.covered: set[int] = set()  # starts of windows not closed yet in which others' data was read (Tick)
        self.gaps: list[tuple[int, int]] = []  # gaps in the input (Tick) not yet behind the closed windows

    def bind(
        self, spec: WindowSpec, max_operations: int, expire_ns: int, partition_idle_s: float | None,
        silent_limit: int,
    ) -> list[ServiceWindow]:  # fmt: skip
        """Apply the configuration in force (after a restart from a snapshot). Windows built with
        another shape (length, sketch accuracy, histogram buckets) are closed as they are and
        returned; later data goes to windows of the new shape."""
        closed = []
        if spec.shape() != self.spec.shape():
            closed = self.close_all()
            if spec.length_ns != self.spec.length_ns and math.isfinite(self.closed_until):
                # windows of the new length start on its own boundaries: the one that holds the
                # change opens again (its earlier spans were counted in the closed window)
                self.closed_until = self.closed_until // spec.length_ns * spec.length_ns
        self.spec = spec
        self.limiter.limit, self.limiter.expire_ns = max_operations, expire_ns
        self.partition_idle_s = partition_idle_s
        self.silent_limit = silent_limit
        return closed

    def on_item(self, item: Partial | LogPartial | EdgePartial | MetricPartial | Tick, now: float) -> list:
        """Merge one item; returns what closed: late counts and ``ServiceWindow`` objects."""
        if isinstance(item, Tick):
            self._cover(item.windows)
            if item.gaps and item.gaps[-1][1] > self.closed_until:
                self.gaps = ([g for g in self.gaps if g[1] > self.closed_until] + list(item.gaps))[-MAX_GAPS:]
            return []
        self.last_activity = now
        partition, step = item.step
        st = self.partitions.get(partition)
        if st is None:
            st = self.partitions[partition] = [-math.inf, step, -math.inf, now]
        elif st[1] != step:  # the partition's previous step is complete: its times count now
            st[0], st[1], st[2] = max(st[0], st[2]), step, -math.inf
            self._advance_watermark(now)
        st[3] = now
        out: list = []
        late = item.window_start < self.closed_until
        if isinstance(item, Partial):
            moved = item.max_end_ns
            operations = self.limiter.admit(item.operations, item.row_end_ns, moved)
            folded = [i for i, (a, b) in enumerate(zip(item.operations, operations))
                      if a != b and b != OVERFLOW_OPERATION]  # fmt: skip
            if folded:
                out.append(TemplatedSpans(self.service, int(item.status_counts[folded].sum())))
            if late:
                counts = item.status_counts.sum(axis=1).tolist()
                out.extend(LateSpans(self.service, op, k, n) for op, k, n in zip(operations, item.kinds, counts))
            else:
                slot = self._slot(item.window_start)
                slot.ops.merge(item, operations)
                slot.instances.update(item.instances)
        elif isinstance(item, MetricPartial):
            moved = item.max_time_ns
            if late:
                out.append(LateMetrics(self.service, len(item.points)))
            else:
                self._slot(item.window_start).metric_points.extend(item.points)
        elif isinstance(item, LogPartial):
            moved = item.max_time_ns
            if late:
                out.append(LateLogs(self.service, item.records))
            else:
                slot = self._slot(item.window_start)
                slot.logs += item.records
                slot.error_logs += item.errors
        else:  # EdgePartial
            moved = item.max_end_ns
            if late:
                out.append(LateEdges(self.service, item.calls))
            else:
                c = self._slot(item.window_start).calls_to.setdefault(item.callee, [0, 0, 0.0])
                c[0] += item.calls
                c[1] += item.errors
                c[2] += item.duration_sum
        st[2] = max(st[2], moved)
        self.newest_ns = max(self.newest_ns, moved)
        horizon = self.watermark - self.spec.lateness_ns
        ready = sorted(s for s in self.open if s + self.spec.length_ns <= horizon)
        out.extend(self._close(ready))
        return out

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("newest_ns", self.watermark)  # snapshots of earlier versions
        self.__dict__.setdefault("silent_limit", 0)
        self.__dict__.setdefault("silent_run", 0)
        self.__dict__.setdefault("metrics", ServiceMetrics.from_config(MetricsConfig()))
        self.__dict__.setdefault("idle_run", self.__dict__["silent_run"])
        self.__dict__.setdefault("covered", set())
        self.__dict__.setdefault("gaps", [])
        self.__dict__.pop("late_logs", None)
        for slot in self.open.values():
            if isinstance(slot.ops, dict):  # a recovery snapshot from before the columnar windows
                slot.ops = _ops_from_windows(slot.ops, self.spec.bounds.size + 1, self.spec.exemplars)

    def resumed(self, now: float) -> None:
        """After a restart from a snapshot: idle timers (service and partitions) start over, so a
        shard whose backlog is still to be read keeps holding the watermark."""
        self.last_activity = now
        for st in self.partitions.values():
            st[3] = now

    def _advance_watermark(self, now: float) -> None:
        """The lowest completed event time over the partitions that feed this service (a
        partition silent for ``partition_idle_s`` no longer counts). Items of one step may
        interleave with other partitions' (bytewax exchanges them), so a step is over only
        when the next step *of the same partition* begins."""
        idle = self.partition_idle_s
        live = [st[0] for st in self.partitions.values() if idle is None or now - st[3] <= idle]
        if live:
            self.watermark = max(self.watermark, min(live))

    def _cover(self, windows: tuple[int, ...]) -> None:
        """Others' data was read in these windows: they are not a gap in the input."""
        if not self.silent_limit or not (self.open or math.isfinite(self.closed_until)):
            return  # a service not seen yet has no windows to cover
        length = self.spec.length_ns
        base = self._next_boundary() if math.isfinite(self.closed_until) else min(self.open)
        top = base + (self.silent_limit + len(self.open)) * length
        self.covered.update(w // length * length for w in windows if base <= w < top)

    def _slot(self, start: int) -> _ServiceSlot:
        slot = self.open.get(start)
        if slot is None:
            slot = self.open[start] = _ServiceSlot(self.spec.bounds.size + 1, self.spec.exemplars)
        return slot

    def idle_deadline(self) -> float | None:
        """Clock time of the next idle close: open windows after ``idle_timeout_s`` without
        traffic, then one empty window per window length of silence (None: nothing to close)."""
        idle = self.spec.idle_timeout_s
        if self.open:
            return self.last_activity + idle
        if not self.silent_limit or self.idle_run >= self.silent_limit or not math.isfinite(self.closed_until):
            return None
        # Event time is taken to run on with the clock from the newest time seen; the next empty
        # window closes when that passes its end plus the lateness and the idle timeout (data
        # that was merely slow then still finds its window open).
        due_ns = self._next_boundary() + self.spec.length_ns + self.spec.lateness_ns - self.newest_ns
        return self.last_activity + idle + max(0.0, due_ns / 1e9)

    def on_idle(self, now: float) -> list:
        closed: list = []
        while (deadline := self.idle_deadline()) is not None and now >= deadline:
            if self.open:
                closed.extend(self.close_all())
            else:
                start = self._next_boundary()
                closed.extend(self._empty_until(start + self.spec.length_ns, on_clock=True))
        return closed

    def close_all(self) -> list:
        return self._close(sorted(self.open))

    def _next_boundary(self) -> int:
        """Start of the first window not closed yet."""
        length = self.spec.length_ns
        return -(-int(self.closed_until) // length) * length

    def _empty_until(self, start: int, on_clock: bool = False) -> list[ServiceWindow]:
        """Empty windows from the first one not closed up to ``start`` (at most up to the silent
        limit; a longer gap is skipped: the service was forgotten by then).

        Filling a gap when data returns, a window in which no source step read anyone's data
        (no ``Tick`` covered it) was a gap in the input, not this service's silence: it is
        ``blind`` and counts in no silent run. Windows closed on the clock (live, nothing
        arriving at all) are silence: the daemon was there to receive."""
        if not self.silent_limit or not math.isfinite(self.closed_until):
            return []
        length = self.spec.length_ns
        out = []
        at = self._next_boundary()
        made = 0
        while at < start and self.idle_run < self.silent_limit and made < self.silent_limit:
            made += 1
            blind = not on_clock and at not in self.covered
            if not blind:
                self.silent_run += 1
                self.idle_run += 1
            metrics, _, _ = self.metrics.close_window([], at + length)  # values hold until stale
            out.append(ServiceWindow(
                service=self.service, window_start=at, window_end=at + length, results=(),
                instances=tuple(sorted(self.metrics.instances())), logs=0, error_logs=0, server_calls=0,
                server_errors=0, server_p95=math.nan, silent_run=self.silent_run, metrics=metrics,
                idle_run=self.idle_run, blind=blind, gap=self._in_gap(at),
            ))  # fmt: skip
            at += length
        self.closed_until = max(self.closed_until, start)
        if self.covered:
            self.covered = {w for w in self.covered if w >= self.closed_until}
        return out

    def _close(self, starts: list[int]) -> list:
        """The windows that start at ``starts``: a ``ServiceWindow`` each (after the empty ones
        before it), preceded by a ``MetricPoints`` count when metric points went in."""
        closed: list = []
        length = self.spec.length_ns
        for start in starts:
            closed.extend(self._empty_until(start))
            slot = self.open.pop(start)
            self.closed_until = max(self.closed_until, start + length)
            self.covered.discard(start)
            results, server = _results(self.service, start, length, slot.ops, self.spec.mapping)
            points = getattr(slot, "metric_points", [])  # slots of older snapshots have none
            metrics, taken, overflow = self.metrics.close_window(points, start + length)
            if points:
                closed.append(MetricPoints(self.service, start, taken, overflow))
            quiet = not results and not slot.logs and not slot.calls_to
            self.silent_run = self.silent_run + 1 if quiet else 0
            self.idle_run = self.idle_run + 1 if quiet and not points else 0
            closed.append(
                ServiceWindow(
                    service=self.service,
                    window_start=start,
                    window_end=start + length,
                    results=results,
                    instances=tuple(sorted({i for i in slot.instances if i} | self.metrics.instances())),
                    logs=slot.logs,
                    error_logs=slot.error_logs,
                    server_calls=server.count,
                    server_errors=int(sum(r.errors for r in results if r.span_kind == KIND_SERVER)),
                    server_p95=server.quantile(0.95) if server.count else math.nan,
                    dependencies=tuple(
                        Dependency(callee, c[0], c[1], c[2] / c[0]) for callee, c in sorted(slot.calls_to.items())
                    ),
                    silent_run=self.silent_run,
                    metrics=metrics,
                    idle_run=self.idle_run,
                    gap=self._in_gap(start),
                )
            )
        return closed

    def _in_gap(self, start: int) -> bool:
        """Is part of the window at ``start`` in a gap of the input?"""
        end = start + self.spec.length_ns
        return any(a < end and b > start for a, b in self.gaps)
