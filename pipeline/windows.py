"""Event-time tumbling windows per (service, operation, span kind).

Three plain, picklable pieces (no bytewax here; ``pipeline/flow.py`` wraps them):

- ``preaggregate``: one ``SpanBatch`` -> one ``Partial`` per (service, window)
  found in it, with a row per (operation, kind): status counts, explicit-bucket
  histogram, sums, sketch buckets, exemplars; and the service's instances. This is
  the only per-span work, done on numpy arrays.
- ``CardinalityLimiter`` (state per service): operations over the per-service
  limit are folded into one overflow operation, so series stay bounded.
- ``ServiceWindows`` (state per service): merges partials (into ``_Ops``: all
  operations of a window as rows of arrays), log counts and service-graph calls
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
from dataclasses import dataclass

import numpy as np

from pipeline.config import WindowsConfig
from pipeline.model import (
    KIND_SERVER,
    OVERFLOW_OPERATION,
    Dependency,
    EdgePartial,
    LateEdges,
    LateLogs,
    LateSpans,
    LogBatch,
    LogPartial,
    Partial,
    ServiceWindow,
    SpanBatch,
    WindowResult,
    progress_ns,
)
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

    def shape(self) -> tuple:
        """What open windows are made of: state built with another shape cannot take new data."""
        return (self.length_ns, self.mapping.relative_accuracy, tuple(self.bounds.tolist()), self.exemplars)

    @staticmethod
    def from_config(cfg: WindowsConfig, buckets: tuple[float, ...]) -> WindowSpec:
        return WindowSpec(
            length_ns=int(round(cfg.length_s * 1e9)),
            lateness_ns=int(round(cfg.allowed_lateness_s * 1e9)),
            idle_timeout_s=cfg.idle_timeout_s,
            mapping=LogMapping(cfg.relative_accuracy),
            bounds=np.asarray(buckets, dtype=np.float64),
        )


def _rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (``keys`` sorted)."""
    return np.arange(keys.size) - np.searchsorted(keys, keys, side="left")


