"""Database calls in traces: statements counted, slow queries, N+1.

Spans that carry the OTel semantic conventions for databases (``db.system.name`` or the
older ``db.system``; ``db.query.text`` or the older ``db.statement``; ``db.operation.name``)
are database calls. For each:

- its statement is normalized (``pipeline/db_statements.py``: literals, numbers and IN-lists
  become ``?``, at most ``db.max_statement_chars``) and counted per (service, database system,
  statement), with a duration histogram: ``DbCalls`` items, which ``/metrics`` adds up as
  ``telepipe_db_calls_total`` and ``telepipe_db_duration_seconds``. A span without query text
  is counted under its ``db.operation.name``. At most ``db.max_statements_per_service``
  distinct statements are counted per service; more go to ``__overflow__``.
- one that took ``db.slow_query_s`` or more is a slow query: a ``Finding`` with its trace id.
- N+1 (Sentry's rule): under one parent span, ``db.n_plus_one_min_repeats`` or more consecutive
  CLIENT database spans (in start order) with the same statement, together at least
  ``db.n_plus_one_min_total_s`` long: a ``Finding`` naming the parent's operation.

Runs where spans are read, next to the service-graph join (``pipeline/steps.py``): per
source partition and in read order, so the output depends on the input alone. Children wait
for their parent (it ends after them, so it usually comes in the same batch or a later one)
for ``ttl_ns`` of event time, at most ``MAX_WAITING`` parents at once; a parent that does not
come in time (not instrumented, or read by another partition: in a cluster each process
reads what its own receiver took, so a trace's spans from one SDK stay together) is judged
all the same, its operation named ``""``. Counts are weighted by sampling (``SpanBatch.weight``).
Plain, picklable Python; no clock, no bytewax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import DbConfig
from pipeline.db_statements import normalize
from pipeline.model import KIND_CLIENT, SpanBatch

OVERFLOW_STATEMENT = "__overflow__"
MAX_WAITING = 50_000  # parents awaited at once; beyond, their children are judged at once
MAX_CACHE = 20_000  # raw statement -> normalized, cleared when full
STATE_VERSION = 1


@dataclass(frozen=True)
class DbCalls:
    """Database calls of one (service, system, statement) in one batch."""

    service: str
    db_system: str
    statement: str
    calls: int  # weighted by sampling
    bucket_counts: tuple[int, ...]  # per explicit bucket (+Inf last), weighted
    sum_s: float
    time: int  # the newest end among them, unix ns


@dataclass(frozen=True)
class Finding:
    """A slow query or an N+1 pattern, with the trace that shows it."""

    kind: str  # "slow_query" or "n_plus_one"
    service: str
    operation: str  # N+1: the parent span's name ("" when it never came); slow query: the span's own
    db_system: str
    statement: str
    repeats: int  # N+1: the consecutive calls; slow query: 1
    duration_s: float  # their total
    trace_id: str
    time: int  # end of the (last) database span, unix ns

    def to_json(self) -> dict:
        return {
            "type": "finding", "finding": self.kind, "service": self.service, "operation": self.operation,
            "db_system": self.db_system, "db_statement": self.statement, "repeats": self.repeats,
            "duration_s": round(self.duration_s, 9), "trace_id": self.trace_id, "time": self.time,
        }  # fmt: skip


class DbAnalyzer:
    """Database calls of the span batches of one source partition. Picklable."""

    def __init__(self, cfg: DbConfig, bounds: tuple[float, ...], ttl_ns: int) -> None:
        self.statements: dict[str, dict[str, None]] = {}  # service -> statements counted (bounded)
        self.cache: dict[str, str] = {}
        # parent span id -> (newest child end, children: (start, statement, duration s, end, service,
        # system, trace id hex)), in arrival order
        self.waiting: dict[bytes, tuple[int, list[tuple]]] = {}
        self.bind(cfg, bounds, ttl_ns)

    def bind(self, cfg: DbConfig, bounds: tuple[float, ...], ttl_ns: int) -> None:
        """The configuration in force (after a restart from a snapshot: not pickled)."""
        self.cfg, self.bounds, self.ttl_ns = cfg, np.asarray(bounds, dtype=np.float64), ttl_ns

    def __getstate__(self) -> dict:
        return {"statements": self.statements, "waiting": self.waiting, "version": STATE_VERSION}

    def __setstate__(self, state: dict) -> None:
        self.statements, self.waiting, self.cache = state["statements"], state["waiting"], {}

    def process(self, batch: SpanBatch) -> list[DbCalls | Finding]:
        out: list[DbCalls | Finding] = []
        text = batch.attribute("db.query.text", "db.statement", "db.operation.name")
        system = batch.attribute("db.system.name", "db.system")
        if text is not None and system is not None:
            rows = np.flatnonzero((text >= 0) | (system >= 0))
            if rows.size:
                out.extend(self._calls(batch, rows, text, system))
        if self.waiting and len(batch):
            out.extend(self._parents_arrived(batch))
        if self.waiting and len(batch):
            out.extend(self._expire(batch.last_end_ns() - self.ttl_ns))
        return out

    # ---------------------------------------------------------------- counting, slow queries

    def _statement(self, raw: str) -> str:
        found = self.cache.get(raw)
        if found is None:
            if len(self.cache) >= MAX_CACHE:
                self.cache.clear()
            found = self.cache[raw] = normalize(raw, self.cfg.max_statement_chars)
        return found

    def _bounded(self, service: str, statement: str) -> str:
        seen = self.statements.setdefault(service, {})
        if statement in seen:
            return statement
        if len(seen) >= self.cfg.max_statements_per_service:
            return OVERFLOW_STATEMENT
        seen[statement] = None
        return statement

    def _calls(self, batch: SpanBatch, rows: np.ndarray, text: np.ndarray, system: np.ndarray) -> list:
        values = batch.attr_values
        services = [batch.services[i] for i in batch.service_idx[rows].tolist()]
        systems = [values[i] if i >= 0 else "" for i in system[rows].tolist()]
        statements = [self._bounded(svc, self._statement(values[i])) if i >= 0 else ""
                      for svc, i in zip(services, text[rows].tolist(), strict=True)]  # fmt: skip
        dur = batch.duration_ns[rows] / 1e9
        weight = batch.weights()[rows]
        end = batch.end_ns[rows]
        bucket = np.searchsorted(self.bounds, dur, side="left")
        groups: dict[tuple[str, str, str], list[int]] = {}
        for j, key in enumerate(zip(services, systems, statements, strict=True)):
            groups.setdefault(key, []).append(j)
        nb = self.bounds.size + 1
        out: list = []
        for (service, db_system, statement), members in groups.items():
            m = np.asarray(members)
            w = weight[m].astype(np.int64)
            counts = np.bincount(bucket[m], weights=w, minlength=nb).astype(np.int64)
            out.append(DbCalls(service, db_system, statement, int(w.sum()), tuple(counts.tolist()),
                               float((dur[m] * w).sum()), int(end[m].max())))  # fmt: skip
        slow = np.flatnonzero(dur >= self.cfg.slow_query_s)
        names = batch.operations
        for j in slow.tolist():
            r = int(rows[j])
            out.append(Finding("slow_query", services[j], names[int(batch.op_idx[r])], systems[j], statements[j], 1,
                               float(dur[j]), _trace_hex(batch, r), int(end[j])))  # fmt: skip
        out.extend(self._wait(batch, rows, services, systems, statements, dur))
        return out

    # ---------------------------------------------------------------- N+1

    def _wait(self, batch: SpanBatch, rows: np.ndarray, services, systems, statements, dur) -> list[Finding]:
        """CLIENT database spans with a parent wait for it, grouped by parent span id; beyond
        ``MAX_WAITING`` parents, the longest-waiting one is judged at once, without its name."""
        kinds = batch.kind[rows]
        for j in np.flatnonzero(kinds == KIND_CLIENT).tolist():
            r = int(rows[j])
            parent = batch.parent_span_id[r : r + 1].tobytes()  # all 8 bytes: numpy's scalar drops trailing zeros
            if not parent.strip(b"\0"):
                continue
            end = int(batch.end_ns[r])
            child = (end - int(batch.duration_ns[r]), statements[j], float(dur[j]), end, services[j], systems[j],
                     _trace_hex(batch, r))  # fmt: skip
            newest, children = self.waiting.get(parent, (end, []))
            children.append(child)
            self.waiting[parent] = (max(newest, end), children)
        out: list[Finding] = []
        while len(self.waiting) > MAX_WAITING:
            out.extend(self._judge(self.waiting.pop(next(iter(self.waiting)))[1], ""))
        return out

    def _parents_arrived(self, batch: SpanBatch) -> list[Finding]:
        ids = batch.span_id
        keys = np.frombuffer(b"".join(self.waiting), dtype="S8") if self.waiting else np.zeros(0, "S8")
        hit = np.flatnonzero(np.isin(ids, keys))
        out: list[Finding] = []
        for r in hit.tolist():
            entry = self.waiting.pop(ids[r : r + 1].tobytes(), None)
            if entry is not None:
                out.extend(self._judge(entry[1], batch.operations[int(batch.op_idx[r])]))
        return out

    def _expire(self, horizon: int) -> list[Finding]:
        out: list[Finding] = []
        for parent in [p for p, (newest, _) in self.waiting.items() if newest < horizon]:
            out.extend(self._judge(self.waiting.pop(parent)[1], ""))
        return out

    def _judge(self, children: list[tuple], operation: str) -> list[Finding]:
        """Runs of consecutive children (in start order) with the same statement."""
        children = sorted(children, key=lambda c: (c[0], c[3]))
        out = []
        i = 0
        while i < len(children):
            k = i
            while k + 1 < len(children) and children[k + 1][1] == children[i][1]:
                k += 1
            run = children[i : k + 1]
            total = sum(c[2] for c in run)
            repeated = len(run) >= self.cfg.n_plus_one_min_repeats
            if children[i][1] and repeated and total >= self.cfg.n_plus_one_min_total_s:
                first = run[0]
                out.append(Finding("n_plus_one", first[4], operation, first[5], first[1], len(run), total, first[6],
                                   max(c[3] for c in run)))  # fmt: skip
            i = k + 1
        return out


def _trace_hex(batch: SpanBatch, row: int) -> str:
    """A span's trace id in hex, all 16 bytes (numpy's bytes scalar drops trailing zero bytes)."""
    return batch.trace_id[row : row + 1].tobytes().hex()

