"""A service's open window: every (operation, kind) as rows of arrays, and its results.

``_Ops`` merges partials with a few numpy calls however many operations they carry,
and ``_results`` closes it: every row's quantiles at once (the same rules as
``LogSketch.quantiles``), exemplar trace ids, and the service's SERVER sketch.
``_ops_from_windows`` reads open windows of recovery snapshots taken by a version
from before the columnar windows. Plain, picklable, no bytewax (``pipeline/windows.py``
holds them per service).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.model import KIND_SERVER, Partial, WindowResult
from pipeline.preaggregate import _rank_in_runs
from pipeline.sketch import LogMapping, LogSketch

QUANTILES = (0.5, 0.9, 0.95, 0.99)


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


def _ops_from_windows(windows: dict[tuple[str, int], Any], nb: int, keep: int) -> _Ops:
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

    slow_row, slow_dur, slow_trace = ops.top_slow()
    slow = _split_rows(slow_row, _hex_ids(slow_trace), n)
    slow_d = _split_rows(slow_row, slow_dur.tolist(), n)
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
                slow_durations=tuple(slow_d[r]),
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