def preaggregate(batch: SpanBatch, spec: WindowSpec) -> list[Partial]:
    """Group a batch's spans by (service, window), and within that by (operation, kind).

    All arithmetic is done once over the whole batch (one sort, a few bincounts);
    the loop at the end only slices the results, once per (service, window).
    """
    n = len(batch)
    if n == 0:
        return []
    window = batch.end_ns // spec.length_ns
    # kinds outside OTLP's 0..5 (spooled by an older telepipe) count as UNSPECIFIED, as decode does now
    kind = np.where((batch.kind < 0) | (batch.kind > 5), 0, batch.kind)
    opkind = batch.op_idx.astype(np.int64) * 8 + kind
    # slowest first within a row; rows of one (service, window) next to each other
    order = np.lexsort((-batch.duration_ns, opkind, window, batch.service_idx))
    svc_s, win_s, ok_s = batch.service_idx[order], window[order], opkind[order]
    new_part = np.empty(n, dtype=bool)
    new_part[0] = True
    np.not_equal(svc_s[1:], svc_s[:-1], out=new_part[1:])
    new_part[1:] |= win_s[1:] != win_s[:-1]
    new_row = new_part.copy()
    new_row[1:] |= ok_s[1:] != ok_s[:-1]
    row_starts = np.flatnonzero(new_row)
    rows = row_starts.size
    gid = np.cumsum(new_row) - 1  # row of each sorted span

    dur = batch.duration_ns[order] / 1e9  # seconds, rounded exactly like Python does
    status = batch.status[order].astype(np.int64)
    nb = spec.bounds.size + 1
    bucket = np.searchsorted(spec.bounds, dur, side="left")
    cell = gid * 3 + status
    status_counts = np.bincount(cell, minlength=rows * 3).reshape(rows, 3)
    bucket_counts = np.bincount(cell * nb + bucket, minlength=rows * 3 * nb).reshape(rows, 3, nb)
    status_sums = np.bincount(cell, weights=dur, minlength=rows * 3).reshape(rows, 3)
    vmin = np.minimum.reduceat(dur, row_starts)
    vmax = np.maximum.reduceat(dur, row_starts)
    row_end = np.maximum.reduceat(batch.end_ns[order], row_starts)

    # Sketch buckets of every row at once: unique (row, bucket index) pairs.
    positive = dur > 0
    zero = np.bincount(gid[~positive], minlength=rows) if not positive.all() else np.zeros(rows, np.int64)
    sk = spec.mapping.index(dur[positive])
    pair = gid[positive] * 1_000_000 + (sk + 500_000)  # bucket indices stay well inside +-500k
    upair, ucnt = np.unique(pair, return_counts=True)
    urow = upair // 1_000_000
    uidx = upair % 1_000_000 - 500_000

    # Exemplars: the slowest spans of each row (sorted slowest first) and its error spans.
    trace_s = batch.trace_id[order]
    slow_at = np.flatnonzero(np.arange(n) - row_starts[gid] < spec.exemplars)
    err_at = np.flatnonzero(status == 2)
    err_at = err_at[_rank_in_runs(gid[err_at]) < spec.exemplars]

    part_rows = np.append(np.flatnonzero(new_part[row_starts]), rows)  # first row of each part
    parts = part_rows.size - 1
    # Distinct instances of each part: unique (part, instance) pairs, sorted by part.
    n_inst = len(batch.instances)
    pair = np.unique((np.cumsum(new_part) - 1) * n_inst + batch.instance_idx[order])
    inst_cut = np.searchsorted(pair // n_inst, np.arange(parts + 1)).tolist()
    inst_names = [batch.instances[i] for i in (pair % n_inst).tolist()]
    sk_cut = np.searchsorted(urow, part_rows)
    slow_cut = np.searchsorted(gid[slow_at], part_rows)
    err_cut = np.searchsorted(gid[err_at], part_rows)
    services, operations = batch.services, batch.operations
    row_ok = ok_s[row_starts].tolist()
    row_end_l = row_end.tolist()
    firsts = row_starts[part_rows[:-1]]
    part_svc, part_win = svc_s[firsts].tolist(), win_s[firsts].tolist()
    out = []
    for i in range(parts):
        a, b = int(part_rows[i]), int(part_rows[i + 1])
        k0, k1, s0, s1, e0, e1 = sk_cut[i], sk_cut[i + 1], slow_cut[i], slow_cut[i + 1], err_cut[i], err_cut[i + 1]
        out.append(
            Partial(
                service=services[part_svc[i]],
                window_start=part_win[i] * spec.length_ns,
                max_end_ns=progress_ns(max(row_end_l[a:b]), batch.received_ns),
                step=batch.step,
                operations=[operations[k >> 3] for k in row_ok[a:b]],
                kinds=[k & 7 for k in row_ok[a:b]],
                row_end_ns=row_end_l[a:b],
                status_counts=status_counts[a:b],
                bucket_counts=bucket_counts[a:b],
                status_sums=status_sums[a:b],
                zero=zero[a:b],
                vmin=vmin[a:b],
                vmax=vmax[a:b],
                sk_row=urow[k0:k1] - a,
                sk_idx=uidx[k0:k1].copy(),  # copies: the window keeps these, not the whole batch's
                sk_cnt=ucnt[k0:k1].copy(),
                slow_row=gid[slow_at[s0:s1]] - a,
                slow_dur=dur[slow_at[s0:s1]],
                slow_trace=trace_s[slow_at[s0:s1]],
                err_row=gid[err_at[e0:e1]] - a,
                err_trace=trace_s[err_at[e0:e1]],
                instances=tuple(sorted(filter(None, inst_names[inst_cut[i] : inst_cut[i + 1]]))),
            )
        )
    return out


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
            max_time_ns=progress_ns(int(newest[i]), batch.received_ns),
            step=step,
            records=int(records[i]),
            errors=int(errors[i]),
        )
        for i, g in enumerate(ugroup.tolist())
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

    def admit(self, operations: list[str], ends_ns: list[int], now_ns: int | None = None) -> list[str]:
        """The operations of a partial's rows as they are counted: each one, or the overflow
        operation when it does not fit. ``ends_ns``: each row's newest span end; ``now_ns``:
        how far the partial moves event time (``Partial.max_end_ns``). Within a batch,
        operations are admitted window by window, in the order of the operation table
        (deterministic: the input decides)."""
        self.watermark = max(self.watermark, max(ends_ns, default=0) if now_ns is None else now_ns)
        last_seen = self.last_seen
        out = []
        for op, end in zip(operations, ends_ns):
            seen = last_seen.get(op)
            if seen is None:
                if len(last_seen) >= self.limit:
                    self._expire()
                if len(last_seen) < self.limit:
                    last_seen[op] = end
                else:
                    op = OVERFLOW_OPERATION
            elif end > seen:
                last_seen[op] = end
            out.append(op)
        return out

    def _expire(self) -> None:
        horizon = self.watermark - self.expire_ns
        for op in [o for o, t in self.last_seen.items() if t < horizon]:
            del self.last_seen[op]


