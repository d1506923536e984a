"""What the receiver checks before it accepts a request: token, memory, tenant rate.

Each guard is small and takes its clock, so tests drive time. The tenant limiter's
table is keyed by a name the client chooses, so it is kept bounded (see ``TenantLimiter``).
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pipeline.config import AuthConfig, LimitsConfig

SWEEP_INTERVAL_S = 1.0  # refilled tenant buckets are looked for at most this often (a scan of the table)


class BearerAuth:
    """Constant-time check of ``authorization: Bearer <token>`` against the configured tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = [t.encode() for t in tokens if t]

    @staticmethod
    def from_config(cfg: AuthConfig) -> BearerAuth | None:
        tokens: list[str] = []
        if cfg.tokens_file:
            tokens += [line.strip() for line in Path(cfg.tokens_file).read_text().splitlines() if line.strip()]
        if cfg.tokens_env:
            tokens += [t.strip() for t in os.environ.get(cfg.tokens_env, "").split(",") if t.strip()]
        if (cfg.tokens_file or cfg.tokens_env) and not tokens:
            raise ValueError("auth is configured but no token was found (tokens_file / tokens_env)")
        return BearerAuth(tokens) if tokens else None

    def allows(self, metadata: tuple) -> bool:
        header = next((v for k, v in metadata if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        ok = False
        for t in self.tokens:  # compare with every token: timing does not say which one matched
            ok |= hmac.compare_digest(given, t)
        return ok


class MemoryGuard:
    """True while the process's resident memory is over the limit (read at most every 0.25 s)."""

    def __init__(self, limit_bytes: int, rss: Callable[[], int] | None = None, clock=time.monotonic) -> None:
        self.limit = limit_bytes
        if rss is None:
            proc = psutil.Process()
            rss = lambda: proc.memory_info().rss  # noqa: E731
        self.rss = rss
        self.clock = clock
        self._next = 0.0
        self._over = False

    def over(self) -> bool:
        if not self.limit:
            return False
        now = self.clock()
        if now >= self._next:
            self._next = now + 0.25
            self._over = self.rss() > self.limit
        return self._over


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, max(burst, rate)
        self.tokens, self.t = self.burst, now

    def full(self, now: float) -> bool:
        """True once it has refilled: from ``now`` on it answers exactly as a new bucket would.

        Same arithmetic as ``take``, so ``take`` would compute exactly ``burst`` tokens too.
        """
        return self.tokens + (now - self.t) * self.rate >= self.burst

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens; returns 0 on success, else seconds until they would be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        if n > self.burst:  # a request larger than the burst can never fit: let it through alone
            if self.tokens >= self.burst:
                self.tokens = 0.0
                return 0.0
            return (self.burst - self.tokens) / self.rate
        return (n - self.tokens) / self.rate


class TenantLimiter:
    """Token bucket per tenant (by a gRPC metadata key), with tiers from config.

    Tenant names come from the client, which can mint any number of them, so the
    table of buckets stays bounded:

    - A bucket that has refilled is dropped. A full bucket is exactly what a new
      one would be, so this changes no answer: a tenant that comes back gets its
      full burst either way. ``wait_for`` sweeps at most every ``SWEEP_INTERVAL_S``
      (of the injected clock), under the lock; a sweep scans the whole table.
    - At most ``cfg.max_tenants`` buckets exist at once. A new tenant beyond that
      shares one overflow bucket of its tier with every other such tenant of that
      tier, until a sweep has dropped refilled buckets and made room. Overflow is
      per tier, so tenants minting names (all on the default tier) never eat into
      the rate of listed tenants on other tiers.
    """

    def __init__(self, cfg: LimitsConfig, clock=time.monotonic) -> None:
        self.key = cfg.tenant_metadata_key
        self.tiers = {t.name: t for t in cfg.tiers}
        self.tenant_tier = {t.name: t.tier for t in cfg.tenants}
        self.default = cfg.default_tier
        self.max_tenants = cfg.max_tenants
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}  # at most max_tenants
        self.overflow: dict[str, TokenBucket] = {}  # tier name -> bucket shared by tenants beyond max_tenants
        self.next_sweep = 0.0
        self.lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.tiers)

    def tenant(self, metadata: tuple) -> str:
        value = next((v for k, v in metadata if k == self.key), "")
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    def wait_for(self, tenant: str, spans: int) -> float:
        """0 when the tenant may send ``spans`` now, else seconds to wait."""
        tier = self.tiers.get(self.tenant_tier.get(tenant, self.default))
        if tier is None or spans <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            if now >= self.next_sweep:
                self._sweep(now)
            bucket = self.buckets.get(tenant)
            if bucket is None:
                if len(self.buckets) < self.max_tenants:
                    bucket = self.buckets[tenant] = TokenBucket(tier.spans_per_s, tier.burst, now)
                else:
                    bucket = self.overflow.get(tier.name)
                    if bucket is None:
                        bucket = self.overflow[tier.name] = TokenBucket(tier.spans_per_s, tier.burst, now)
            return bucket.take(spans, now)

    def _sweep(self, now: float) -> None:
        """Drop every bucket that has refilled (called with the lock held)."""
        self.next_sweep = now + SWEEP_INTERVAL_S
        # New dicts rather than deletes: a dict's table never shrinks, so after a burst
        # of tenants the memory would stay.
        self.buckets = {name: b for name, b in self.buckets.items() if not b.full(now)}
        self.overflow = {name: b for name, b in self.overflow.items() if not b.full(now)}
