"""A service's OTLP metric series, and what a window sees of them.

``ServiceMetrics`` (state per service, inside ``ServiceWindows``) folds each closed
window's points, in time order, into a table of series keyed by (metric, instance,
attributes), and returns the window's ``MetricValues`` per metric:

- the latest value of each live series: a gauge's value, a sum's value (a counter's
  total, an up-down counter's level), a histogram's (or summary's) mean observation
  over its latest interval;
- its rate: a sum's per-second increase, a histogram's observations per second.
  Cumulative points give the increase since the series' previous point; a reset
  (a new start time, or a value below the previous one) counts from zero, as
  Prometheus' ``rate`` does. Delta points are the increase over their own interval
  (``time - start``). A first cumulative point has no rate yet unless it says since when.

A series is live for ``metrics.stale_after_s`` after its latest point (a value holds
until the next export, as the HPA and Prometheus take the latest sample); then it is
dropped, freeing its slot. At most ``metrics.max_series_per_service`` series exist: the
points of further new series are left out and counted (``overflow``).

``aggregate`` turns a metric's series into the one number scaling and detection use:
``avg``, ``max``, ``sum`` of the values, or ``rate`` (the summed rates per observed
replica). Plain, picklable state: no clock, no bytewax.
"""

from __future__ import annotations

import math

from pipeline.config import MetricsConfig
from pipeline.metric_model import METRIC_GAUGE, METRIC_SUM, METRIC_SUMMARY, TEMPORALITY_CUMULATIVE, MetricValues

_T, _VALUE, _RATE, _START, _TOTAL, _COUNT = range(6)  # fields of a series' state (a list)


class ServiceMetrics:
    """The live metric series of one service. Picklable; configuration bound by ``bind``."""

    def __init__(self, max_series: int, stale_ns: int) -> None:
        # (name, instance, attrs) -> [time, value, rate, start, total, count]
        self.series: dict[tuple[str, str, str], list] = {}
        self.bind(max_series, stale_ns)

    @staticmethod
    def from_config(cfg: MetricsConfig) -> ServiceMetrics:
        return ServiceMetrics(cfg.max_series_per_service, int(cfg.stale_after_s * 1e9))

    def bind(self, max_series: int, stale_ns: int) -> None:
        self.max_series, self.stale_ns = max_series, stale_ns

    def close_window(self, points: list[tuple], window_end: int) -> tuple[tuple[MetricValues, ...], int, int]:
        """Fold a window's points in; returns (values per metric, points taken, points left out)."""
        fresh: set[str] = set()
        taken = overflow = 0
        # time order; ties in a fixed order, so the result depends on the points alone
        for p in sorted(points, key=lambda r: (r[0], r[1], r[2], r[3], r[8] if r[8] == r[8] else 0.0)):
            t, name, instance, attrs, kind, temporality, monotonic, start, value, count = p
            key = (name, instance, attrs)
            st = self.series.get(key)
            if st is None:
                if len(self.series) >= self.max_series:
                    self._expire(window_end)
                if len(self.series) >= self.max_series:
                    overflow += 1
                    continue
                st = self.series[key] = [0, math.nan, math.nan, 0, math.nan, math.nan]
            elif t <= st[_T]:
                taken += 1  # a repeated or older point: nothing new
                continue
            _fold(st, t, kind, temporality, bool(monotonic), start, value, count)
            fresh.add(name)
            taken += 1
        self._expire(window_end)
        by_name: dict[str, tuple[list[float], list[float], set[str]]] = {}
        for (name, instance, _), st in sorted(self.series.items()):
            values, rates, instances = by_name.setdefault(name, ([], [], set()))
            values.append(st[_VALUE])
            rates.append(st[_RATE])
            if instance:
                instances.add(instance)
        out = tuple(
            MetricValues(name, tuple(v), tuple(r), tuple(sorted(i)), name in fresh)
            for name, (v, r, i) in by_name.items()
        )
        return out, taken, overflow

    def instances(self) -> set[str]:
        return {instance for (_, instance, _) in self.series if instance}

    def _expire(self, now_ns: int) -> None:
        horizon = now_ns - self.stale_ns
        if any(st[_T] < horizon for st in self.series.values()):
            self.series = {k: st for k, st in self.series.items() if st[_T] >= horizon}


def _fold(st: list, t: int, kind: int, temporality: int, monotonic: bool, start: int, value: float,
          count: float) -> None:  # fmt: skip
    """One point into its series' state: latest value and rate."""
    prev_t = st[_T]
    if kind == METRIC_GAUGE:
        st[_VALUE] = value
    elif kind == METRIC_SUM:
        st[_VALUE] = value
        if temporality == TEMPORALITY_CUMULATIVE:
            st[_RATE] = _cumulative_rate(st, t, start, value, prev_t) if monotonic else math.nan
            st[_TOTAL] = value
        else:
            since = start if 0 < start < t else prev_t
            st[_RATE] = value / ((t - since) / 1e9) if 0 < since < t else math.nan
    else:  # histogram, exponential histogram, summary: count and sum of observations
        if temporality == TEMPORALITY_CUMULATIVE or kind == METRIC_SUMMARY:
            reset = not (start == st[_START] and count >= st[_COUNT] and prev_t)
            d_count = count if reset else count - st[_COUNT]
            d_sum = value if reset else value - st[_TOTAL]
            since = (start if 0 < start < t else 0) if reset else prev_t
            st[_TOTAL], st[_COUNT] = value, count
        else:
            d_count, d_sum = count, value
            since = start if 0 < start < t else prev_t
        if d_count > 0 and not math.isnan(d_sum):
            st[_VALUE] = d_sum / d_count
        st[_RATE] = d_count / ((t - since) / 1e9) if 0 < since < t else math.nan
    st[_T], st[_START] = t, start


def _cumulative_rate(st: list, t: int, start: int, value: float, prev_t: int) -> float:
    """Per-second increase of a cumulative counter since its previous point (a reset: since its
    start, counting from zero)."""
    reset = not prev_t or start != st[_START] or value < st[_TOTAL]
    if not reset:
        return (value - st[_TOTAL]) / ((t - prev_t) / 1e9)
    since = start if 0 < start < t else 0
    if not since:
        return math.nan if not prev_t else value / ((t - prev_t) / 1e9)
    return value / ((t - since) / 1e9)


def aggregate(mv: MetricValues | None, aggregation: str, replicas: int) -> float:
    """The metric's value for a window: ``avg``, ``max``, ``sum`` of the series' latest values,
    or ``rate``: their summed per-second increase per replica. NaN when nothing is known."""
    if mv is None:
        return math.nan
    if aggregation == "rate":
        rates = [r for r in mv.rates if not math.isnan(r)]
        return sum(rates) / max(replicas, 1) if rates else math.nan
    values = [v for v in mv.values if not math.isnan(v)]
    if not values:
        return math.nan
    if aggregation == "max":
        return max(values)
    if aggregation == "sum":
        return math.fsum(values)
    return math.fsum(values) / len(values)
