"""Autoscaling signals per service: the Kubernetes HPA v2 algorithm on event time.

For each closed service window (see ``../shared/PROTOCOLS.md``, HPA section):

- observed replicas = distinct ``service.instance.id`` in the window (config
  ``replicas`` or ``default_replicas`` when spans carry none);
- per metric, ``desired = ceil(observed * current / target)``, unchanged while
  ``|current / target - 1| <= tolerance``; metrics: SERVER call rate per replica
  (sized for ``max(now, forecast)``), SERVER p95 latency, SERVER error rate
  (each only when its target is set); the largest wins; min/max clamp;
- scale-up is limited to ``max(scale_up_percent %, scale_up_pods)`` per
  ``scale_up_period_s``; scale-down is stabilized: the highest recommendation
  of the last ``scale_down_stabilization_s`` wins;
- predictive: the call rate is forecast ``forecast_horizon_s`` ahead with
  river's Holt (trend) model, and Holt-Winters (seasonal, ``season_s``) once two
  seasons of history exist;
- OTLP metrics (``[[scaling.metrics]]``): per metric the same formula on the
  aggregation (avg, max, sum, rate per replica) of the service's live series; a
  service that sends only metrics is scaled on them; ``reason_code`` is
  ``metric:<name>`` when one decided;
- guards: no scale-down while an alert on latency, errors, error logs or silence
  fires on the service (alerts on call rates do not hold it: a drop in traffic is
  when a scale-down is wanted); a window in which the service sent nothing at all
  changes nothing (no data is not "no load", as the HPA treats missing metrics),
  and the forecast does not learn from it; a latency-driven scale-up is dropped when
  the service's calls to a dependency (CLIENT spans) fail at
  ``downstream_error_rate`` or more, since more replicas would not help.

The configuration is not part of the state: ``bind`` applies the one in force
(after a restart from a snapshot, too).

All times are window times (event time), so replays give the same signals.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from river import time_series

from pipeline.config import MetricTargetConfig, ScalingConfig
from pipeline.metric_series import aggregate
from pipeline.model import KIND_CLIENT, ScalingEvent, ScalingUpdate, ServiceWindow

MIN_DEPENDENCY_CALLS = 10


@dataclass(frozen=True)
class Targets:
    rps_per_replica: float
    p95_s: float
    error_rate: float
    min_replicas: int
    max_replicas: int
    replicas: int  # when no instance ids are seen
    metrics: tuple[MetricTargetConfig, ...] = ()  # OTLP metrics scaled on (target > 0)

    @staticmethod
    def for_service(cfg: ScalingConfig, service: str) -> Targets:
        o = next((s for s in cfg.services if s.name == service), None)

        def pick(name: str, default):
            value = getattr(o, name, 0) if o else 0
            return value or default

        return Targets(
            rps_per_replica=pick("target_rps_per_replica", cfg.target_rps_per_replica),
            p95_s=pick("target_p95_s", cfg.target_p95_s),
            error_rate=pick("target_error_rate", cfg.target_error_rate),
            min_replicas=pick("min_replicas", cfg.min_replicas),
            max_replicas=pick("max_replicas", cfg.max_replicas),
            replicas=pick("replicas", cfg.default_replicas),
            metrics=_metric_targets(cfg.metrics, o.metrics if o else ()),
        )


def _metric_targets(
    defaults: tuple[MetricTargetConfig, ...], own: tuple[MetricTargetConfig, ...]
) -> tuple[MetricTargetConfig, ...]:
    """The [[scaling.metrics]] with a service's overrides by name (target 0: not scaled on it)."""
    merged = {m.name: m for m in defaults}
    merged.update({m.name: m for m in own})
    return tuple(m for m in merged.values() if m.target > 0)


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


class RateForecaster:
    """Call-rate forecast: Holt (level + trend) now, Holt-Winters once two seasons are known."""

    def __init__(self, season_windows: int) -> None:
        self.season = season_windows
        self.holt = time_series.HoltWinters(alpha=0.4, beta=0.1)
        self.seasonal = (
            time_series.HoltWinters(alpha=0.4, beta=0.05, gamma=0.2, seasonality=season_windows)
            if season_windows >= 2
            else None
        )
        self.n = 0

    def forecast(self, horizon: int) -> float:
        """Highest forecast over the next ``horizon`` windows (NaN with too little history)."""
        if self.n < 3 or horizon <= 0:
            return math.nan
        model = self.seasonal if (self.seasonal is not None and self.n >= 2 * self.season) else self.holt
        return max(0.0, max(model.forecast(horizon=horizon)))

    def learn(self, rate: float) -> None:
        self.holt.learn_one(rate)
        if self.seasonal is not None:
            self.seasonal.learn_one(rate)
        self.n += 1


