"""Online anomaly detection per (service, operation, span kind) and per service, with alerts.

For each closed window a key gets features: ``latency_p50``, ``latency_p95`` and
``latency_p99`` (log seconds), ``error_rate`` and ``call_rate`` (calls/s). The
median is there because tails are often bimodal (a p95 that jumps between
3 ms and 80 ms from one window to the next is normal for some operations), so
a sustained slowdown shows first and clearest in p50. A service also gets
``error_log_rate`` (ERROR-or-worse log records/s). Detection is prequential:
every window is scored first, then learned from, and only if it was judged
normal, so an incident does not become the new normal.

- Band (per feature): an exponentially weighted mean and variance (river
  ``stats.EWMean``/``EWVar``) give ``expected`` and ``sigma``; the band is
  ``expected +- k * sigma``. sigma never goes below the sampling noise of the
  window (Poisson for rates, binomial for error rate, ~1/sqrt(n) for log
  quantiles), so a key with few calls does not alarm on noise. Latency and
  errors alarm above the band, traffic on both sides. After warm-up, values
  learned are clipped to the band (robust to single outliers); during warm-up
  they are not, so the band learns the key's real spread.
- Multivariate: ``MinMaxScaler | HalfSpaceTrees`` (river, seeded) over the
  key's features, when ``anomaly.detector`` uses it (hst, band_and_hst,
  band_or_hst); its score is exported. The evaluation in
  ``bench/anomaly_eval.py`` compares the choices; see docs/anomaly-and-scaling.md for why ``band``
  is the default.
- A key is "learning" for its first ``warmup_windows`` windows: scored, not judged.
- Keys come and go: a key without spans for ``stale_after_s`` of event time while its
  service goes on sending is retired: a pending or firing alert on it resolves with
  ``reason: "expired"``, its detector, rule states and downstream baselines are dropped
  and a ``KeyExpired`` record tells the sinks to drop its series. A whole service that
  falls silent is an outage, not churn: windows in which it sent nothing at all
  (``ServiceWindow.silent_run``) are not judged per key (nothing expires, no alert per
  operation); the service key judges the silence itself (``service_rate``: the service's
  spans and log records per second, learned from every window, and during a silent run
  of ``n`` windows the chance of seeing nothing), once the silence is longer than
  1.5 times any it came back from lately (its pattern: a batch job, a cron), and once
  the service has been known for 6 times the warm-up (its first pauses are learned).
- Alerts: pending on the first anomalous window, firing after
  ``pending_windows`` in a row, resolved after ``resolve_windows`` normal ones.
  Static rules from config go through the same lifecycle.

Everything here is plain, picklable Python with no clock and no bytewax.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from pipeline.config import DEFAULT_BUCKETS, AnomalyConfig, MetricTargetConfig, RuleConfig
from pipeline.detectors import (
    KEY_FEATURES,
    METRIC_PREFIX,
    RATE_FEATURES,
    SERVICE_FEATURES,
    TRAFFIC_FEATURES,
    AlertLifecycle,
    FeatureBaseline,
    KeyDetector,
    _beyond,
    _features,
    _noise,
    _score,
    _strength,
    _worst,
    is_metric,
)
from pipeline.metric_series import aggregate
from pipeline.model import (
    KIND_CLIENT,
    AlertEvent,
    AnomalyUpdate,
    Judgement,
    KeyExpired,
    ServiceWindow,
    WindowResult,
    kind_name,
)
from pipeline.rare_events import SLOW_CALLS, at_once_z, counted

QUIET_HALF_LIFE_S = 6 * 3600.0  # how long a silence the service came back from is remembered (halving)
SILENCE_WARMUP = 6  # silence is judged after this many times anomaly.warmup_windows (12 min by default)
QUIET_SLACK = 1.5  # a silence is judged once it is this much longer than the longest remembered one
MAX_SILENCE_LEARNED = 200  # empty windows learned after a silence (with fading 0.05, more change nothing)
SERVICE_KEY = ("", -1)  # (operation, kind) of the service-level key
# Recovery snapshots name the classes they hold by module: the detectors were defined here before.
__all__ = ["ServiceAnomaly", "KeyDetector", "FeatureBaseline", "AlertLifecycle", "SERVICE_KEY"]


@dataclass
class _RuleState:
    lifecycle: AlertLifecycle


class ServiceAnomaly:
    """All detectors and rules of one service. Feed it each closed ``ServiceWindow``.

    Holds state only: the configuration (``cfg``) is given at construction and, after a
    restart from a snapshot, by ``bind``; it is not pickled."""

    def __init__(
        self, cfg: AnomalyConfig, service: str, length_s: float, stale_after_s: float = 600.0,
        metrics: tuple[MetricTargetConfig, ...] = (), bounds: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:  # fmt: skip
        self.service = service
        self.keys: dict[tuple[str, int], KeyDetector] = {}
        self.rules: dict[tuple[str, str, int], _RuleState] = {}
        self.downstream: dict[str, dict[str, FeatureBaseline]] = {}
        self.last_seen: dict[tuple[str, int], int] = {}  # key -> start of its newest window with spans
        self.silence = 0  # empty windows in the current silent run, not learned yet
        self.quiet = 0.0  # the longest silence (windows) it came back from, fading (QUIET_HALF_LIFE_S)
        self.downstream_seen: dict[str, int] = {}  # callee -> start of its newest window with calls
        self.downstream_ranking: tuple[dict, ...] = ()  # the last window's, for the incident tracker
        self.metric_seen: dict[str, int] = {}  # metric feature -> window start of its latest fresh point
        self.bind(cfg, length_s, stale_after_s, metrics, bounds)

    def bind(
        self, cfg: AnomalyConfig, length_s: float, stale_after_s: float, metrics: tuple[MetricTargetConfig, ...] = (),
        bounds: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:  # fmt: skip
        """``metrics``: the OTLP metrics judged on the service key (``[[anomaly.metrics]]`` and the
        scaling metrics), by name; the first entry of a name decides its aggregation. ``bounds``:
        the explicit histogram buckets of the windows (``prometheus.buckets``), in seconds."""
        self.cfg, self.length_s, self.stale_ns = cfg, length_s, int(stale_after_s * 1e9)
        self.bounds = bounds
        self.metrics = tuple({m.name: m for m in reversed(metrics)}.values())[::-1]
        for det in self.keys.values():
            det.bind(cfg)
        rules = {r.name: r for r in cfg.rules}
        for (name, _, _), state in self.rules.items():
            if name in rules:  # a removed rule's states resolve at the next window (_prune_rules)
                state.lifecycle.m = max(1, math.ceil(rules[name].for_s / length_s))
                state.lifecycle.r = cfg.resolve_windows

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("cfg", "metrics")}

    def __setstate__(self, state: dict) -> None:
        state.pop("cfg", None)  # snapshots of earlier versions carried it
        self.metrics = ()
        self.__dict__.update(state)
        self.__dict__.setdefault("last_seen", {})
        self.__dict__.setdefault("downstream_seen", {})
        self.__dict__.setdefault("silence", 0)
        self.__dict__.setdefault("quiet", 0.0)
        self.__dict__.setdefault("downstream_ranking", ())
        self.__dict__.setdefault("metric_seen", {})
        self.__dict__.setdefault("stale_ns", 600 * 10**9)
        service_key = self.keys.get(SERVICE_KEY)
        if service_key is not None and "service_rate" not in service_key.baselines:
            service_key.features = SERVICE_FEATURES
            service_key.baselines = {"service_rate": FeatureBaseline(0.05), **service_key.baselines}

    def holds_scale_down(self) -> bool:
        """An alert fires on something other than how much traffic came (latency, errors, error
        logs, silence): a scale-down now could make the incident worse or act on missing data."""
        lifecycles = [d.lifecycle for d in self.keys.values()] + [r.lifecycle for r in self.rules.values()]
        return any(lc.state == "firing" and lc.feature not in TRAFFIC_FEATURES for lc in lifecycles)

    def on_window(self, sw: ServiceWindow) -> tuple[list, list[AlertEvent]]:
        """Judge one closed window: (updates, alert events). Updates are ``AnomalyUpdate`` per key
        judged and ``KeyExpired`` per key retired."""
        updates: list = []
        events: list[AlertEvent] = self._prune_rules(sw.window_start)
        k = self.cfg.band_k
        t = sw.window_start
        scored: list[tuple[float, WindowResult, Judgement]] = []
        self.quiet *= 0.5 ** (self.length_s / QUIET_HALF_LIFE_S)
        if sw.silent_run:
            self.silence = sw.silent_run
        elif self.silence:
            self.quiet = max(self.quiet, self.silence)
            self._learn_silence()
        # Silences as long as one it came back from lately are its pattern (a batch job, a
        # cron, traffic that moves between regions), not an outage: judged only beyond that.
        # And only once it has been known for a while, so the first pauses of its pattern are seen.
        known = self.keys.get(SERVICE_KEY)
        seasoned = known is not None and known.windows >= SILENCE_WARMUP * self.cfg.warmup_windows
        judged_run = sw.silent_run if seasoned and sw.silent_run > QUIET_SLACK * self.quiet + 1 else 0
        if not sw.silent_run:  # a silent service is judged as a whole, below
            seen = set()
            for r in sw.results:
                key = (r.operation, r.span_kind)
                seen.add(key)
                self.last_seen[key] = t
                values = _features(r, self.length_s)
                upd, ev = self._judge_key(key, values, r.count, t, r, gap=sw.gap)
                updates.append(upd)
                events.extend(ev)
                scored.append((upd.score, r, _worst(upd.judgements, k)))
                events.extend(self._rules(key, values, t, r))
            for key in sorted(set(self.keys) - seen - {SERVICE_KEY}):
                if self.last_seen.setdefault(key, t) <= t - self.stale_ns:
                    events.extend(self._retire(key, t, "expired"))
                    updates.append(KeyExpired(self.service, key[0], key[1], t))
                    continue
                # A known key without traffic in this window: its call rate is 0.
                values = {"latency_p50": math.nan, "latency_p95": math.nan, "latency_p99": math.nan,
                          "error_rate": 0.0, "call_rate": 0.0}  # fmt: skip
                upd, ev = self._judge_key(key, values, 0, t, None, gap=sw.gap)
                updates.append(upd)
                events.extend(ev)
        length = self.length_s
        service = {"service_rate": (sw.calls + sw.logs) / length, "error_log_rate": sw.error_logs / length}
        held, spans = self._metric_values(sw, service)
        upd, ev = self._judge_key(SERVICE_KEY, service, sw.logs, t, None, sw.silent_run, judged_run, held, spans,
                                  sw.gap)  # fmt: skip
        updates.append(upd)
        events.extend(ev)
        events.extend(self._rules(SERVICE_KEY, service, t, None))
        self.downstream_ranking = self._downstream(sw)
        ranking = _ranking(scored) + self.downstream_ranking
        events = [_with_ranking(e, ranking) if e.state == "firing" else e for e in events]
        return updates, events

    def _metric_values(self, sw: ServiceWindow, values: dict[str, float]) -> tuple[tuple[str, ...], dict[str, int]]:
        """Put the configured metrics' values into ``values``; returns the features whose value is
        held from an earlier point (judged again, not learned again), and for each fresh one the
        windows since its previous point (what the point summarizes: its export interval)."""
        held, spans = [], {}
        replicas = len(sw.instances) or 1
        for m in self.metrics:
            f = METRIC_PREFIX + m.name
            mv = sw.metric(m.name)
            values[f] = aggregate(mv, m.aggregation, replicas)
            if mv is None or not mv.fresh:
                held.append(f)
                continue
            previous = self.metric_seen.get(f)
            self.metric_seen[f] = sw.window_start
            if previous is not None and previous < sw.window_start:
                spans[f] = round((sw.window_start - previous) / (self.length_s * 1e9))
        for f in [f for f in self.metric_seen if f not in values]:
            del self.metric_seen[f]  # no longer configured
        return tuple(held), spans

    def _learn_silence(self) -> None:
        """A silence that ended without an alert was normal for this service: its empty windows
        now count in its rate (one that alerted was an outage, not the normal)."""
        n, self.silence = self.silence, 0
        det = self.keys.get(SERVICE_KEY)
        if det is None or det.lifecycle.state != "ok" or det.lifecycle.anomalous_run:
            return
        for _ in range(min(n, MAX_SILENCE_LEARNED)):
            det.learn_feature("service_rate", 0.0, 0, self.length_s)

    def expire_all(self, time: int) -> list[AlertEvent]:
        """The service is forgotten: every pending or firing alert resolves (reason "expired")."""
        events = []
        for key in sorted(self.keys):
            events.extend(self._retire(key, time, "expired"))
        for sk in sorted(self.rules):
            events.extend(self._retire_rule(sk, time, "expired"))
        return events

    def _retire(self, key: tuple[str, int], time: int, reason: str) -> list[AlertEvent]:
        """Drop a key's detector and rule states; an open alert on it resolves, saying why."""
        det = self.keys.pop(key)
        self.last_seen.pop(key, None)
        events = []
        if det.lifecycle.state != "ok":
            events.append(self._resolved(key, det.lifecycle.feature, "detector", time, reason))
        for sk in sorted(sk for sk in self.rules if sk[1:] == key):
            events.extend(self._retire_rule(sk, time, reason))
        return events

    def _retire_rule(self, sk: tuple[str, str, int], time: int, reason: str) -> list[AlertEvent]:
        state = self.rules.pop(sk)
        if state.lifecycle.state == "ok":
            return []
        return [self._resolved(sk[1:], state.lifecycle.feature, f"rule:{sk[0]}", time, reason)]

    def _resolved(self, key: tuple[str, int], feature: str, source: str, time: int, reason: str) -> AlertEvent:
        return AlertEvent(
            service=self.service, operation=key[0], span_kind=key[1], state="resolved", time=time,
            feature=feature or "call_rate", observed=math.nan, expected=math.nan, lower=math.nan, upper=math.nan,
            score=0.0, source=source, reason=reason,
        )  # fmt: skip

    def _prune_rules(self, time: int) -> list[AlertEvent]:
        """States of rules no longer configured (removed before a restart) are dropped."""
        names = {r.name for r in self.cfg.rules}
        events = []
        for sk in sorted(sk for sk in self.rules if sk[0] not in names):
            events.extend(self._retire_rule(sk, time, "rule_removed"))
        return events

    def _downstream(self, sw: ServiceWindow, top: int = 5) -> tuple[dict, ...]:
        """Services this one called (from joined traces), by how far their latency and errors
        as seen on these calls are above their own baselines."""
        k = self.cfg.band_k
        ranked = []
        for callee in [c for c, t in self.downstream_seen.items() if t <= sw.window_start - self.stale_ns]:
            del self.downstream_seen[callee]  # a callee not called for stale_after_s: forgotten
            self.downstream.pop(callee, None)
        for dep in sw.dependencies:
            self.downstream_seen[dep.callee] = sw.window_start
            base = self.downstream.setdefault(
                dep.callee, {f: FeatureBaseline(self.cfg.fading_factor) for f in ("latency", "error_rate")}
            )
            values = {"latency": math.log(max(dep.mean_duration, 1e-9)), "error_rate": dep.errors / dep.calls}
            scores = {}
            for f, x in values.items():
                b = base[f]
                noise = _noise("error_rate" if f == "error_rate" else "latency_p50", b.mean.get(), dep.calls, 1.0)
                if b.n >= self.cfg.warmup_windows:
                    expected, _, hi = b.band(k, noise)
                    scores[f] = (x - expected) / ((hi - expected) / k) / k
            worst = max(scores.items(), key=lambda kv: kv[1], default=(None, 0.0))
            if worst[1] < 1.0:  # learn from normal windows only
                for f, x in values.items():
                    b = base[f]
                    noise = _noise("error_rate" if f == "error_rate" else "latency_p50", b.mean.get(), dep.calls, 1.0)
                    b.learn(x, k, noise, b.n >= self.cfg.warmup_windows)
            if worst[1] > 0:
                ranked.append((worst[1], dep, worst[0]))
        ranked.sort(key=lambda x: (-x[0], x[1].callee))
        return tuple(
            {"downstream_service": dep.callee, "score": round(score, 6), "feature": feature,
             "sampled_calls": dep.calls}  # fmt: skip
            for score, dep, feature in ranked[:top]
        )

    def _judge_key(
        self, key, values, calls, time, r: WindowResult | None, silent_run: int = 0, judged_run: int = 0,
        held: tuple[str, ...] = (), spans: dict[str, int] | None = None, gap: bool = False,
    ):  # fmt: skip
        """``silent_run``: empty windows in a row up to this one; ``judged_run``: the same when
        the silence is to be judged, else 0; ``held``: features judged but not learned;
        ``spans``: fresh metric features -> windows their point summarizes; ``gap``: the window
        was partly a gap in the input, its rates are neither judged nor learned (less was read,
        not less sent)."""
        buckets = [sum(per_status) for per_status in zip(*r.bucket_counts)] if r is not None and r.count else None
        det = self.keys.get(key)
        if det is None:
            feats = SERVICE_FEATURES if key == SERVICE_KEY else KEY_FEATURES
            det = self.keys[key] = KeyDetector(self.cfg, feats)
        if key == SERVICE_KEY:
            det.with_metrics(tuple(METRIC_PREFIX + m.name for m in self.metrics))
        if any(math.isnan(values.get(f, 0.0)) for f in det.features if not is_metric(f)):
            values = {f: (v if not math.isnan(v) else det.baselines[f].mean.get()) for f, v in values.items()}
            judgements, hst, anomalous = det.judge(values, 0, self.length_s, rates=not gap)
        else:
            judgements, hst, anomalous = det.judge(values, calls, self.length_s, judged_run, buckets, self.bounds,
                                                   not gap)  # fmt: skip
        learning = det.learning
        # slow calls and rare counts judged over a run of windows: that many windows of evidence
        runs = {f: r.run[1] for f, r in det.rare.items() if r.run[1] > 1}
        if det.tail is not None and det.tail.windows > 1:
            runs[SLOW_CALLS] = det.tail.windows
        if runs:
            spans = {**(spans or {}), **runs}
        evidence = _evidence_windows(judgements, self.cfg.band_k, self.cfg.pending_windows, self.length_s, spans or {})
        change = det.lifecycle.observe(anomalous, evidence)
        if change in ("pending", "firing"):
            det.lifecycle.feature = _worst(judgements, self.cfg.band_k).feature
        if not anomalous:  # never learn from a window judged anomalous
            # A silence is learned once it is over (``_learn_silence``): judged against the rate
            # from before it, not against a baseline that fades toward zero as it goes on.
            skip = RATE_FEATURES if gap else ("service_rate",) if silent_run else ()
            det.learn(values, calls, self.length_s, skip + held, buckets)
        score = _score(judgements, self.cfg.band_k)
        upd = AnomalyUpdate(self.service, key[0], key[1], time, score, hst, learning, det.lifecycle.state,
                            tuple(judgements))  # fmt: skip
        events = []
        if change:
            worst = _worst(judgements, self.cfg.band_k)
            if change == "resolved":  # says how the feature it fired on is now
                worst = next((j for j in judgements if j.feature == det.lifecycle.feature), worst)
            events.append(
                AlertEvent(
                    service=self.service, operation=key[0], span_kind=key[1], state=change, time=time,
                    feature=worst.feature, observed=worst.observed, expected=worst.expected,
                    lower=worst.lower, upper=worst.upper, score=score, source="detector",
                    trace_ids=_traces(r, worst.feature, self.cfg.max_trace_ids),
                )  # fmt: skip
            )
        return upd, events

    def _rules(self, key, values, time, r: WindowResult | None) -> list[AlertEvent]:
        events = []
        for rule in self.cfg.rules:
            if rule.feature not in values or not _matches(rule, self.service, key):
                continue
            observed = values[rule.feature]
            if rule.feature.startswith("latency_"):
                observed = math.exp(observed)  # rules speak seconds
            violated = observed > rule.above or observed < rule.below
            sk = (rule.name, key[0], key[1])
            state = self.rules.get(sk)
            if state is None:
                windows = max(1, math.ceil(rule.for_s / self.length_s))
                state = self.rules[sk] = _RuleState(AlertLifecycle(windows, self.cfg.resolve_windows))
                state.lifecycle.feature = rule.feature
            change = state.lifecycle.observe(violated)
            if change:
                events.append(
                    AlertEvent(
                        service=self.service, operation=key[0], span_kind=key[1], state=change, time=time,
                        feature=rule.feature, observed=observed, expected=math.nan, lower=rule.below,
                        upper=rule.above, score=1.0 if violated else 0.0, source=f"rule:{rule.name}",
                        trace_ids=_traces(r, rule.feature, self.cfg.max_trace_ids),
                    )  # fmt: skip
                )
        return events