class _Ops:
    """Every (operation, kind) of one service in one open window, as rows of arrays.

    A partial merges with a few numpy calls however many operations it carries.
    Sketch buckets and exemplar candidates are appended as they come and folded
    (summed per (row, bucket); the top exemplars kept per row) when they pile up
    and at close, so memory stays bounded by distinct buckets, not by spans.
    """

    __slots__ = ("nb", "keep", "rows", "status_counts", "bucket_counts", "status_sums", "zero", "vmin", "vmax",
                 "sketch", "sketch_len", "folded_len", "slow", "errors")  # fmt: skip

    def __init__(self, nb: int, keep: int) -> None:
        self.nb, self.keep = nb, keep
        self.rows: dict[tuple[str, int], int] = {}  # (operation, kind) -> row
        self.status_counts = np.zeros((0, 3), np.int64)
        self.bucket_counts = np.zeros((0, 3, nb), np.int64)
        self.status_sums = np.zeros((0, 3), np.float64)
        self.zero = np.zeros(0, np.int64)
        self.vmin = np.zeros(0, np.float64)
        self.vmax = np.zeros(0, np.float64)
        self.sketch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (row, bucket index, count)
        self.sketch_len = 0  # entries pending in self.sketch
        self.folded_len = 0  # entries after the last fold
        self.slow: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (row, duration, trace id)
        self.errors: list[tuple[np.ndarray, np.ndarray]] = []  # (row, trace id)

    def merge(self, p: Partial, operations: list[str]) -> None:
        """Add ``p`` with its rows named ``operations`` (after the cardinality limit)."""
        rows = self.rows
        at = np.fromiter((rows.setdefault(k, len(rows)) for k in zip(operations, p.kinds)), np.int64, len(p.kinds))
        if len(rows) > self.zero.size:
            self._grow(len(rows))
        np.add.at(self.status_counts, at, p.status_counts)
        np.add.at(self.bucket_counts, at, p.bucket_counts)
        np.add.at(self.status_sums, at, p.status_sums)
        np.add.at(self.zero, at, p.zero)
        np.minimum.at(self.vmin, at, p.vmin)
        np.maximum.at(self.vmax, at, p.vmax)
        if p.sk_row.size:
            self.sketch.append((at[p.sk_row], p.sk_idx, p.sk_cnt))
            self.sketch_len += p.sk_row.size
            # fold when the pending entries double what the last fold left (or pile up in
            # many small pieces): amortized linear in what is merged
            if self.sketch_len > max(65_536, 2 * self.folded_len) or len(self.sketch) > 256:
                self.sketch = [self.folded_sketch()]
                self.sketch_len = self.folded_len = self.sketch[0][0].size
        if p.slow_row.size:
            self.slow.append((at[p.slow_row], p.slow_dur, p.slow_trace))
            if len(self.slow) > 64:
                self.slow = [self.top_slow()]
        if p.err_row.size:
            self.errors.append((at[p.err_row], p.err_trace))
            if len(self.errors) > 64:
                self.errors = [self.first_errors()]

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.zero.size, 8)
        extra = cap - self.zero.size
        self.status_counts = np.concatenate([self.status_counts, np.zeros((extra, 3), np.int64)])
        self.bucket_counts = np.concatenate([self.bucket_counts, np.zeros((extra, 3, self.nb), np.int64)])
        self.status_sums = np.concatenate([self.status_sums, np.zeros((extra, 3), np.float64)])
        self.zero = np.concatenate([self.zero, np.zeros(extra, np.int64)])
        self.vmin = np.concatenate([self.vmin, np.full(extra, np.inf)])
        self.vmax = np.concatenate([self.vmax, np.full(extra, -np.inf)])

    def folded_sketch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All sketch buckets summed per (row, bucket index), sorted by row then index."""
        if not self.sketch:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        row = np.concatenate([r for r, _, _ in self.sketch])
        idx = np.concatenate([i for _, i, _ in self.sketch])
        cnt = np.concatenate([c for _, _, c in self.sketch])
        pair, inverse = np.unique(row * 1_000_000 + (idx + 500_000), return_inverse=True)
        return pair // 1_000_000, pair % 1_000_000 - 500_000, np.bincount(inverse, weights=cnt).astype(np.int64)

    def top_slow(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``keep`` slowest candidates of each row, sorted by row, slowest first (earlier
        first among equal durations)."""
        if not self.slow:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, "S16")
        row = np.concatenate([r for r, _, _ in self.slow])
        dur = np.concatenate([d for _, d, _ in self.slow])
        trace = np.concatenate([t for _, _, t in self.slow])
        order = np.lexsort((-dur, row))
        order = order[_rank_in_runs(row[order]) < self.keep]
        return row[order], dur[order], trace[order]

    def first_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """The first ``keep`` error traces of each row, in arrival order, sorted by row."""
        if not self.errors:
            return np.zeros(0, np.int64), np.zeros(0, "S16")
        row = np.concatenate([r for r, _ in self.errors])
        trace = np.concatenate([t for _, t in self.errors])
        order = np.argsort(row, kind="stable")
        order = order[_rank_in_runs(row[order]) < self.keep]
        return row[order], trace[order]

    def __getstate__(self):  # snapshots carry the folded form
        self.sketch = [self.folded_sketch()] if self.sketch else []
        self.sketch_len = self.folded_len = self.sketch[0][0].size if self.sketch else 0
        self.slow = [self.top_slow()] if self.slow else []
        self.errors = [self.first_errors()] if self.errors else []
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class _Window:
    """One operation's open window as telepipe kept it before ``_Ops``: only read back from
    recovery snapshots taken by an older version (see ``_ServiceSlot.__setstate__``)."""

    __slots__ = ("status_counts", "bucket_counts", "status_sums", "sketch", "slow", "error_traces")