class ServiceScaler:
    """HPA-style desired replicas for one service. Picklable, no clock: window times only."""

    def __init__(self, cfg: ScalingConfig, service: str, length_s: float) -> None:
        self.service = service
        self.forecaster = RateForecaster(0)  # replaced by bind() with the configured season
        self.bind(cfg, length_s, fresh=True)
        self.desired: int | None = None
        self.recommendations: deque[tuple[float, int]] = deque()  # (t, recommendation)
        self.applied: deque[tuple[float, int]] = deque()  # (t, desired)
        self.initial: int | None = None  # replicas observed before the first decision

    def bind(self, cfg: ScalingConfig, length_s: float, fresh: bool = False) -> None:
        """Apply a configuration (targets, limits, policies). The forecaster keeps what it learned
        unless its season (in windows) changed, which it cannot take over."""
        self.cfg = cfg
        self.length_s = length_s
        self.targets = Targets.for_service(cfg, self.service)
        season = int(round(cfg.season_s / length_s)) if cfg.season_s else 0
        if fresh or self.forecaster.season != season:
            self.forecaster = RateForecaster(season)
        self.horizon = int(math.ceil(cfg.forecast_horizon_s / length_s)) if cfg.forecast_horizon_s else 0

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("cfg", "targets")}

    def on_window(self, sw: ServiceWindow, alert_firing: bool) -> tuple[ScalingUpdate, ScalingEvent | None]:
        """``alert_firing``: an alert that holds scale-down fires on the service."""
        t = sw.window_end / 1e9
        tg = self.targets
        observed = len(sw.instances) or tg.replicas
        rate = sw.server_calls / self.length_s
        forecast = self.forecaster.forecast(self.horizon)
        if not sw.silent_run:
            self.forecaster.learn(rate)
        current = self.desired if self.desired is not None else observed
        if self.initial is None:
            self.initial = observed

        candidates = self._candidates(sw, observed, rate, forecast, current)
        # The largest wins; on a tie the first (call rate, then latency, errors, metrics).
        recommendation, reason, code = max(candidates, key=lambda c: c[0])
        recommendation = min(max(recommendation, tg.min_replicas), tg.max_replicas)
        self.recommendations.append((t, recommendation))
        while self.recommendations[0][0] < t - self.cfg.scale_down_stabilization_s:
            self.recommendations.popleft()
        period_start = t - self.cfg.scale_up_period_s
        while len(self.applied) > 1 and self.applied[1][0] <= period_start:
            self.applied.popleft()  # keep the last decision made before the period started

        desired, reason, code = self._behaviour(t, recommendation, current, reason, code, alert_firing)
        self.applied.append((t, desired))
        changed = desired != self.desired
        self.desired = desired
        update = ScalingUpdate(self.service, sw.window_start, observed, desired, reason, code, rate,
                               forecast if not math.isnan(forecast) else rate)  # fmt: skip
        event = ScalingEvent(self.service, sw.window_start, observed, desired, reason, code) if changed else None
        return update, event

    def _candidates(
        self, sw: ServiceWindow, observed: int, rate: float, forecast: float, current: int
    ) -> list[tuple[int, str, str]]:
        """Per metric: (recommended replicas, why, reason code)."""
        tg = self.targets
        candidates: list[tuple[int, str, str]] = []
        metric = self._metric_candidates(sw, observed)
        if sw.silent_run:  # no spans: the metrics decide (a service may send only metrics), if any
            if not metric:
                candidates.append((current, "no data from the service in this window: unchanged", "no_data"))
        elif sw.server_calls or not math.isnan(forecast):
            sizing = max(rate, forecast) if not math.isnan(forecast) else rate
            ratio = (sizing / observed) / tg.rps_per_replica
            desired = observed if abs(ratio - 1) <= self.cfg.tolerance else _ceil(observed * ratio)
            fc = f" (forecast {forecast:.1f}/s)" if not math.isnan(forecast) else ""
            code = "forecast" if not math.isnan(forecast) and forecast > rate else "call_rate"
            candidates.append(
                (desired, f"call rate {rate:.1f}/s{fc} on {observed} replicas, target {tg.rps_per_replica:g}/s each",
                 code)
            )  # fmt: skip
        failing = _failing_dependencies(sw, self.cfg.downstream_error_rate)
        if tg.p95_s and sw.server_calls and not math.isnan(sw.server_p95) and not sw.silent_run:
            ratio = sw.server_p95 / tg.p95_s
            desired = observed if abs(ratio - 1) <= self.cfg.tolerance else _ceil(observed * ratio)
            why = f"p95 {sw.server_p95:.3f} s on {observed} replicas, target {tg.p95_s:g} s"
            if failing and desired > observed:
                name, share = failing[0]
                why += f": latency scale-up suppressed, dependency call {name} failing ({share:.0%} errors)"
                candidates.append((observed, why, "latency_suppressed_dependency"))
            else:
                candidates.append((desired, why, "latency"))
        if tg.error_rate and sw.server_calls:
            ratio = (sw.server_errors / sw.server_calls) / tg.error_rate
            desired = observed if abs(ratio - 1) <= self.cfg.tolerance else _ceil(observed * ratio)
            share = sw.server_errors / sw.server_calls
            candidates.append((desired, f"error rate {share:.1%}, target {tg.error_rate:.1%}", "error_rate"))
        candidates.extend(metric)
        if not candidates:
            candidates.append((current, "no SERVER spans in this window: unchanged", "no_traffic"))
        return candidates

    def _metric_candidates(self, sw: ServiceWindow, observed: int) -> list[tuple[int, str, str]]:
        """Per OTLP metric scaled on, as the HPA does for resource and external metrics:
        desired = ceil(observed * value / target); a metric without live series says nothing."""
        out = []
        for m in self.targets.metrics:
            value = aggregate(sw.metric(m.name), m.aggregation, observed)
            if math.isnan(value):
                continue
            ratio = value / m.target
            desired = observed if abs(ratio - 1) <= self.cfg.tolerance else _ceil(observed * ratio)
            why = f"{m.name} ({m.aggregation}) {value:.4g} on {observed} replicas, target {m.target:g}"
            out.append((desired, why, f"metric:{m.name}"))
        return out

    def _behaviour(
        self, t: float, recommendation: int, current: int, reason: str, code: str, alert_firing: bool
    ) -> tuple[int, str, str]:
        """The HPA's behaviour applied to a recommendation: scale-up rate limit, scale-down
        stabilization, the alert hold, then the replica limits."""
        tg = self.targets
        period_start = t - self.cfg.scale_up_period_s
        if recommendation > current:
            # Replicas in effect when the period started: the last decision before it, or
            # what was observed before the first decision.
            if self.applied and self.applied[0][0] <= period_start:
                base = self.applied[0][1]
            else:
                base = self.initial if self.initial is not None else current
            limit = max(_ceil(base * (1 + self.cfg.scale_up_percent / 100)), base + self.cfg.scale_up_pods)
            desired = min(recommendation, limit)
            if desired < recommendation:
                reason += f"; scale-up limited to {desired} per {self.cfg.scale_up_period_s:g} s"
                code = "scale_up_limited"
        else:
            stabilized = max(r for _, r in self.recommendations)
            desired = min(current, stabilized)
            if stabilized > recommendation and desired == current and current > recommendation:
                window_s = self.cfg.scale_down_stabilization_s
                reason += f"; scale-down stabilized (highest in {window_s:g} s: {stabilized})"
                code = "scale_down_stabilized"
        if desired < current and alert_firing:
            desired = current
            reason += "; scale-down held while an alert fires"
            code = "scale_down_held_alert"
        if not tg.min_replicas <= desired <= tg.max_replicas:
            # the limits win over stabilization and holds, as in the HPA (limits lowered or
            # raised across a restart take effect at once)
            desired = min(max(desired, tg.min_replicas), tg.max_replicas)
            reason += f"; limited to {tg.min_replicas}..{tg.max_replicas} replicas"
            code = "replica_limits"
        return desired, reason, code


def _failing_dependencies(sw: ServiceWindow, threshold: float) -> list[tuple[str, float]]:
    """CLIENT operations (calls to other services) whose error rate is at or over ``threshold``."""
    out = []
    for r in sw.results:
        if r.span_kind == KIND_CLIENT and r.count >= MIN_DEPENDENCY_CALLS and r.errors / r.count >= threshold:
            out.append((r.operation, r.errors / r.count))
    return sorted(out, key=lambda x: -x[1])
