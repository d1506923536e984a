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
  ``bench/anomaly_eval.py`` compares the choices; see README for why ``band``
  is the default.
- A key is "learning" for its first ``warmup_windows`` windows: scored, not judged.
- Alerts: pending on the first anomalous window, firing after
  ``pending_windows`` in a row, resolved after ``resolve_windows`` normal ones.
  Static rules from config go through the same lifecycle.

Everything here is plain, picklable Python with no clock and no bytewax.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from river import anomaly as river_anomaly
from river import preprocessing, stats

from pipeline.config import AnomalyConfig, RuleConfig
from pipeline.model import KIND_CLIENT, SPAN_KINDS, ServiceWindow, WindowResult

KEY_FEATURES = ("latency_p50", "latency_p95", "latency_p99", "error_rate", "call_rate")
SERVICE_FEATURES = ("error_log_rate",)
UP, BOTH = "up", "both"
DIRECTION = {"latency_p50": UP, "latency_p95": UP, "latency_p99": UP, "error_rate": UP, "call_rate": BOTH, "error_log_rate": UP}
STATE_VALUE = {"ok": 0, "pending": 1, "firing": 2}
SERVICE_KEY = ("", -1)  # (operation, kind) of the service-level key


@dataclass(frozen=True)
class Judgement:
    """One feature of one window: observed value, band, directional z-score."""

    feature: str
    observed: float
    expected: float
    lower: float
    upper: float
    z: float  # signed distance from expected in sigmas; 0 when not judged
    judged: bool  # False while learning or with too few calls


@dataclass(frozen=True)
class AnomalyUpdate:
    """Per key and window: what /metrics shows about its anomaly state."""

    service: str
    operation: str  # "" for the service-level key
    span_kind: int  # -1 for the service-level key
    time: int  # window start, unix ns
    score: float  # max directional |z| / k over judged features (>= 1 means anomalous)
    hst_score: float
    learning: bool
    state: str  # ok, pending, firing
    judgements: tuple[Judgement, ...]


@dataclass(frozen=True)
class AlertEvent:
    service: str
    operation: str
    span_kind: int
    state: str  # pending, firing, resolved
    time: int  # unix ns: start of the window that caused the change
    feature: str
    observed: float
    expected: float
    lower: float
    upper: float
    score: float
    source: str  # "detector" or "rule:<name>"
    trace_ids: tuple[str, ...] = ()
    ranking: tuple[dict, ...] = ()  # with firing: operations contributing most

    def to_json(self) -> dict:
        doc = {
            "type": "alert",
            "state": self.state,
            "service": self.service,
            "time": self.time,
            "feature": self.feature,
            "observed": _num(self.observed),
            "expected": _num(self.expected),
            "band": [_num(self.lower), _num(self.upper)],
            "score": _num(self.score),
            "source": self.source,
            "trace_ids": list(self.trace_ids),
        }
        if self.operation:
            doc["operation"] = self.operation
            doc["span_kind"] = _kind_name(self.span_kind)
        if self.ranking:
            doc["ranking"] = list(self.ranking)
        return doc


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else round(x, 9)


def _kind_name(kind: int) -> str:
    return SPAN_KINDS[kind] if 0 <= kind < len(SPAN_KINDS) else str(kind)


class FeatureBaseline:
    """Exponentially weighted mean and variance of one feature, learned from normal windows."""

    def __init__(self, fading_factor: float) -> None:
        self.mean = stats.EWMean(fading_factor)
        self.var = stats.EWVar(fading_factor)
        self.n = 0

    def band(self, k: float, noise: float) -> tuple[float, float, float]:
        expected = self.mean.get()
        sigma = max(math.sqrt(max(self.var.get(), 0.0)), noise, 1e-12)
        return expected, expected - k * sigma, expected + k * sigma

    def learn(self, x: float, k: float, noise: float, warm: bool) -> None:
        if warm:  # after warm-up, values are clipped to the band: one outlier moves it little
            _, lo, hi = self.band(k, noise)
            x = min(max(x, lo), hi)
        self.mean.update(x)
        self.var.update(x)
        self.n += 1