def _evidence_windows(judgements, k: float, m: int, length_s: float, spans: dict[str, int]) -> int:
    """Windows of evidence an anomalous window stands for: 1, or
    - ``m`` (``pending_windows``) when a rare count (judged as Poisson counts, whose z is an
      exact probability) is beyond ``at_once_z``: as unlikely alone as ``m`` windows in a row
      beyond the band, so it fires at once (one burst of errors from a service that logs none
      is not left pending). Not for the band's z-scores: real rates and latencies have heavier
      tails than the normal, and one window at z 6 is common enough on them (tried: the
      fault-free OnlineBoutique hour fired 8-21 times on call rates);
    - when only fresh metric points, or slow calls judged over a run of windows (``SLOW_CALLS``),
      are beyond their bands, the fewest windows those points or runs summarize (a CPU point
      exported once a minute is a minute of high CPU, not ten seconds of it; a rare operation's
      run of three slow windows is three windows of evidence). A held point is judged again
      every window, so one high point would fire a window later anyway; this makes it fire when
      it arrives, in replay too, where no window may follow the last point."""
    beyond = [j for j in judgements if _beyond(j, k)]
    strong = m if any(counted(j, length_s) and _strength(j) >= at_once_z(k, m) for j in beyond) else 1
    if not beyond or any(j.feature not in spans for j in beyond):
        return strong
    return max(strong, min(spans[j.feature] for j in beyond))


