"""A DDSketch-style log-bucket quantile sketch on numpy.

Values (seconds, > 0) fall in bucket ``i = ceil(log_gamma(x))`` with
``gamma = (1 + a) / (1 - a)``; bucket ``i`` covers ``(gamma**(i-1), gamma**i]``
and is represented by ``2 * gamma**i / (gamma + 1)``, which is within relative
error ``a`` of every value in it. So the estimate of any rank-based quantile
is within ``a`` (1 % by default) of the exact value at that rank
(``sorted(values)[floor(q * (n - 1))]``). Values <= 0 go to a zero bucket.

Sketches with the same accuracy merge by adding bucket counts, so batches,
windows and workers combine without loss beyond the stated bound.
"""

from __future__ import annotations

import math

import numpy as np


class LogMapping:
    """Value <-> bucket index for one relative accuracy."""

    __slots__ = ("relative_accuracy", "gamma", "_inv_log_gamma")

    def __init__(self, relative_accuracy: float = 0.01) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self.relative_accuracy = relative_accuracy
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)

    def index(self, values: np.ndarray) -> np.ndarray:
        """Bucket index of each value (values must be > 0)."""
        return np.ceil(np.log(values) * self._inv_log_gamma).astype(np.int64)

    def value(self, index: int) -> float:
        return 2.0 * self.gamma**index / (self.gamma + 1.0)


class LogSketch:
    """Mergeable quantile sketch: dense int64 bucket counts from ``offset`` on."""

    __slots__ = ("mapping", "offset", "counts", "zero_count", "count", "min", "max")

    def __init__(self, mapping: LogMapping) -> None:
        self.mapping = mapping
        self.offset = 0
        self.counts = np.zeros(0, dtype=np.int64)
        self.zero_count = 0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    # -- building
    def add(self, values: np.ndarray) -> None:
        """Add raw values (seconds)."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        positive = values[values > 0]
        zero = int(values.size - positive.size)
        if positive.size:
            idx, cnt = np.unique(self.mapping.index(positive), return_counts=True)
        else:
            idx = cnt = np.zeros(0, dtype=np.int64)
        self.add_buckets(idx, cnt, zero, float(values.min()), float(values.max()))

    def add_buckets(self, idx: np.ndarray, cnt: np.ndarray, zero: int, vmin: float, vmax: float) -> None:
        """Add pre-bucketed counts (``idx`` sorted ascending, as from ``np.unique``)."""
        if idx.size:
            self._grow(int(idx[0]), int(idx[-1]))
            np.add.at(self.counts, idx - self.offset, cnt)
        n = int(cnt.sum()) + zero
        self.zero_count += zero
        self.count += n
        if n:
            self.min = min(self.min, vmin)
            self.max = max(self.max, vmax)

    def merge(self, other: LogSketch) -> None:
        if other.mapping.gamma != self.mapping.gamma:
            raise ValueError("cannot merge sketches of different accuracy")
        if other.counts.size:
            lo, hi = other.offset, other.offset + other.counts.size - 1
            self._grow(lo, hi)
            self.counts[lo - self.offset : hi - self.offset + 1] += other.counts
        self.zero_count += other.zero_count
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _grow(self, lo: int, hi: int) -> None:
        if self.counts.size == 0:
            self.offset = lo
            self.counts = np.zeros(hi - lo + 1, dtype=np.int64)
            return
        cur_hi = self.offset + self.counts.size - 1
        if lo >= self.offset and hi <= cur_hi:
            return
        new_lo, new_hi = min(lo, self.offset), max(hi, cur_hi)
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        grown[self.offset - new_lo : self.offset - new_lo + self.counts.size] = self.counts
        self.offset, self.counts = new_lo, grown

    # -- reading
    def quantile(self, q: float) -> float:
        """Estimate of ``sorted(values)[floor(q * (count - 1))]``; NaN when empty."""
        if self.count == 0:
            return math.nan
        rank = math.floor(q * (self.count - 1))
        if rank == self.count - 1:
            return self.max  # the extremes are kept exactly
        if rank == 0:
            return self.min
        if rank < self.zero_count:
            return 0.0
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, rank - self.zero_count, side="right"))
        est = self.mapping.value(i + self.offset)
        return min(max(est, self.min), self.max)

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """Several quantiles at once (one cumulative sum); same values as ``quantile``."""
        if self.count == 0:
            return [math.nan] * len(qs)
        cum = None
        out = []
        for q in qs:
            rank = math.floor(q * (self.count - 1))
            if rank == self.count - 1:
                out.append(self.max)
            elif rank == 0:
                out.append(self.min)
            elif rank < self.zero_count:
                out.append(0.0)
            else:
                if cum is None:
                    cum = np.cumsum(self.counts)
                i = int(np.searchsorted(cum, rank - self.zero_count, side="right"))
                out.append(min(max(self.mapping.value(i + self.offset), self.min), self.max))
        return out

    # -- pickling: only the occupied range, as the smallest integer type that holds it
    def __getstate__(self):
        counts = self.counts
        nz = np.flatnonzero(counts)
        if nz.size:
            offset = self.offset + int(nz[0])
            counts = counts[nz[0] : nz[-1] + 1]
        else:
            offset, counts = 0, counts[:0]
        small = counts.astype(np.uint32) if counts.size and counts.max() < 2**32 else counts
        return (
            self.mapping.relative_accuracy,
            offset,
            small.tobytes(),
            small.dtype.str,
            self.zero_count,
            self.count,
            self.min,
            self.max,
        )

    def __setstate__(self, state) -> None:
        acc, offset, raw, dtype, zero, count, vmin, vmax = state
        self.mapping = LogMapping(acc)
        self.offset = offset
        self.counts = np.frombuffer(raw, dtype=np.dtype(dtype)).astype(np.int64)
        self.zero_count, self.count, self.min, self.max = zero, count, vmin, vmax
