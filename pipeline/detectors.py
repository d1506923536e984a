"""Per-key detectors: learned baselines, the normal band and the alert lifecycle.

- ``FeatureBaseline``: an exponentially weighted mean and variance of one feature
  (river ``stats.EWMean``/``EWVar``), learned from normal windows only; the band is
  ``expected +- k * sigma``, sigma never below the window's sampling noise.
- ``KeyDetector``: the baselines of one key's features, its multivariate model
  (``MinMaxScaler | HalfSpaceTrees``, only when the configured decision uses it),
  warm-up, and its ``AlertLifecycle`` (pending -> firing -> resolved).
- The silence judgement of a service (``service_rate``): how unlikely ``n`` empty
  windows in a row are, as sums of the learned per-window rate and as Poisson counts.
- Rare error logs and the slow calls of rare operations are judged as exact probabilities
  (``pipeline/rare_events.py``), each key holding their state.

Plain, picklable Python with no clock and no bytewax; ``pipeline/anomaly.py`` holds
the detectors of one service. Configuration is bound (``bind``), never pickled.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from river import anomaly as river_anomaly
from river import preprocessing, stats

from pipeline.config import AnomalyConfig
from pipeline.model import Judgement, WindowResult
from pipeline.rare_events import RARE_BELOW, RARE_FEATURES, SLOW_CALLS, CallTail, RareCount, rare_upper

KEY_FEATURES = ("latency_p50", "latency_p95", "latency_p99", "error_rate", "call_rate")
SERVICE_FEATURES = ("service_rate", "error_log_rate")
UP, BOTH, DOWN = "up", "both", "down"
DIRECTION = {"latency_p50": UP, "latency_p95": UP, "latency_p99": UP, "error_rate": UP, "call_rate": BOTH,
             "error_log_rate": UP, "service_rate": DOWN, "slow_calls": UP}  # fmt: skip
# Alerts on these say how much traffic came, which is what scaling answers: they never hold a
# scale-down (a drop in traffic is when one is wanted). Silence does: no data is not "no load".
TRAFFIC_FEATURES = ("call_rate",)
RATE_FEATURES = ("call_rate", "error_log_rate", "service_rate")  # judged whatever the number of calls
TAIL_QUANTILES = {"latency_p95": 0.95, "latency_p99": 0.99}
METRIC_PREFIX = "metric:"  # features from OTLP metrics: "metric:<name>", on the service-level key
METRIC_NOISE = 0.25  # a metric's sigma is never below this share of its expected value
# ... and a utilization (OTel semantic conventions: "*.utilization", a fraction 0..1) never below
# this much: busy from 5 % to 10 % CPU is no incident, from 45 % to 85 % is.
UTILIZATION_NOISE = 0.05
_NORMAL = NormalDist()


def is_metric(feature: str) -> bool:
    return feature.startswith(METRIC_PREFIX)


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

    def refade(self, fading_factor: float) -> None:
        """Take another fading factor, keeping the learned mean and variance."""
        if self.mean.fading_factor != fading_factor:
            self._set(self.mean.get(), max(self.var.get(), 0.0), fading_factor)

    def _set(self, mean: float, var: float, f: float) -> None:
        """New river objects whose mean and variance are these (river's hold theirs inside:
        they are fed two values whose weighted mean and variance are those)."""
        self.mean, self.var = stats.EWMean(f), stats.EWVar(f)
        if self.n:
            first, second = (mean, mean) if f >= 1 else (
                mean - math.sqrt(var * f / (1 - f)), mean + math.sqrt(var * (1 - f) / f))
            for x in (first, second):
                self.mean.update(x)
                self.var.update(x)

    def learn(self, x: float, k: float, noise: float, warm: bool) -> None:
        if warm:  # after warm-up, values are clipped to the band: one outlier moves it little
            _, lo, hi = self.band(k, noise)
            x = min(max(x, lo), hi)
        f = self.mean.fading_factor
        if 0 < self.n < 1 / f - 1:
            # Until it has seen 1 / fading_factor values, the plain mean and variance of them (each
            # weighs 1 / n): weighted exponentially from the first value, the first would still
            # weigh 0.95 ** 11 = 57 % after 12 windows, and a key's first window is usually partial.
            mean, var = self.mean.get(), max(self.var.get(), 0.0)
            self.n += 1
            a = 1 / self.n
            self._set(mean + a * (x - mean), (1 - a) * (var + a * (x - mean) ** 2), f)
            return
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
        self.feature = ""  # what it went pending or fired on

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("feature", "")

    def observe(self, anomalous: bool, windows: int = 1) -> str | None:
        """Feed one window; returns the event state on a change (pending, firing, resolved).
        ``windows``: how many windows of evidence an anomalous one stands for (a metric point
        summarizes its whole export interval)."""
        if anomalous:
            self.anomalous_run += max(1, windows)
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


def _noise(feature: str, expected: float, calls: int, length_s: float, resolution_s: float = 0.0) -> float:
    """Sampling noise of a feature in one window (a floor for sigma). ``resolution_s``
    (``anomaly.latency_resolution_s``): latency changes smaller than this are timing noise of a
    real system (a context switch, a GC pause, a timer tick), so a sub-millisecond operation's
    band is at least +-k * ln(1 + resolution / expected) wide."""
    if is_metric(feature):  # resource metrics wander: a band at least +-k * 25 % wide
        floor = UTILIZATION_NOISE if feature.endswith(".utilization") else 0.0
        return max(METRIC_NOISE * abs(expected), floor)
    if feature in RATE_FEATURES:
        return math.sqrt(max(expected * length_s, 1.0)) / length_s
    if feature == "error_rate":
        p = min(max(expected, 0.01), 0.5)
        return math.sqrt(p * (1 - p) / max(calls, 1))
    # log latency: ~5 % plus quantile noise, and never finer than the timing resolution
    return max(0.05 + 0.5 / math.sqrt(max(calls, 1)), math.log1p(resolution_s / math.exp(min(expected, 50.0))))


class KeyDetector:
    """Baselines, multivariate model and alert lifecycle of one key.

    The configuration is not part of its state (``__getstate__`` leaves it out): after a
    restart ``bind`` gives it the configuration in force."""

    def __init__(self, cfg: AnomalyConfig, features: tuple[str, ...]) -> None:
        self.features = features
        self.baselines = {f: FeatureBaseline(cfg.fading_factor) for f in features}
        self.hst: Any = None  # river Pipeline (MinMaxScaler | HalfSpaceTrees) when the decision uses it
        self.windows = 0
        self.lifecycle = AlertLifecycle(cfg.pending_windows, cfg.resolve_windows)
        self.rare = {f: RareCount() for f in features if f in RARE_FEATURES}
        self.tail: CallTail | None = None  # per-call latencies, once a window brings buckets
        self.bind(cfg)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("rare", {f: RareCount() for f in self.features if f in RARE_FEATURES})
        self.__dict__.setdefault("tail", None)

    def bind(self, cfg: AnomalyConfig) -> None:
        self.cfg = cfg
        for b in self.baselines.values():
            b.refade(cfg.fading_factor)
        self.lifecycle.m, self.lifecycle.r = cfg.pending_windows, cfg.resolve_windows
        # HalfSpaceTrees cost ~10 ms and ~100 KB per key to build: only when the decision uses them.
        if cfg.detector == "band":
            self.hst = None
        elif self.hst is None:
            self.hst = preprocessing.MinMaxScaler() | river_anomaly.HalfSpaceTrees(
                n_trees=10, height=6, window_size=cfg.hst_window, seed=cfg.seed
            )

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "cfg"}

    def with_metrics(self, features: tuple[str, ...]) -> None:
        """Judge exactly these metric features (besides its own): new ones start learning,
        ones no longer configured are dropped."""
        base = tuple(f for f in self.features if not is_metric(f))
        for f in features:
            if f not in self.baselines:
                self.baselines[f] = FeatureBaseline(self.cfg.fading_factor)
        for f in [f for f in self.baselines if is_metric(f) and f not in features]:
            del self.baselines[f]
        self.features = base + features

    def _min_calls(self, f: str) -> int:
        """Calls a window needs before ``f`` is judged (and learned): ``anomaly.min_calls``, and
        for a tail quantile enough calls that 5 lie beyond it (p95: 100, p99: 500). With fewer,
        the "p99" is the window's maximum: one slow call, not a slow service."""
        tail = TAIL_QUANTILES.get(f)
        return max(self.cfg.min_calls, math.ceil(5 / (1 - tail))) if tail else self.cfg.min_calls

    def _noise(self, f: str, calls: int, length_s: float) -> float:
        return _noise(f, self.baselines[f].mean.get(), calls, length_s, self.cfg.latency_resolution_s)

    def _metric_ready(self, f: str) -> bool:
        return self.baselines[f].n >= self.cfg.metric_warmup_points

    @property
    def learning(self) -> bool:
        return self.windows < self.cfg.warmup_windows

    def judge(
        self, values: dict[str, float], calls: int, length_s: float, silent_run: int = 0,
        buckets: list[int] | None = None, bounds: tuple[float, ...] = (), rates: bool = True,
    ) -> tuple[list[Judgement], float, bool]:
        """Score a window (before learning from it): judgements, HST score, anomalous?
        ``buckets``: the window's calls per explicit bucket (``SLOW_CALLS``); judging them carries
        the key's run of slow windows on, so a window is judged once. ``rates`` False: the
        window was partly a gap in the input, its ``RATE_FEATURES`` are not judged."""
        k = self.cfg.band_k
        judgements = []
        for f in self.features:
            enough = calls >= self._min_calls(f)
            x = values.get(f, math.nan)
            b = self.baselines[f]
            if not b.n or math.isnan(x):
                judgements.append(Judgement(f, x, math.nan, math.nan, math.nan, 0.0, False))
                continue
            expected, lo, hi = b.band(k, self._noise(f, calls, length_s))
            sigma = (hi - expected) / k
            # A metric is judged once it has learned its own points (one per export interval).
            judged = self._metric_ready(f) if is_metric(f) else not self.learning and (enough or f in RATE_FEATURES)
            judged = judged and (rates or f not in RATE_FEATURES)
            if f == "service_rate" and silent_run > 0:
                sigma = _silence_sigma(expected, math.sqrt(max(b.var.get(), 0.0)), silent_run, length_s)
                lo = expected - k * sigma
            elif f == "service_rate":
                judged = False  # judged on silence only
            z = (x - expected) / sigma
            rare = self.rare.get(f)
            if rare is not None and rare.rate() < RARE_BELOW:
                expected, lo, z = rare.rate() / length_s, 0.0, rare.judge(x * length_s)
                hi = rare_upper(rare, k) / length_s
            elif rare is not None:
                rare.end_run()
            judgements.append(Judgement(f, x, expected, lo, hi, z if judged else 0.0, judged))
        tail = None
        if self.tail is not None and buckets is not None:
            # Windows of min_calls or more are judged on their quantiles; they end a run.
            if calls < self.cfg.min_calls:
                tail = self.tail.judge(buckets, k, bounds)
            else:
                self.tail.end_run()
        if tail is not None:
            z, past, expected, upper = tail
            judgements.append(Judgement(SLOW_CALLS, past, expected, 0.0, upper, 0.0 if self.learning else z,
                                        not self.learning))  # fmt: skip
        if self.hst is not None:
            values = {f: v for f, v in values.items() if not is_metric(f)}
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

    def learn(
        self, values: dict[str, float], calls: int, length_s: float, skip: tuple[str, ...] = (),
        buckets: list[int] | None = None,
    ) -> None:
        """Learn a window judged normal. Metric features are learned when ``values`` has them
        (their fresh points: a value held over from an earlier window is not learned again)."""
        if buckets is not None:
            if self.tail is None:
                self.tail = CallTail(len(buckets))
            self.tail.learn(buckets, length_s)
        for f in self.features:
            enough = calls >= self._min_calls(f)
            if is_metric(f):
                x = values.get(f, math.nan)
                if not math.isnan(x) and f not in skip:
                    b = self.baselines[f]
                    b.learn(x, self.cfg.band_k, self._noise(f, calls, length_s), self._metric_ready(f))
            elif (enough or f in RATE_FEATURES) and f not in skip:
                b = self.baselines[f]
                b.learn(values[f], self.cfg.band_k, self._noise(f, calls, length_s), not self.learning)
                if f in self.rare:
                    self.rare[f].learn(values[f] * length_s, length_s)
        if self.hst is not None:
            self.hst.learn_one({f: v for f, v in values.items() if not is_metric(f)})
        self.windows += 1

    def learn_feature(self, f: str, x: float, calls: int, length_s: float) -> None:
        """Learn one value of one feature (what a window skipped, learned later)."""
        b = self.baselines[f]
        b.learn(x, self.cfg.band_k, self._noise(f, calls, length_s), not self.learning)