class AlertLifecycle:
    """pending -> firing after M anomalous windows in a row -> resolved after R normal ones."""

    def __init__(self, pending_windows: int, resolve_windows: int) -> None:
        self.m, self.r = pending_windows, resolve_windows
        self.state = "ok"
        self.anomalous_run = 0
        self.normal_run = 0

    def observe(self, anomalous: bool) -> str | None:
        """Feed one window; returns the event state on a change (pending, firing, resolved)."""
        if anomalous:
            self.anomalous_run += 1
            self.normal_run = 0
        else:
            self.normal_run += 1
            self.anomalous_run = 0
        if self.state == "ok" and anomalous:
            self.state = "pending"
            if self.anomalous_run >= self.m:
                self.state = "firing"
                return "firing"
            return "pending"
        if self.state == "pending":
            if anomalous and self.anomalous_run >= self.m:
                self.state = "firing"
                return "firing"
            if not anomalous:
                self.state = "ok"  # never fired: nothing to resolve
        elif self.state == "firing" and not anomalous and self.normal_run >= self.r:
            self.state = "ok"
            return "resolved"
        return None


def _features(r: WindowResult, length_s: float) -> dict[str, float]:
    return {
        "latency_p50": math.log(max(r.p50, 1e-9)),
        "latency_p95": math.log(max(r.p95, 1e-9)),
        "latency_p99": math.log(max(r.p99, 1e-9)),
        "error_rate": r.errors / r.count if r.count else 0.0,
        "call_rate": r.count / length_s,
    }


def _noise(feature: str, expected: float, calls: int, length_s: float) -> float:
    """Sampling noise of a feature in one window (a floor for sigma)."""
    if feature == "call_rate" or feature == "error_log_rate":
        return math.sqrt(max(expected * length_s, 1.0)) / length_s
    if feature == "error_rate":
        p = min(max(expected, 0.01), 0.5)
        return math.sqrt(p * (1 - p) / max(calls, 1))
    return 0.05 + 0.5 / math.sqrt(max(calls, 1))  # log latency: ~5 % plus quantile noise


