"""Event-time tumbling windows per (service, operation, span kind).

Three plain, picklable pieces (no bytewax here; ``pipeline/flow.py`` wraps them):

- ``preaggregate``: one ``SpanBatch`` -> one ``Partial`` per (key, window) found in
  it: status counts, explicit-bucket histogram, sums, sketch buckets. This is the
  only per-span work, done on numpy arrays.
- ``CardinalityLimiter`` (state per service): operations over the per-service
  limit are folded into one overflow operation, so series stay bounded.
- ``ServiceWindows`` (state per service): merges partials, log counts, instance
  sets and service-graph calls into open windows; all of a service's windows for
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
from dataclasses import dataclass

import numpy as np

from pipeline.config import WindowsConfig
from pipeline.model import (
    KIND_SERVER,
    Dependency,
    OVERFLOW_OPERATION,
    LateSpans,
    LogBatch,
    ServiceWindow,
    SpanBatch,
    WindowResult,
)
from pipeline.servicegraph import EdgePartial
from pipeline.sketch import LogMapping, LogSketch

QUANTILES = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class WindowSpec:
    """What preaggregation and windows need to know, derived from config once."""

    length_ns: int
    lateness_ns: int
    idle_timeout_s: float
    mapping: LogMapping
    bounds: np.ndarray  # explicit histogram bounds, seconds
    exemplars: int = 5  # trace ids kept per window: slowest spans, error spans

    @staticmethod
    def from_config(cfg: WindowsConfig, buckets: tuple[float, ...]) -> WindowSpec:
        return WindowSpec(
            length_ns=int(round(cfg.length_s * 1e9)),
            lateness_ns=int(round(cfg.allowed_lateness_s * 1e9)),
            idle_timeout_s=cfg.idle_timeout_s,
            mapping=LogMapping(cfg.relative_accuracy),
            bounds=np.asarray(buckets, dtype=np.float64),
        )


@dataclass
class Partial:
    """Aggregate of the spans of one batch that share a key and a window."""

    service: str
    operation: str
    span_kind: int
    window_start: int
    max_end_ns: int
    step: tuple[int, int]  # (source partition, step number) it was read in
    status_counts: np.ndarray  # int64[3]: unset, ok, error
    bucket_counts: np.ndarray  # int64[3, len(bounds) + 1]
    status_sums: np.ndarray  # float64[3], seconds
    sk_idx: np.ndarray  # sketch bucket indices (ascending)
    sk_cnt: np.ndarray
    zero: int
    vmin: float
    vmax: float
    slow: list[tuple[float, str]]  # (duration s, trace id hex) of the slowest spans, slowest first
    error_traces: list[str]  # trace ids of error spans (the slowest ones)

    @property
    def count(self) -> int:
        return int(self.status_counts.sum())



def preaggregate(batch: SpanBatch, spec: WindowSpec) -> list[Partial]:
    """Group a batch's spans by (service, operation, kind, window) and aggregate each group.

    All arithmetic is done once over the whole batch (one sort, a few bincounts);
    the loop at the end only slices the results, once per group.
    """
    n = len(batch)
    if n == 0:
        return []
    n_ops = len(batch.operations)
    key = (batch.service_idx.astype(np.int64) * n_ops + batch.op_idx) * 8 + batch.kind.astype(np.int64)
    window = batch.end_ns // spec.length_ns
    order = np.lexsort((-batch.duration_ns, window, key))  # slowest first within a group
    key_s, win_s = key[order], window[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(key_s[1:], key_s[:-1], out=new_group[1:])
    new_group[1:] |= win_s[1:] != win_s[:-1]
    starts = np.flatnonzero(new_group)
    groups = starts.size
    gid = np.cumsum(new_group) - 1  # group of each sorted span

    dur = batch.duration_ns[order] / 1e9  # seconds, rounded exactly like Python does
    status = batch.status[order].astype(np.int64)
    nb = spec.bounds.size + 1
    bucket = np.searchsorted(spec.bounds, dur, side="left")
    status_counts = np.bincount(gid * 3 + status, minlength=groups * 3).reshape(groups, 3)
    bucket_counts = np.bincount((gid * 3 + status) * nb + bucket, minlength=groups * 3 * nb).reshape(groups, 3, nb)
    status_sums = np.bincount(gid * 3 + status, weights=dur, minlength=groups * 3).reshape(groups, 3)
    vmin = np.minimum.reduceat(dur, starts)
    vmax = np.maximum.reduceat(dur, starts)
    max_end = np.maximum.reduceat(batch.end_ns[order], starts)

    # Sketch buckets of every group at once: unique (group, bucket index) pairs.
    positive = dur > 0
    zero = np.bincount(gid[~positive], minlength=groups) if not positive.all() else np.zeros(groups, np.int64)
    sk = spec.mapping.index(dur[positive])
    pair = gid[positive] * 1_000_000 + (sk + 500_000)  # bucket indices stay well inside +-500k
    upair, ucnt = np.unique(pair, return_counts=True)
    ugid = upair // 1_000_000
    uidx = upair % 1_000_000 - 500_000
    bounds = np.searchsorted(ugid, np.arange(groups + 1))

    out = []
    services, operations = batch.services, batch.operations
    keys, wins = key_s[starts].tolist(), win_s[starts].tolist()
    stops = np.append(starts[1:], n).tolist()
    starts_l = starts.tolist()
    trace_s = batch.trace_id[order]
    errors_g = status_counts[:, 2].tolist()
    top = spec.exemplars
    for g in range(groups):
        k = keys[g]
        svc_op = k // 8
        a, b = bounds[g], bounds[g + 1]
        s0, s1 = starts_l[g], stops[g]
        slow = [(float(dur[i]), trace_s[i].hex()) for i in range(s0, min(s0 + top, s1))]
        error_traces = []
        if errors_g[g]:
            error_traces = [trace_s[s0 + i].hex() for i in np.flatnonzero(status[s0:s1] == 2)[:top].tolist()]
        out.append(
            Partial(
                service=services[svc_op // n_ops],
                operation=operations[svc_op % n_ops],
                span_kind=k % 8,
                window_start=wins[g] * spec.length_ns,
                max_end_ns=int(max_end[g]),
                step=batch.step,
                status_counts=status_counts[g],
                bucket_counts=bucket_counts[g],
                status_sums=status_sums[g],
                sk_idx=uidx[a:b],
                sk_cnt=ucnt[a:b],
                zero=int(zero[g]),
                vmin=float(vmin[g]),
                vmax=float(vmax[g]),
                slow=slow,
                error_traces=error_traces,
            )
        )
    return out


@dataclass
class LogPartial:
    """Log records of one batch that share a service and a window."""

    service: str
    window_start: int
    max_time_ns: int
    step: tuple[int, int]
    records: int
    errors: int  # severity ERROR or worse (number >= 17)


@dataclass
class InstanceSet:
    """The ``service.instance.id`` values one batch shows for a service in a window."""

    service: str
    window_start: int
    max_end_ns: int
    step: tuple[int, int]
    instances: tuple[str, ...]


SEVERITY_ERROR = 17


def preaggregate_logs(batch: LogBatch, spec: WindowSpec, step: tuple[int, int]) -> list[LogPartial]:
    n = len(batch)
    if n == 0:
        return []
    services: dict[str, int] = {}
    code = np.fromiter((services.setdefault(s, len(services)) for s in batch.service), np.int64, n)
    window = batch.time_ns // spec.length_ns
    wmin = int(window.min())
    span = int(window.max()) - wmin + 1
    group = code * span + (window - wmin)
    ugroup, inverse = np.unique(group, return_inverse=True)
    records = np.bincount(inverse)
    errors = np.bincount(inverse, weights=batch.severity >= SEVERITY_ERROR).astype(np.int64)
    newest = np.full(ugroup.size, np.iinfo(np.int64).min)
    np.maximum.at(newest, inverse, batch.time_ns)
    names = list(services)
    return [
        LogPartial(
            service=names[int(g) // span],
            window_start=(int(g) % span + wmin) * spec.length_ns,
            max_time_ns=int(newest[i]),
            step=step,
            records=int(records[i]),
            errors=int(errors[i]),
        )
        for i, g in enumerate(ugroup.tolist())
    ]


def instance_sets(batch: SpanBatch, spec: WindowSpec) -> list[InstanceSet]:
    """Distinct instances per (service, window) in a span batch."""
    if len(batch) == 0:
        return []
    n_inst = len(batch.instances)
    window = batch.end_ns // spec.length_ns
    wmin = int(window.min())
    span = int(window.max()) - wmin + 1
    code = (batch.service_idx.astype(np.int64) * n_inst + batch.instance_idx) * span + (window - wmin)
    ucode, inverse = np.unique(code, return_inverse=True)
    newest = np.full(ucode.size, np.iinfo(np.int64).min)
    np.maximum.at(newest, inverse, batch.end_ns)
    grouped: dict[tuple[int, int], tuple[list[str], int]] = {}
    for i, c in enumerate(ucode.tolist()):
        svc_inst, w = divmod(c, span)
        svc, inst = divmod(svc_inst, n_inst)
        names, high = grouped.get((svc, w), ([], 0))
        names.append(batch.instances[inst])
        grouped[(svc, w)] = (names, max(high, int(newest[i])))
    return [
        InstanceSet(batch.services[svc], (w + wmin) * spec.length_ns, high, batch.step, tuple(sorted(names)))
        for (svc, w), (names, high) in grouped.items()
        if any(names)
    ]


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

    def admit(self, p: Partial) -> Partial:
        self.watermark = max(self.watermark, p.max_end_ns)
        op = p.operation
        if op in self.last_seen:
            self.last_seen[op] = max(self.last_seen[op], p.max_end_ns)
            return p
        if len(self.last_seen) >= self.limit:
            self._expire()
        if len(self.last_seen) < self.limit:
            self.last_seen[op] = p.max_end_ns
            return p
        p.operation = OVERFLOW_OPERATION
        return p

    def _expire(self) -> None:
        horizon = self.watermark - self.expire_ns
        for op in [o for o, t in self.last_seen.items() if t < horizon]:
            del self.last_seen[op]


class _Window:
    __slots__ = ("status_counts", "bucket_counts", "status_sums", "sketch", "slow", "error_traces")

    def __init__(self, p: Partial, mapping: LogMapping) -> None:
        self.status_counts = p.status_counts.copy()
        self.bucket_counts = p.bucket_counts.copy()
        self.status_sums = p.status_sums.copy()
        self.sketch = LogSketch(mapping)
        self.sketch.add_buckets(p.sk_idx, p.sk_cnt, p.zero, p.vmin, p.vmax)
        self.slow = list(p.slow)
        self.error_traces = list(p.error_traces)

    def merge(self, p: Partial, keep: int) -> None:
        self.status_counts += p.status_counts
        self.bucket_counts += p.bucket_counts
        self.status_sums += p.status_sums
        self.sketch.add_buckets(p.sk_idx, p.sk_cnt, p.zero, p.vmin, p.vmax)
        if p.slow and (len(self.slow) < keep or p.slow[0][0] > self.slow[-1][0]):
            self.slow = sorted(self.slow + p.slow, key=lambda x: -x[0])[:keep]
        if len(self.error_traces) < keep:
            self.error_traces.extend(p.error_traces[: keep - len(self.error_traces)])


class _ServiceSlot:
    """Everything one service has in one open window."""

    __slots__ = ("ops", "logs", "error_logs", "instances", "calls_to")

    def __init__(self) -> None:
        self.ops: dict[tuple[str, int], _Window] = {}
        self.logs = 0
        self.error_logs = 0
        self.instances: set[str] = set()
        self.calls_to: dict[str, list] = {}  # callee -> [sampled calls, errors, duration sum]


class ServiceWindows:
    """Open windows of one service (all its operations), its watermark and idle timer.

    Keyed by service so that every operation's window ``W`` closes at the same
    moment: what comes after (anomaly detection, scaling) sees the whole service
    for ``W`` at once, in an order that depends on the input alone. Picklable.
    """

    def __init__(
        self, service: str, spec: WindowSpec, max_operations: int, expire_ns: int,
        partition_idle_s: float | None = None,
    ) -> None:  # fmt: skip
        self.service = service
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
        self.late_logs = 0

    def on_item(self, item: Partial | LogPartial | InstanceSet | EdgePartial, now: float) -> list:
        """Merge one item; returns what closed: ``LateSpans`` and ``ServiceWindow`` objects."""
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
            st[2] = max(st[2], item.max_end_ns)
            p = self.limiter.admit(item)
            if late:
                out.append(LateSpans(self.service, p.operation, p.span_kind, p.count))
            else:
                slot = self._slot(p.window_start)
                w = slot.ops.get((p.operation, p.span_kind))
                if w is None:
                    slot.ops[(p.operation, p.span_kind)] = _Window(p, self.spec.mapping)
                else:
                    w.merge(p, self.spec.exemplars)
        elif isinstance(item, LogPartial):
            st[2] = max(st[2], item.max_time_ns)
            if late:
                self.late_logs += item.records
            else:
                slot = self._slot(item.window_start)
                slot.logs += item.records
                slot.error_logs += item.errors
        elif isinstance(item, EdgePartial):
            st[2] = max(st[2], item.max_end_ns)
            if not late:
                c = self._slot(item.window_start).calls_to.setdefault(item.callee, [0, 0, 0.0])
                c[0] += item.calls
                c[1] += item.errors
                c[2] += item.duration_sum
        else:
            st[2] = max(st[2], item.max_end_ns)
            if not late:
                self._slot(item.window_start).instances.update(item.instances)
        horizon = self.watermark - self.spec.lateness_ns
        ready = sorted(s for s in self.open if s + self.spec.length_ns <= horizon)
        out.extend(self._close(ready))
        return out

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

    def _slot(self, start: int) -> _ServiceSlot:
        slot = self.open.get(start)
        if slot is None:
            slot = self.open[start] = _ServiceSlot()
        return slot

    def idle_deadline(self) -> float | None:
        """Clock time at which open windows close for lack of traffic (None if none open)."""
        if not self.open:
            return None
        return self.last_activity + self.spec.idle_timeout_s

    def on_idle(self, now: float) -> list[ServiceWindow]:
        deadline = self.idle_deadline()
        if deadline is None or now < deadline:
            return []
        return self.close_all()

    def close_all(self) -> list[ServiceWindow]:
        return self._close(sorted(self.open))

    def _close(self, starts: list[int]) -> list[ServiceWindow]:
        closed = []
        length = self.spec.length_ns
        for start in starts:
            slot = self.open.pop(start)
            self.closed_until = max(self.closed_until, start + length)
            results = []
            server = LogSketch(self.spec.mapping)
            server_errors = 0
            for (op, kind), w in sorted(slot.ops.items()):
                results.append(_result(self.service, op, kind, start, length, w))
                if kind == KIND_SERVER:
                    server.merge(w.sketch)
                    server_errors += int(w.status_counts[2])
            closed.append(
                ServiceWindow(
                    service=self.service,
                    window_start=start,
                    window_end=start + length,
                    results=tuple(results),
                    instances=tuple(sorted(i for i in slot.instances if i)),
                    logs=slot.logs,
                    error_logs=slot.error_logs,
                    server_calls=server.count,
                    server_errors=server_errors,
                    server_p95=server.quantile(0.95) if server.count else math.nan,
                    dependencies=tuple(
                        Dependency(callee, c[0], c[1], c[2] / c[0]) for callee, c in sorted(slot.calls_to.items())
                    ),
                )
            )
        return closed


def _result(service: str, op: str, kind: int, start: int, length: int, w: _Window) -> WindowResult:
    sk = w.sketch
    q = sk.quantiles(QUANTILES)
    return WindowResult(
        service=service,
        operation=op,
        span_kind=kind,
        window_start=start,
        window_end=start + length,
        count=sk.count,
        errors=int(w.status_counts[2]),
        p50=q[0],
        p90=q[1],
        p95=q[2],
        p99=q[3],
        max=sk.max,
        sum=float(w.status_sums.sum()),
        status_counts=tuple(w.status_counts.tolist()),
        bucket_counts=tuple(map(tuple, w.bucket_counts.tolist())),
        status_sums=tuple(w.status_sums.tolist()),
        slow_traces=tuple(t for _, t in w.slow),
        error_traces=tuple(w.error_traces),
    )
