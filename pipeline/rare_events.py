"""Evidence judged as exact probabilities, where a band cannot weigh it.

- ``RareCount``: a count of rare events (a service's error logs) as (quasi-)Poisson counts,
  its rate learned over hours, not the fading factor's 20 windows.
- ``CallTail``: the slow calls of rare operations (windows of fewer than ``min_calls`` calls, where
  no quantile is), as a binomial tail over a run of windows.
- ``at_once_z``: how unlikely one window must be to stand for the ``pending_windows`` in a row an
  alert waits for (only for Poisson counts: ``counted``).

Plain, picklable Python; ``pipeline/detectors.py`` holds them per key.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from pipeline.model import Judgement

_NORMAL = NormalDist()
# Counts judged as (quasi-)Poisson while rare: a service that logged no error for an hour and logs
# four in ten seconds is as unlikely as it looks, which a band whose noise floor is one count a
# window cannot say. Their rate is learned over RARE_HORIZON_S (a rate of rare events needs
# exposure; the fading factor's 20 windows would see none), mean and variance of the counts;
# six hours, as long as a service's silences are remembered (``anomaly.QUIET_HALF_LIFE_S``).
RARE_FEATURES = ("error_log_rate",)
RARE_HORIZON_S = 6 * 3600.0
RARE_BELOW = 1.0  # expected counts a window below which the Poisson judgement is used
RUN_WINDOWS = 6  # a rare count's run is its last windows in a row above the rate, this many at most,
RUN_LEARNED = 30  # ... once this many windows are learned (a service logging 1 a window from its start
# would otherwise run forever on the prior's rate, its windows held and never learned)
SLOW_CALLS = "slow_calls"  # calls slower than usual, judged on windows of fewer than min_calls calls
TAIL_SHARE = 0.01  # slow: past a bound that at most 1 in 100 learned calls passed,
TAIL_CALLS = 5  # ... judged once the run has this many calls past the bound (as a tail quantile)
SLOW_FACTOR = 4.0  # ... and at least 4 times the learned median: not a blip of a fast operation


class RareCount:
    """Long-horizon rate of a count per window: exponentially decayed sums of windows, counts
    and squared counts; the rate has half a count of prior (a never-seen event is not
    impossible), the dispersion (variance / mean, at least 1) scales the Poisson model. A window
    is judged with the run of windows in a row above the rate that it ends (``judge``): two
    errors a window for four windows from a service that logs one an hour are as unlikely as
    eight in one. The run is its last ``RUN_WINDOWS`` windows at most, learned as they leave it or
    when it ends, so the rate does not rise under it, nor stay under a level that lasts."""

    run = (0.0, 0)  # counts and windows of the run (class defaults: snapshots of older versions)
    recent: tuple[float, ...] = ()  # the run's counts, the newest last
    held: tuple[tuple[float, float], ...] = ()  # the run's windows judged normal: (count, length_s)

    def __init__(self) -> None:
        self.n = 0.0
        self.total = 0.0
        self.squares = 0.0

    def judge(self, count: float) -> float:
        """z of this window's count with the run of windows above the rate it belongs to (0, and
        the run over, when it is not above)."""
        if count <= self.rate() or self.n < RUN_LEARNED:
            self.end_run()
            return self.z(count)
        self.recent = (*self.recent, count)[-RUN_WINDOWS:]
        self.run = (sum(self.recent), len(self.recent))
        return self.z(*self.run)

    def end_run(self) -> None:
        self.run, self.recent = (0.0, 0), ()

    def learn(self, count: float, length_s: float) -> None:
        if self.run[1]:  # held while in the run; the oldest learned once it has left the run
            self.held = (*self.held, (count, length_s))
            if len(self.held) < RUN_WINDOWS:
                return
            (count, length_s), self.held = self.held[0], self.held[1:]
        else:
            for c, length in self.held:
                self._learn(c, length)
            self.held = ()
        self._learn(count, length_s)

    def _learn(self, count: float, length_s: float) -> None:
        keep = 1.0 - min(length_s / RARE_HORIZON_S, 1.0)
        self.n = self.n * keep + 1.0
        self.total = self.total * keep + count
        self.squares = self.squares * keep + count * count

    def rate(self) -> float:
        """Expected count a window."""
        return (self.total + 0.5) / (self.n + 1.0)

    def dispersion(self) -> float:
        if self.n < 2 or self.total <= 0:
            return 1.0
        mean = self.total / self.n
        return max(1.0, (self.squares / self.n - mean * mean) / mean)

    def z(self, count: float, windows: int = 1) -> float:
        """How unlikely ``count`` or more in ``windows`` windows is, as a one-sided z (0 at or
        below the rate)."""
        d = self.dispersion()
        lam, k = self.rate() * windows / d, math.floor(count / d + 1e-9)
        if k <= lam:
            return 0.0
        return -_NORMAL.inv_cdf(max(_poisson_tail(k, lam), 1e-300))


class CallTail:
    """How slow one key's calls usually are: a long-horizon (``RARE_HORIZON_S``) histogram of
    its calls over the explicit buckets, learned from normal windows. Windows of few calls are
    judged (``SLOW_CALLS``) by how many calls are past the first bucket bound that at most
    ``TAIL_SHARE`` of the learned calls passed, counted over the run of windows in a row that
    had more past it than expected (a rare operation's few calls a window hold little
    evidence; its run holds more): a binomial tail, an exact probability. An operation slow by
    request (two modes) learned its slow mode, and the bound lies beyond it."""

    windows = 0  # windows in the run so far (a class default for snapshots of older versions)

    def __init__(self, buckets: int) -> None:
        self.counts = [0.0] * buckets
        self.total = 0.0
        self.run = (0, 0, -1)  # calls past the bound, calls, the bound's index: the run so far
        self.held: list[int] = []  # the run's windows judged normal: learned when the run ends

    def learn(self, window: list[int], length_s: float) -> None:
        if len(window) != len(self.counts):  # the buckets were reconfigured: start again
            self.counts, self.total, self.held = [0.0] * len(window), 0.0, []
        if self.run[1]:  # in a run of slow windows: the bound stays where it was until it ends
            self.held = [a + b for a, b in zip(self.held, window)] if self.held else list(window)
            return
        if self.held:
            window, self.held = [a + b for a, b in zip(self.held, window)], []
        keep = 1.0 - min(length_s / RARE_HORIZON_S, 1.0)
        self.counts = [c * keep + w for c, w in zip(self.counts, window)]
        self.total = self.total * keep + sum(window)

    def bound(self, bounds: tuple[float, ...]) -> tuple[int, float]:
        """The first bucket bound (index) at most ``TAIL_SHARE`` of the learned calls passed and
        at least ``SLOW_FACTOR`` times the learned median (the upper edge of its bucket), and
        that share (half a call of prior); (-1, 1.0) while too few calls are learned."""
        if len(bounds) != len(self.counts) - 1:
            return -1, 1.0
        above, median = self.total, math.inf
        for i, c in enumerate(self.counts[:-1]):
            above -= c
            if median == math.inf and above <= self.total / 2:
                median = bounds[i]
            p = (max(above, 0.0) + 0.5) / (self.total + 1.0)
            if p <= TAIL_SHARE and bounds[i] >= SLOW_FACTOR * median:
                return i, p
        return -1, 1.0

    def end_run(self) -> None:
        self.run = (0, 0, self.run[2])
        self.windows = 0

    def judge(self, window: list[int], k: float, bounds: tuple[float, ...]) -> tuple[float, float, float, float] | None:
        """Judge a window and carry the run on: (z, calls past the bound in the run, calls
        expected past it, the most past it within ``k``), or None when not judged."""
        i, p = self.bound(bounds)
        if i < 0 or len(window) != len(self.counts):
            self.run, self.windows = (0, 0, -1), 0
            return None
        past, n = sum(window[i + 1:]), sum(window)
        if past <= n * p:  # not slower than usual: a run ends here
            self.run, self.windows = (0, 0, i), 0
            return 0.0, float(past), n * p, float(_binomial_upper(n, p, k))
        run_past, run_n, run_i = self.run if self.run[2] == i else (0, 0, i)
        self.windows = self.windows + 1 if self.run[2] == i and run_n else 1
        past, n = past + run_past, n + run_n
        self.run = (past, n, i)
        if past < TAIL_CALLS:
            return 0.0, float(past), n * p, float(_binomial_upper(n, p, k))
        z = -_NORMAL.inv_cdf(min(max(_binomial_tail(past, n, p), 1e-300), 0.5))
        return z, float(past), n * p, float(_binomial_upper(n, p, k))


def _binomial_upper(n: int, p: float, k: float) -> int:
    """The most of ``n`` calls that may be past the bound with the tail not beyond ``k``."""
    alpha = 1.0 - _NORMAL.cdf(k)
    m = n
    while m > 0 and _binomial_tail(m, n, p) < alpha:
        m -= 1
    return m


def _binomial_tail(m: int, n: int, p: float) -> float:
    """P(X >= m) for X ~ Binomial(n, p)."""
    if m <= 0:
        return 1.0
    lp, lq, total = math.log(p), math.log1p(-p), 0.0
    for j in range(m, n + 1):
        term = math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq)
        total += term
        if term < total * 1e-12:
            break
    return min(total, 1.0)


def _poisson_tail(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam), summed from k upward (no cancellation when it is tiny)."""
    term = math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))
    total, i = 0.0, k
    while term > total * 1e-12 and i < k + 1000:
        total += term
        i += 1
        term *= lam / i
    return min(total, 0.5)


