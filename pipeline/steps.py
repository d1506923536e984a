"""The bytewax steps that wrap telepipe's plain state classes, a few lines each.

- ``JoinedSource`` wraps any partitioned source of batches: each partition keeps a
  ``LinkJoiner`` (``pipeline/servicegraph.py``) and puts each span batch's
  cross-service calls (``EdgePartial``) right after it, in read order.
- ``ServiceStep`` is the keyed state of one service: a ``ServiceState``
  (``pipeline/service.py``) fed with its pre-aggregates, woken on the injected
  clock for idle closing, snapshotted as a pickle.
- ``IncidentStep`` holds the one ``IncidentTracker`` (``pipeline/incidents.py``),
  fed every service's window summaries; live, it takes what it buffered after an
  idle timeout on the injected clock.

State restored from a recovery snapshot gets the configuration in force (``bind``):
snapshots hold state, never configuration. A service forgotten after
``prometheus.service_stale_after_s`` of silence has its state dropped
(``StatefulLogic.DISCARD``).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import numpy as np
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulLogic

from pipeline import servicegraph
from pipeline.config import Config, DbConfig
from pipeline.db_analysis import DbAnalyzer
from pipeline.deadletter import DeadLetters
from pipeline.dimensions import dense_unique
from pipeline.exceptions import count_exceptions
from pipeline.incidents import IncidentTracker
from pipeline.metric_model import MetricBatch
from pipeline.model import LogBatch, ServiceExpired, SpanBatch, Tick
from pipeline.preaggregate import WindowSpec
from pipeline.service import ServiceState

log = logging.getLogger("telepipe.servicegraph")

Clock = Callable[[], float]  # seconds since the epoch


class ServiceStep(StatefulLogic[object, object, bytes]):
    """bytewax wrapper of ``ServiceState`` for one service."""

    def __init__(
        self, cfg: Config, spec: WindowSpec, clock: Clock, idle: bool, close_at_eof: bool, dead: DeadLetters,
        resume: bytes | None,
    ) -> None:  # fmt: skip
        self.cfg, self.spec, self.clock, self.idle, self.close_at_eof = cfg, spec, clock, idle, close_at_eof
        self.dead = dead
        # A source partition silent for this service for the idle timeout stops holding its
        # watermark back (live only: replay closes by the input alone).
        self.partition_idle = cfg.windows.idle_timeout_s if idle else None
        self.state: ServiceState | None = None
        if resume is not None:  # restored after a restart: today's config, and the idle timers start over
            self.state = pickle.loads(resume)
            self.state.bind(cfg, spec, self.partition_idle, dead)
            self.state.windows.resumed(clock())

    def _done(self, out: list | None) -> tuple[list, bool]:
        expired = self.state is not None and self.state.expired
        return out or [], StatefulLogic.DISCARD if expired else StatefulLogic.RETAIN

    def on_item(self, value):
        if self.state is None:
            self.state = ServiceState(self.cfg, self.spec, value.service, self.partition_idle)
            self.state.bind(self.cfg, self.spec, self.partition_idle, self.dead)
        # Merging changes state: a failure is set aside at once, never retried (analysis
        # failures are caught per window inside).
        return self._done(self.dead.run("merge", self.state.on_item, value, self.clock(), tries=1))

    def on_notify(self):
        return self._done(self.state.on_idle(self.clock()))

    def on_eof(self):
        if not self.close_at_eof:  # the daemon stops with recovery on: open windows live on in the snapshot
            return [], StatefulLogic.RETAIN
        return self._done(self.state.close_all())

    def notify_at(self) -> datetime | None:
        deadline = self.state.idle_deadline() if (self.idle and self.state) else None
        if deadline is None:
            return None
        # the deadline is on the injected clock; bytewax wakes us on the system clock
        return datetime.now(timezone.utc) + timedelta(seconds=deadline - self.clock())

    def snapshot(self) -> bytes:
        # bytewax snapshots every touched key at every epoch end; a pickle is both the
        # immutable copy it asks for and much cheaper than copy.deepcopy of river objects.
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


class IncidentStep(StatefulLogic[object, object, bytes]):
    """bytewax wrapper of the ``IncidentTracker`` (one key for the whole flow)."""

    def __init__(self, spec: WindowSpec, clock: Clock, idle: bool, close_at_eof: bool, resume: bytes | None) -> None:
        self.clock, self.idle, self.close_at_eof = clock, idle, close_at_eof
        self.idle_s = spec.idle_timeout_s
        # replay (no idle closing) holds every window until the end: the same output whatever
        # the order summaries of several workers arrive in
        self.tracker = pickle.loads(resume) if resume is not None else IncidentTracker(spec.length_ns, hold=not idle)
        self.last = clock()

    def on_item(self, value):
        self.last = self.clock()
        if isinstance(value, ServiceExpired):
            return self.tracker.forget(value.service), StatefulLogic.RETAIN
        return self.tracker.on_summary(value), StatefulLogic.RETAIN

    def on_notify(self):
        return self.tracker.flush(), StatefulLogic.RETAIN

    def on_eof(self):
        return (self.tracker.flush() if self.close_at_eof else []), StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.idle or not self.tracker.buffer:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=self.last + self.idle_s - self.clock())

    def snapshot(self) -> bytes:
        return pickle.dumps(self.tracker, protocol=pickle.HIGHEST_PROTOCOL)


TICK_TTL_NS = 3600 * 10**9  # services absent from a partition this long get no more ticks
MAX_TICKED = 10_000  # services a partition ticks for at most
# A stretch of event time with no span or log of anyone's is a gap in the input when it is at least
# GAP_MIN_S long and GAP_FACTOR times the longest pause the partition's input made lately (a
# maximum halving every GAP_HALF_LIFE_S of event time; traffic driven by a few users pauses for
# tens of seconds as a matter of course), once it has learned its pauses for GAP_WARMUP_S.
GAP_MIN_S = 2
GAP_FACTOR = 2.0
GAP_HALF_LIFE_S = 3600
GAP_WARMUP_S = 600


def _with_rows(table: tuple[str, ...], idx: np.ndarray) -> list[str]:
    """The names of ``table`` that some row points at (one O(n) count, no sort)."""
    return [table[i] for i in np.flatnonzero(np.bincount(idx, minlength=len(table))).tolist()]


class _Ticks:
    """Which services a partition has read lately, to tell each one absent from a step that the
    step read others' data over its time span (``Tick``): its empty windows there are its own
    silence, not a gap in the input. Ticks go out with the first step of each window (the one
    whose newest event time enters it), to every service seen lately that is not in that step.

    Gaps in the input (``_gaps``) go to every service seen lately, present or not: a window
    partly in one holds less traffic because less was read, not because less was sent."""

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self.seen: dict[str, int] = {}  # service -> newest event time read from it
        self.window = -1  # the window of the last step that sent ticks
        self.frontier: int | None = None  # the newest second (unix s) in which a span or log ended
        self.first: int | None = None  # the first such second
        self.longest = 0.0  # the longest pause lately (seconds without spans or logs), not a gap

    def step(self, items: list) -> list[Tick]:
        present: dict[str, int] = {}
        times: list[np.ndarray] = []
        traffic: list[np.ndarray] = []  # of spans and logs (metric points come once an interval)
        for item in items:
            if isinstance(item, SpanBatch) and len(item):
                t = item.end_ns
                names = _with_rows(item.services, item.service_idx)  # not the whole table
            elif isinstance(item, MetricBatch) and len(item):
                t = item.time_ns
                names = _with_rows(item.services, item.service_idx)
            elif isinstance(item, LogBatch) and len(item):
                t = item.time_ns
                names = list(set(item.service))
            else:
                continue
            times.append(t)
            if not isinstance(item, MetricBatch):
                traffic.append(t)
            newest = int(t.max())
            for name in names:
                present[name] = max(present.get(name, newest), newest)
        if not times:
            return []
        hi = max(int(t.max()) for t in times)
        self.seen.update(present)
        step = next(i.step for i in items if isinstance(i, SpanBatch | LogBatch | MetricBatch))
        gaps = self._gaps(traffic)
        out = [Tick(name, (), step, gaps) for name in self.seen] if gaps else []
        window = hi // self.window_ns
        if window == self.window:  # once per window: a scan of every service seen lately
            return out
        self.window = window
        if len(self.seen) > MAX_TICKED or any(t < hi - TICK_TTL_NS for t in self.seen.values()):
            keep = sorted(self.seen.items(), key=lambda kv: -kv[1])[:MAX_TICKED]
            self.seen = {k: t for k, t in keep if t >= hi - TICK_TTL_NS}
        # the windows this step read data in (not the stretch between its first and last time: a
        # step across a hole in the input must not cover the hole)
        starts = tuple((np.unique(np.concatenate(times) // self.window_ns) * self.window_ns).tolist())
        return out + [Tick(name, starts, step) for name in self.seen if name not in present]

    def _gaps(self, traffic: list[np.ndarray]) -> tuple[tuple[int, int], ...]:
        """Stretches of whole seconds after the newest second read so far in which none of this
        step's spans or logs ended, long enough to be a gap in the input (``GAP_MIN_S``,
        ``GAP_FACTOR``): [start, end) in unix ns. Shorter ones are the input's pauses, learned.
        Data older than that second (late) is not looked at: it neither makes nor fills a gap."""
        if not traffic:
            return ()
        t = np.concatenate(traffic) // 10**9
        lo = int(t.min())
        secs = dense_unique(t - lo, int(t.max()) - lo + 1, inverse=False) + lo  # no sort: ~3 ns a span
        if self.frontier is not None:
            secs = np.concatenate(([self.frontier], secs[secs > self.frontier]))
            self.longest *= 0.5 ** ((int(secs[-1]) - self.frontier) / GAP_HALF_LIFE_S)
        self.first = int(secs[0]) if self.first is None else self.first
        self.frontier = int(secs[-1])
        empty = np.diff(secs) - 1
        warm = self.frontier - self.first >= GAP_WARMUP_S
        gap = empty >= max(GAP_MIN_S, GAP_FACTOR * self.longest) if warm else np.zeros(empty.size, dtype=bool)
        if (~gap).any():
            self.longest = max(self.longest, float(empty[~gap].max()))
        return tuple(((int(secs[i]) + 1) * 10**9, int(secs[i + 1]) * 10**9) for i in np.flatnonzero(gap).tolist())


class _JoinedPartition(StatefulSourcePartition):
    def __init__(
        self, inner: StatefulSourcePartition, joiner: servicegraph.LinkJoiner, dead: DeadLetters | None,
        analyzer: DbAnalyzer | None = None,
    ) -> None:  # fmt: skip
        self.inner = inner
        self.joiner = joiner
        self.analyzer = analyzer
        self.dead = dead
        self.logged_at = -1e9
        self.ticks = _Ticks(joiner.window_ns)

    def next_batch(self) -> list:
        items = self.inner.next_batch()
        items = list(items)
        out: list = list(self.ticks.step(items))
        before = (self.joiner.unjoined, self.joiner.unstored)
        for item in items:
            out.append(item)
            if isinstance(item, SpanBatch):
                if self.dead is None:
                    out.extend(self.joiner.process(item))
                    out.extend(self.analyzer.process(item) if self.analyzer is not None else ())
                    out.extend(count_exceptions(item))
                else:
                    # the join changes state: a failure is set aside at once, never retried
                    out.extend(self.dead.run("servicegraph", self.joiner.process, item, tries=1) or [])
                    if self.analyzer is not None:
                        out.extend(self.dead.run("db_analysis", self.analyzer.process, item, tries=1) or [])
                    out.extend(self.dead.run("exceptions", count_exceptions, item, tries=1) or [])
        unjoined, unstored = self.joiner.unjoined - before[0], self.joiner.unstored - before[1]
        if (unjoined or unstored) and self.dead is not None:
            # counted per batch, logged at most once a minute (this can go on for a while)
            for n, reason in ((unjoined, "servicegraph_unjoined"), (unstored, "servicegraph_unstored")):
                if n:
                    self.dead.metrics.inc("dropped", n, reason)
            if time.monotonic() - self.logged_at > 60:
                self.logged_at = time.monotonic()
                log.warning(
                    "service graph: more than %d sampled spans per %d s or %d awaited parents; spans not kept and "
                    'children not joined are counted as dropped{reason="servicegraph_unstored"} and '
                    '{reason="servicegraph_unjoined"}',
                    servicegraph.MAX_SPANS, servicegraph.GENERATION_NS // 10**9, servicegraph.MAX_WAITING,
                )  # fmt: skip
        return out

    def next_awake(self) -> datetime | None:
        return self.inner.next_awake()

    def snapshot(self):
        # copies: the joiner and the analyzer keep changing
        analyzer = pickle.dumps(self.analyzer) if self.analyzer is not None else None
        return (self.inner.snapshot(), pickle.dumps(self.joiner), analyzer)

    def close(self) -> None:
        self.inner.close()


class JoinedSource(FixedPartitionedSource):
    """Wraps a partitioned source of batches: each span batch is followed by its edges (and,
    given ``graph_bounds``, the service-graph requests: ``pipeline/graph_calls.py``) and, when
    ``db`` (the ``[db]`` configuration and the histogram bounds) is given, its database calls
    and findings (``pipeline/db_analysis.py``)."""

    def __init__(
        self, inner: FixedPartitionedSource, sample_one_in: int, ttl_ns: int, window_ns: int,
        dead: DeadLetters | None = None, db: tuple[DbConfig, tuple[float, ...]] | None = None,
        graph_bounds: tuple[float, ...] | None = None,
    ) -> None:  # fmt: skip
        self.inner = inner
        self.args = (sample_one_in, ttl_ns, window_ns, graph_bounds)
        self.dead = dead
        self.db = db

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state):
        # snapshots before the database analysis held (inner, joiner)
        inner_state, joiner, analyzer = (*resume_state, None)[:3] if resume_state is not None else (None, None, None)
        inner = self.inner.build_part(step_id, for_part, inner_state)
        if joiner:  # restored: state from the snapshot, configuration from today's file
            joiner = pickle.loads(joiner)
            joiner.bind(*self.args)
        db = None
        if self.db is not None:
            ttl_ns = self.args[1]
            db = pickle.loads(analyzer) if analyzer else DbAnalyzer(self.db[0], self.db[1], ttl_ns)
            db.bind(self.db[0], self.db[1], ttl_ns)
        return _JoinedPartition(inner, joiner or servicegraph.LinkJoiner(*self.args), self.dead, db)