def _ops_from_windows(windows: dict[tuple[str, int], _Window], nb: int, keep: int) -> _Ops:
    """An older snapshot's per-operation windows as one ``_Ops`` (the same aggregates)."""
    ops = _Ops(nb, keep)
    if windows:
        ops._grow(len(windows))
    for key, w in windows.items():
        r = ops.rows[key] = len(ops.rows)
        ops.status_counts[r], ops.bucket_counts[r], ops.status_sums[r] = w.status_counts, w.bucket_counts, w.status_sums
        sk = w.sketch
        ops.zero[r], ops.vmin[r], ops.vmax[r] = sk.zero_count, sk.min, sk.max
        nz = np.flatnonzero(sk.counts)
        ops.sketch.append((np.full(nz.size, r), nz + sk.offset, sk.counts[nz]))
        # hex ids back to bytes (ids the older version cut short of their trailing zero bytes get them back)
        ops.slow.append((np.full(len(w.slow), r), np.array([d for d, _ in w.slow]),
                         np.array([bytes.fromhex(t) for _, t in w.slow], "S16")))
        ops.errors.append((np.full(len(w.error_traces), r),
                           np.array([bytes.fromhex(t) for t in w.error_traces], "S16")))
    ops.sketch_len = sum(r.size for r, _, _ in ops.sketch)
    return ops


