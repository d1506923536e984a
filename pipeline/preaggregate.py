"""Pre-aggregation: the only per-span work, on numpy arrays, once per batch.

- ``WindowSpec``: what pre-aggregation and windows need to know, derived from the
  configuration once (window length, lateness, sketch mapping, histogram bounds).
- ``preaggregate``: one ``SpanBatch`` -> one ``Partial`` per (service, window) found
  in it, with a row per (operation, kind): status counts, explicit-bucket histogram,
  sums, sketch buckets, exemplars; and the service's instances.
- ``preaggregate_logs``: one ``LogBatch`` -> one ``LogPartial`` per (service,
  window): records and ERROR-or-worse records.
- ``preaggregate_metrics``: one ``MetricBatch`` -> one ``MetricPartial`` per (service,
  window), its points as rows (metrics are a point per series and export interval:
  few, so they stay points until the window closes).

Plain functions over arrays: no bytewax, no state. Event times that move windows
forward are taken as ``progress_ns`` (never past a batch's acceptance time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import WindowsConfig
from pipeline.dimensions import with_dimensions
from pipeline.metric_model import MetricBatch, MetricPartial
from pipeline.model import LogBatch, LogPartial, Partial, SpanBatch, progress_ns
from pipeline.sketch import LogMapping


@dataclass(frozen=True)
class WindowSpec:
    """What preaggregation and windows need to know, derived from config once."""

    length_ns: int
    lateness_ns: int
    idle_timeout_s: float
    mapping: LogMapping
    bounds: np.ndarray  # explicit histogram bounds, seconds
    exemplars: int = 5  # trace ids kept per window: slowest spans, error spans
    dimensions: tuple[str, ...] = ()  # attribute keys that split operations (pipeline/dimensions.py)
    dimension_default: str = ""

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
            dimensions=cfg.dimensions,
            dimension_default=cfg.dimension_default,
        )


_COMPOSED: dict = {}  # with_dimensions's operations, kept across batches (this process's)


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
    batch = with_dimensions(batch, spec.dimensions, spec.dimension_default, _COMPOSED)
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
    # sampled spans count as many spans as they stand for (tracestate ot=th: pipeline/sampling.py)
    w = None if batch.weight is None else batch.weight[order].astype(np.float64)
    status_counts = _count(cell, w, rows * 3).reshape(rows, 3)
    bucket_counts = _count(cell * nb + bucket, w, rows * 3 * nb).reshape(rows, 3, nb)
    status_sums = np.bincount(cell, weights=dur if w is None else dur * w, minlength=rows * 3).reshape(rows, 3)
    vmin = np.minimum.reduceat(dur, row_starts)
    vmax = np.maximum.reduceat(dur, row_starts)
    row_end = np.maximum.reduceat(batch.end_ns[order], row_starts)

    zero, urow, uidx, ucnt = _sketch_buckets(dur, gid, rows, spec.mapping, w)
    # Exemplars: the slowest spans of each row (sorted slowest first) and its error spans.
    trace_s = batch.trace_id[order]
    slow_at = np.flatnonzero(np.arange(n) - row_starts[gid] < spec.exemplars)
    err_at = np.flatnonzero(status == 2)
    err_at = err_at[_rank_in_runs(gid[err_at]) < spec.exemplars]

    part_rows = np.append(np.flatnonzero(new_part[row_starts]), rows)  # first row of each part
    parts = part_rows.size - 1
    inst_cut, inst_names = _part_instances(batch, order, new_part, parts)
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


def _count(cells: np.ndarray, w: np.ndarray | None, size: int) -> np.ndarray:
    """Spans per cell (int64), each counted ``w`` times when weighted (whole numbers: exact)."""
    if w is None:
        return np.bincount(cells, minlength=size)
    return np.bincount(cells, weights=w, minlength=size).astype(np.int64)


def _sketch_buckets(
    dur: np.ndarray, gid: np.ndarray, rows: int, mapping: LogMapping, w: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Sketch buckets of every row at once: spans of zero duration per row, and the unique
    (row, bucket index) pairs with their counts (weighted: ``w``), sorted by row then index."""
    positive = dur > 0
    if positive.all():
        zero = np.zeros(rows, np.int64)
    else:
        zero = _count(gid[~positive], None if w is None else w[~positive], rows)
    sk = mapping.index(dur[positive])
    pair = gid[positive] * 1_000_000 + (sk + 500_000)  # bucket indices stay well inside +-500k
    if w is None:
        upair, ucnt = np.unique(pair, return_counts=True)
    else:
        upair, inverse = np.unique(pair, return_inverse=True)
        ucnt = _count(inverse, w[positive], upair.size)
    return zero, upair // 1_000_000, upair % 1_000_000 - 500_000, ucnt


def _part_instances(batch: SpanBatch, order: np.ndarray, new_part: np.ndarray, parts: int) -> tuple[list, list]:
    """Distinct instances of each (service, window) part: unique (part, instance) pairs, sorted
    by part; returns where each part's instances start, and the instance names."""
    n_inst = len(batch.instances)
    pair = np.unique((np.cumsum(new_part) - 1) * n_inst + batch.instance_idx[order])
    inst_cut = np.searchsorted(pair // n_inst, np.arange(parts + 1)).tolist()
    return inst_cut, [batch.instances[i] for i in (pair % n_inst).tolist()]


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


def preaggregate_metrics(batch: MetricBatch, spec: WindowSpec, step: tuple[int, int]) -> list[MetricPartial]:
    if not len(batch):
        return []
    windows = (batch.time_ns // spec.length_ns).tolist()
    cols = (batch.time_ns.tolist(), batch.name_idx.tolist(), batch.instance_idx.tolist(), batch.attrs_idx.tolist(),
            batch.kind.tolist(), batch.temporality.tolist(), batch.monotonic.tolist(), batch.start_ns.tolist(),
            batch.value.tolist(), batch.count.tolist())  # fmt: skip
    groups: dict[tuple[int, int], list[tuple]] = {}
    for i, (service, window) in enumerate(zip(batch.service_idx.tolist(), windows)):
        t, name, inst, attrs, kind, temp, mono, start, value, count = (c[i] for c in cols)
        row = (t, batch.names[name], batch.instances[inst], batch.attrs[attrs], kind, temp, mono, start, value, count)
        groups.setdefault((service, window), []).append(row)
    return [
        MetricPartial(
            service=batch.services[service],
            window_start=window * spec.length_ns,
            max_time_ns=progress_ns(max(r[0] for r in rows), batch.received_ns),
            step=step,
            points=rows,
        )
        for (service, window), rows in groups.items()
    ]