def counted(j: Judgement, length_s: float) -> bool:
    """Was this judgement made on Poisson counts (a rare count, below ``RARE_BELOW`` a window)?
    Not ``SLOW_CALLS``: its binomial takes calls as independent, but slow calls come together
    (one slow request, one slow moment of a database), so its run needs two windows like the
    band (tried at once: a 20 s database slowdown in a TrainTicket recording fired)."""
    return j.feature in RARE_FEATURES and j.expected * length_s < RARE_BELOW


def at_once_z(k: float, pending_windows: int) -> float:
    """The z one window needs to stand for ``pending_windows`` windows beyond ``k``: its
    one-sided p-value is that of the whole run (p(k) ** pending_windows). At the defaults (k 4,
    2 windows) 6.0: an alert on evidence that strong fires when it comes, not a window later,
    and so at the same false-alarm rate as the run."""
    p = (1.0 - _NORMAL.cdf(k)) ** max(pending_windows, 1)
    return -_NORMAL.inv_cdf(max(p, 1e-300))


def rare_upper(rare: RareCount, k: float) -> float:
    """The largest count a window may hold and not be beyond the band (for the alert's bounds)."""
    c = math.floor(rare.rate())
    while c < 10_000 and rare.z(c + 1) <= k:
        c += 1
    return float(c)