class _ServiceSlot:
    """Everything one service has in one open window."""

    __slots__ = ("ops", "logs", "error_logs", "instances", "calls_to")

    def __init__(self, nb: int, keep: int) -> None:
        self.ops = _Ops(nb, keep)

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
        partition_idle_s: float | None = None, silent_limit: int = 0,
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
        self.newest_ns = -math.inf  # newest event time any item moved (``progress_ns``)
        self.silent_limit = silent_limit  # empty windows in a row at most (0: none)
        self.silent_run = 0  # empty windows closed since the last one with data

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

    def on_item(self, item: Partial | LogPartial | EdgePartial, now: float) -> list:
        """Merge one item; returns what closed: late counts and ``ServiceWindow`` objects."""
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
            if late:
                counts = item.status_counts.sum(axis=1).tolist()
                out.extend(LateSpans(self.service, op, k, n) for op, k, n in zip(operations, item.kinds, counts))
            else:
                slot = self._slot(item.window_start)
                slot.ops.merge(item, operations)
                slot.instances.update(item.instances)
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
        if not self.silent_limit or self.silent_run >= self.silent_limit or not math.isfinite(self.closed_until):
            return None
        # Event time is taken to run on with the clock from the newest time seen; the next empty
        # window closes when that passes its end plus the lateness and the idle timeout (data
        # that was merely slow then still finds its window open).
        due_ns = self._next_boundary() + self.spec.length_ns + self.spec.lateness_ns - self.newest_ns
        return self.last_activity + idle + max(0.0, due_ns / 1e9)

    def on_idle(self, now: float) -> list[ServiceWindow]:
        closed: list[ServiceWindow] = []
        while (deadline := self.idle_deadline()) is not None and now >= deadline:
            if self.open:
                closed.extend(self.close_all())
            else:
                start = self._next_boundary()
                closed.extend(self._empty_until(start + self.spec.length_ns))
        return closed

    def close_all(self) -> list[ServiceWindow]:
        return self._close(sorted(self.open))

    def _next_boundary(self) -> int:
        """Start of the first window not closed yet."""
        length = self.spec.length_ns
        return -(-int(self.closed_until) // length) * length

    def _empty_until(self, start: int) -> list[ServiceWindow]:
        """Empty windows from the first one not closed up to ``start`` (at most up to the silent
        limit; a longer gap is skipped: the service was forgotten by then)."""
        if not self.silent_limit or not math.isfinite(self.closed_until):
            return []
        length = self.spec.length_ns
        out = []
        at = self._next_boundary()
        while at < start and self.silent_run < self.silent_limit:
            self.silent_run += 1
            out.append(ServiceWindow(
                service=self.service, window_start=at, window_end=at + length, results=(), instances=(), logs=0,
                error_logs=0, server_calls=0, server_errors=0, server_p95=math.nan, silent_run=self.silent_run,
            ))  # fmt: skip
            at += length
        self.closed_until = max(self.closed_until, start)
        return out

    def _close(self, starts: list[int]) -> list[ServiceWindow]:
        closed = []
        length = self.spec.length_ns
        for start in starts:
            closed.extend(self._empty_until(start))
            slot = self.open.pop(start)
            self.closed_until = max(self.closed_until, start + length)
            results, server = _results(self.service, start, length, slot.ops, self.spec.mapping)
            quiet = not results and not slot.logs and not slot.calls_to
            self.silent_run = self.silent_run + 1 if quiet else 0
            closed.append(
                ServiceWindow(
                    service=self.service,
                    window_start=start,
                    window_end=start + length,
                    results=results,
                    instances=tuple(sorted(i for i in slot.instances if i)),
                    logs=slot.logs,
                    error_logs=slot.error_logs,
                    server_calls=server.count,
                    server_errors=int(sum(r.errors for r in results if r.span_kind == KIND_SERVER)),
                    server_p95=server.quantile(0.95) if server.count else math.nan,
                    dependencies=tuple(
                        Dependency(callee, c[0], c[1], c[2] / c[0]) for callee, c in sorted(slot.calls_to.items())
                    ),
                    silent_run=self.silent_run,
                )
            )
        return closed


def _hex_ids(ids: np.ndarray) -> list[str]:
    """Fixed-width id array -> hex strings (not via numpy's bytes scalars, which drop trailing zero bytes)."""
    width = 2 * ids.dtype.itemsize
    text = ids.tobytes().hex()
    return [text[i : i + width] for i in range(0, len(text), width)]


def _split_rows(row: np.ndarray, values: list, n: int) -> list[list]:
    """``values`` (sorted by ``row``) as one list per row 0..n-1."""
    cuts = np.searchsorted(row, np.arange(n + 1)).tolist()
    return [values[cuts[r] : cuts[r + 1]] for r in range(n)]


def _results(service: str, start: int, length: int, ops: _Ops, mapping: LogMapping) -> tuple[tuple, LogSketch]:
    """Window results of every row (sorted by operation, kind) and the service's SERVER sketch.

    Quantiles are computed for all rows at once, with the same rules as
    ``LogSketch.quantiles`` (extremes exact, zero bucket, estimates clamped to
    [min, max])."""
    n = len(ops.rows)
    status_counts = ops.status_counts[:n]
    count = status_counts.sum(axis=1)
    zero, vmin, vmax = ops.zero[:n], ops.vmin[:n], ops.vmax[:n]
    row, idx, cnt = ops.folded_sketch()
    cum = np.cumsum(cnt)
    first = np.searchsorted(row, np.arange(n))
    base = np.where(first > 0, cum[np.maximum(first - 1, 0)] if cum.size else 0, 0)
    rank = np.floor(np.array(QUANTILES)[None, :] * (count[:, None] - 1)).astype(np.int64)  # [rows, quantiles]
    if cum.size:
        j = np.minimum(np.searchsorted(cum, (base - zero)[:, None] + rank, side="right"), cum.size - 1)
        # bucket values from LogMapping.value itself (numpy's power can differ in the last bit)
        buckets, inverse = np.unique(idx[j].ravel(), return_inverse=True)
        value = np.array([mapping.value(i) for i in buckets.tolist()])[inverse.ravel()].reshape(rank.shape)
        est = np.minimum(np.maximum(value, vmin[:, None]), vmax[:, None])
    else:
        est = np.zeros(rank.shape)
    est = np.where(rank < zero[:, None], 0.0, est)
    est = np.where(rank == 0, vmin[:, None], est)
    qs = np.where(rank == (count - 1)[:, None], vmax[:, None], est)

    slow_row, _, slow_trace = ops.top_slow()
    slow = _split_rows(slow_row, _hex_ids(slow_trace), n)
    err_row, err_trace = ops.first_errors()
    errors = _split_rows(err_row, _hex_ids(err_trace), n)

    qs_l, count_l, max_l = qs.tolist(), count.tolist(), vmax.tolist()
    sums = ops.status_sums[:n]
    totals, status_l, sums_l = sums.sum(axis=1).tolist(), status_counts.tolist(), sums.tolist()
    buckets_l = ops.bucket_counts[:n].tolist()
    results = []
    server_rows = []
    for (op, kind), r in sorted(ops.rows.items()):
        q = qs_l[r]
        results.append(
            WindowResult(
                service=service, operation=op, span_kind=kind, window_start=start, window_end=start + length,
                count=count_l[r], errors=status_l[r][2], p50=q[0], p90=q[1], p95=q[2], p99=q[3], max=max_l[r],
                sum=totals[r], status_counts=tuple(status_l[r]), bucket_counts=tuple(map(tuple, buckets_l[r])),
                status_sums=tuple(sums_l[r]), slow_traces=tuple(slow[r]), error_traces=tuple(errors[r]),
            )
        )  # fmt: skip
        if kind == KIND_SERVER:
            server_rows.append(r)
    server = LogSketch(mapping)
    if server_rows:
        rows = np.array(server_rows)
        is_server = np.zeros(n, dtype=bool)
        is_server[rows] = True
        mine = is_server[row]
        uidx, inverse = np.unique(idx[mine], return_inverse=True)
        server.add_buckets(uidx, np.bincount(inverse, weights=cnt[mine]).astype(np.int64),
                           int(zero[rows].sum()), float(vmin[rows].min()), float(vmax[rows].max()))  # fmt: skip
    return tuple(results), server