def _silence_sigma(expected: float, sigma: float, n: int, length_s: float) -> float:
    """The spread that makes "nothing at all for ``n`` windows" as unlikely as it is, for a
    service whose rate has learned mean ``expected`` and spread ``sigma`` per window: the
    smaller of two z-scores, so both must find the silence unlikely. As sums of n windows
    (sigma * sqrt(n) around n * expected: bursty traffic is quiet for a while as a matter of
    course), and as Poisson counts (``exp(-expected * L * n)``: a sparse service's rare
    spans make long silences unlikely too, which a normal approximation underrates)."""
    if expected <= 0:
        return 1.0  # nothing was expected: silence is normal
    z_sums = expected * math.sqrt(n) / max(sigma, 1e-12)
    mu = min(expected * length_s * n, 700.0)  # expected spans in the silent run (exp(-700) ~ 1e-304)
    z_counts = -_NORMAL.inv_cdf(max(math.exp(-mu), 1e-300)) if mu > 0.01 else 0.0
    return expected / max(min(z_sums, z_counts), 1e-9)


def _strength(j: Judgement) -> float:
    """How far a judgement is beyond its band's centre in the direction its feature alarms
    (metrics: above it: CPU, memory, queue lengths hurt when they rise)."""
    d = DIRECTION.get(j.feature, UP)
    return j.z if d == UP else -j.z if d == DOWN else abs(j.z)


def _beyond(j: Judgement, k: float) -> bool:
    return j.judged and _strength(j) > k


def _score(judgements, k: float) -> float:
    best = 0.0
    for j in judgements:
        if j.judged:
            best = max(best, _strength(j) / k)
    return best


def _worst(judgements, k: float) -> Judgement:
    scored = [j for j in judgements if j.judged] or list(judgements)
    return max(scored, key=_strength)
