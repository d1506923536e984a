"""What the receiver checks before it accepts a request: token, memory, tenant rate.

Each guard is small and takes its clock, so tests drive time.
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
    """Token bucket per tenant (by a gRPC metadata key), with tiers from config."""

    def __init__(self, cfg: LimitsConfig, clock=time.monotonic) -> None:
        self.key = cfg.tenant_metadata_key
        self.tiers = {t.name: t for t in cfg.tiers}
        self.tenant_tier = {t.name: t.tier for t in cfg.tenants}
        self.default = cfg.default_tier
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
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
            bucket = self.buckets.get(tenant)
            if bucket is None:
                bucket = self.buckets[tenant] = TokenBucket(tier.spans_per_s, tier.burst, now)
            return bucket.take(spans, now)