def _matches(rule: RuleConfig, service: str, key: tuple[str, int]) -> bool:
    if not fnmatch.fnmatchcase(service, rule.service):
        return False
    if key == SERVICE_KEY:
        return rule.operation in ("*", "")
    return fnmatch.fnmatchcase(key[0], rule.operation)


def _traces(r: WindowResult | None, feature: str, limit: int) -> tuple[str, ...]:
    if r is None:
        return ()
    if feature == "error_rate" and r.error_traces:
        return r.error_traces[:limit]
    return r.slow_traces[:limit]


def _ranking(scored: list[tuple[float, WindowResult, Judgement]], top: int = 5) -> tuple[dict, ...]:
    """Operations of the service by anomaly score; CLIENT operations are calls to dependencies."""
    ranked = sorted(
        (x for x in scored if x[0] > 0), key=lambda x: (-x[0], -x[1].count, x[1].operation, x[1].span_kind)
    )
    out = []
    for score, r, j in ranked[:top]:
        entry = {
            "operation": r.operation,
            "span_kind": kind_name(r.span_kind),
            "score": round(score, 6),
            "feature": j.feature,
            "calls": r.count,
        }
        if r.span_kind == KIND_CLIENT:
            entry["dependency_call"] = True  # a call this service makes to another one
        out.append(entry)
    return tuple(out)


def _with_ranking(e: AlertEvent, ranking: tuple[dict, ...]) -> AlertEvent:
    return AlertEvent(**{**e.__dict__, "ranking": ranking})