class KeyDetector:
    """Baselines, multivariate model and alert lifecycle of one key."""

    def __init__(self, cfg: AnomalyConfig, features: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.features = features
        self.baselines = {f: FeatureBaseline(cfg.fading_factor) for f in features}
        # HalfSpaceTrees cost ~10 ms and ~100 KB per key to build: only when the decision uses them.
        self.hst = (
            preprocessing.MinMaxScaler()
            | river_anomaly.HalfSpaceTrees(n_trees=10, height=6, window_size=cfg.hst_window, seed=cfg.seed)
            if cfg.detector != "band"
            else None
        )
        self.windows = 0
        self.lifecycle = AlertLifecycle(cfg.pending_windows, cfg.resolve_windows)

    @property
    def learning(self) -> bool:
        return self.windows < self.cfg.warmup_windows

    def judge(self, values: dict[str, float], calls: int, length_s: float) -> tuple[list[Judgement], float, bool]:
        """Score a window (before learning from it): judgements, HST score, anomalous?"""
        k = self.cfg.band_k
        judgements = []
        enough = calls >= self.cfg.min_calls
        for f in self.features:
            x = values[f]
            b = self.baselines[f]
            if not b.n:
                judgements.append(Judgement(f, x, math.nan, math.nan, math.nan, 0.0, False))
                continue
            expected, lo, hi = b.band(k, _noise(f, b.mean.get(), calls, length_s))
            sigma = (hi - expected) / k
            z = (x - expected) / sigma
            judged = not self.learning and (enough or f in ("call_rate", "error_log_rate"))
            judgements.append(Judgement(f, x, expected, lo, hi, z if judged else 0.0, judged))
        hst_score = self.hst.score_one(values) if (self.hst is not None and self.windows) else math.nan
        band_hit = any(_beyond(j, k) for j in judgements)
        hst_hit = not self.learning and not math.isnan(hst_score) and hst_score >= self.cfg.hst_threshold
        decision = {
            "band": band_hit,
            "hst": hst_hit,
            "band_and_hst": band_hit and hst_hit,
            "band_or_hst": band_hit or hst_hit,
        }[self.cfg.detector]
        return judgements, hst_score, decision

    def learn(self, values: dict[str, float], calls: int, length_s: float) -> None:
        enough = calls >= self.cfg.min_calls
        for f in self.features:
            if enough or f in ("call_rate", "error_log_rate"):
                b = self.baselines[f]
                b.learn(values[f], self.cfg.band_k, _noise(f, b.mean.get(), calls, length_s), not self.learning)
        if self.hst is not None:
            self.hst.learn_one(values)
        self.windows += 1


def _beyond(j: Judgement, k: float) -> bool:
    if not j.judged:
        return False
    return j.z > k if DIRECTION[j.feature] == UP else abs(j.z) > k


def _score(judgements, k: float) -> float:
    best = 0.0
    for j in judgements:
        if j.judged:
            best = max(best, (j.z if DIRECTION[j.feature] == UP else abs(j.z)) / k)
    return best


def _worst(judgements, k: float) -> Judgement:
    scored = [j for j in judgements if j.judged] or list(judgements)
    return max(scored, key=lambda j: (j.z if DIRECTION[j.feature] == UP else abs(j.z)))


@dataclass
class _RuleState:
    lifecycle: AlertLifecycle


@dataclass
class ServiceAnomaly:
    """All detectors and rules of one service. Feed it each closed ``ServiceWindow``."""

    cfg: AnomalyConfig
    service: str
    length_s: float
    keys: dict[tuple[str, int], KeyDetector] = field(default_factory=dict)
    rules: dict[tuple[str, str, int], _RuleState] = field(default_factory=dict)
    downstream: dict[str, dict[str, FeatureBaseline]] = field(default_factory=dict)

    def firing(self) -> bool:
        return any(d.lifecycle.state == "firing" for d in self.keys.values()) or any(
            r.lifecycle.state == "firing" for r in self.rules.values()
        )

    def on_window(self, sw: ServiceWindow) -> tuple[list[AnomalyUpdate], list[AlertEvent]]:
        updates: list[AnomalyUpdate] = []
        events: list[AlertEvent] = []
        k = self.cfg.band_k
        seen = set()
        scored: list[tuple[float, WindowResult, Judgement]] = []
        for r in sw.results:
            key = (r.operation, r.span_kind)
            seen.add(key)
            values = _features(r, self.length_s)
            upd, ev = self._judge_key(key, values, r.count, sw.window_start, r)
            updates.append(upd)
            events.extend(ev)
            scored.append((upd.score, r, _worst(upd.judgements, k)))
            events.extend(self._rules(key, values, sw.window_start, r))
        # Known keys without traffic in this window: their call rate is 0.
        for key in sorted(set(self.keys) - seen - {SERVICE_KEY}):
            values = {"latency_p50": math.nan, "latency_p95": math.nan, "latency_p99": math.nan,
                      "error_rate": 0.0, "call_rate": 0.0}  # fmt: skip
            upd, ev = self._judge_key(key, values, 0, sw.window_start, None)
            updates.append(upd)
            events.extend(ev)
        logs = {"error_log_rate": sw.error_logs / self.length_s}
        upd, ev = self._judge_key(SERVICE_KEY, logs, sw.logs, sw.window_start, None)
        updates.append(upd)
        events.extend(ev)
        events.extend(self._rules(SERVICE_KEY, logs, sw.window_start, None))
        ranking = _ranking(scored) + self._downstream(sw)
        events = [_with_ranking(e, ranking) if e.state == "firing" else e for e in events]
        return updates, events

    def _downstream(self, sw: ServiceWindow, top: int = 5) -> tuple[dict, ...]:
        """Services this one called (from joined traces), by how far their latency and errors
        as seen on these calls are above their own baselines."""
        k = self.cfg.band_k
        ranked = []
        for dep in sw.dependencies:
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

    def _judge_key(self, key, values, calls, time, r: WindowResult | None):
        det = self.keys.get(key)
        if det is None:
            feats = SERVICE_FEATURES if key == SERVICE_KEY else KEY_FEATURES
            det = self.keys[key] = KeyDetector(self.cfg, feats)
        if any(math.isnan(values.get(f, 0.0)) for f in det.features):
            values = {f: (v if not math.isnan(v) else det.baselines[f].mean.get()) for f, v in values.items()}
            judgements, hst, anomalous = det.judge(values, 0, self.length_s)
        else:
            judgements, hst, anomalous = det.judge(values, calls, self.length_s)
        learning = det.learning
        change = det.lifecycle.observe(anomalous)
        if not anomalous:  # never learn from a window judged anomalous
            det.learn(values, calls, self.length_s)
        score = _score(judgements, self.cfg.band_k)
        upd = AnomalyUpdate(self.service, key[0], key[1], time, score, hst, learning, det.lifecycle.state,
                            tuple(judgements))  # fmt: skip
        events = []
        if change:
            worst = _worst(judgements, self.cfg.band_k)
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
            "span_kind": _kind_name(r.span_kind),
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
