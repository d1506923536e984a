"""Incidents: alerts on linked services grouped into one, with ranked root-cause candidates.

``IncidentTracker`` (one for the whole flow, a single key) is fed every service's
``ServiceSummary`` per closed window. Services' windows close at different moments
(each service has its own watermark, and items of several workers interleave), so
summaries are buffered by window and windows are taken in order, the services of a
window together, in name order:

- in replay (``hold``), all at the end of the input: what comes out then depends on
  the input alone, whatever the speed or the number of workers (summaries are small:
  a replay of a day of 100 services holds a few hundred MB at most);
- live, a window once every service heard from in the last ``ALIVE_S`` has summarized
  it (a service summarizes every window while it is known: silent ones close empty on
  the clock), or after an idle timeout (``flush``); a summary for a window already
  taken is too late and left out (``late``).

- **Graph.** Who calls whom comes from the summaries' callees (the service-graph
  join); an edge not seen for ``EDGE_TTL_S`` is forgotten.
- **Grouping.** A service whose alert fires joins an open incident that has a service
  linked to it (caller or callee, up to ``LINK_HOPS`` calls apart) and was active in
  the last ``JOIN_S``; otherwise it opens one. An incident resolves once none of its
  services has had a pending or firing alert for ``RESOLVE_WINDOWS`` windows.
- **Root causes.** Candidates are the incident's services and everything they call
  (transitively) that shows anomalies of its own in the last ``EVIDENCE_S``: SERVER,
  INTERNAL or CONSUMER latency and errors, error logs, resource metrics, silence.
  Anomalous CLIENT calls point at their callee (its latency and errors as seen by the
  callers, from the join), adding to the callee's score. A candidate whose anomaly is
  explained by a callee that is itself anomalous and called anomalously (a slow callee
  makes its callers slow) is ranked below it: the deepest anomalous service comes
  first. Each candidate says why (``evidence``).

Plain, picklable state: no clock, no bytewax (``pipeline/steps.py`` wraps it).
"""

from __future__ import annotations

from collections import deque

from pipeline.detectors import TRAFFIC_FEATURES
from pipeline.incident_model import Evidence, IncidentEvent, ServiceSummary

ALIVE_S = 3600.0  # live: a service not heard from for this long holds no window back
EDGE_TTL_S = 3600.0
LINK_HOPS = 2
JOIN_S = 120.0
EVIDENCE_S = 60.0
RESOLVE_WINDOWS = 3
TOP = 5
OWN = ("server", "internal", "consumer", "service")
EXPLAINED = 0.3  # a candidate explained by an anomalous callee keeps this share of its score
CALLER_WEIGHT = 0.5  # what anomalous calls from callers add to a callee's score (each capped)
CAP = 5.0  # one piece of evidence counts at most this much (scores are |z| / k)
MAX_OPERATIONS = 100_000  # SERVER operation names known (to name the callee of CLIENT calls)
WEIGHT = {"server": 1.0, "service": 1.0, "consumer": 1.0, "internal": 0.5}  # INTERNAL: often traffic mix
# How much traffic a service gets (or sends) changes more often as the effect of a fault elsewhere
# (callers retrying, failing early, a hole upstream) than as the fault: its evidence weighs this.
TRAFFIC_WEIGHT = 0.3


class _Incident:
    def __init__(self, id_: str, service: str, t: int) -> None:
        self.id = id_
        self.services: list[str] = [service]
        self.last_active = t
        self.quiet = 0  # windows in a row with none of its services pending or firing
        self.root_causes: tuple[dict, ...] = ()


class IncidentTracker:
    def __init__(self, length_ns: int, hold: bool = False) -> None:
        self.length_ns = length_ns
        self.hold = hold
        self.buffer: dict[int, dict[str, ServiceSummary]] = {}
        self.latest: dict[str, int] = {}  # service -> its newest window summarized
        self.late = 0  # summaries for windows already taken (live only)
        self.taken_until = -1  # windows up to here were taken; later summaries for them are dropped
        self.edges: dict[str, dict[str, int]] = {}  # caller -> callee -> last window seen
        self.recent: dict[str, deque[ServiceSummary]] = {}  # per service, summaries of the last EVIDENCE_S
        self.states: dict[str, str] = {}  # service -> alert state in its latest window
        self.open: list[_Incident] = []
        self.server_ops: dict[str, set[str]] = {}  # SERVER operation name -> services that serve it

    def on_summary(self, s: ServiceSummary) -> list[IncidentEvent]:
        self.latest[s.service] = max(self.latest.get(s.service, s.window_start), s.window_start)
        if s.window_start <= self.taken_until:
            self.late += 1  # its window was already taken (a service just heard of): nothing to add
            return []
        self.buffer.setdefault(s.window_start, {})[s.service] = s
        if self.hold:
            return []
        newest = max(self.latest.values())
        alive = [w for w in self.latest.values() if w >= newest - int(ALIVE_S * 1e9)]
        ready = sorted(w for w in self.buffer if w <= min(alive))
        return [e for w in ready for e in self._take(w)]

    def forget(self, service: str) -> list[IncidentEvent]:
        """The service was forgotten (no data for prometheus.service_stale_after_s): it holds nothing back."""
        self.latest.pop(service, None)
        if self.hold:  # replay: taken in order at the end; forgetting now would depend on arrival order
            return []
        self.states.pop(service, None)
        for op in [op for op, names in self.server_ops.items() if service in names]:
            self.server_ops[op].discard(service)
            if not self.server_ops[op]:
                del self.server_ops[op]
        return self.on_idle_check() if self.latest else []

    def on_idle_check(self) -> list[IncidentEvent]:
        bound = min(self.latest.values())
        return [e for w in sorted(self.buffer) if w <= bound for e in self._take(w)]

    def flush(self) -> list[IncidentEvent]:
        return [e for w in sorted(self.buffer) for e in self._take(w)]

    # -- one window
    def _take(self, w: int) -> list[IncidentEvent]:
        summaries = self.buffer.pop(w)
        self.taken_until = max(self.taken_until, w)
        horizon = w - int(EVIDENCE_S * 1e9)
        for name in sorted(summaries):
            s = summaries[name]
            self.states[name] = s.state
            for op in map(op_key, s.server_ops):
                if len(self.server_ops) < MAX_OPERATIONS or op in self.server_ops:
                    self.server_ops.setdefault(op, set()).add(name)
            for callee in s.callees:
                self.edges.setdefault(name, {})[callee] = w
            q = self.recent.setdefault(name, deque())
            q.append(s)
        for name in list(self.recent):
            q = self.recent[name]
            while q and q[0].window_start < horizon:
                q.popleft()
            if not q:
                del self.recent[name]  # services come and go: nothing is kept for one gone quiet
        self._forget_edges(w)
        events: list[IncidentEvent] = []
        changed: dict[str, str] = {}  # incident id -> "opened" | "updated"
        for name in sorted(n for n, s in summaries.items() if s.state == "firing"):
            if any(name in inc.services for inc in self.open):
                continue
            inc = self._linked(name, w)
            if inc is None:
                inc = _Incident(f"{w // 10**9}-{name}", name, w)
                self.open.append(inc)
                changed[inc.id] = "opened"
            else:
                inc.services.append(name)
                changed.setdefault(inc.id, "updated")
            inc.last_active = w
        for inc in list(self.open):
            active = any(self.states.get(s) in ("pending", "firing") for s in inc.services)
            if active:
                inc.last_active, inc.quiet = w, 0
            else:
                inc.quiet += 1
            causes = self._rank(inc)
            if inc.quiet >= RESOLVE_WINDOWS:
                self.open.remove(inc)
                events.append(IncidentEvent(inc.id, "resolved", w, tuple(inc.services), inc.root_causes))
                continue
            top = [c["service"] for c in causes[:3]]
            if inc.id in changed or top != [c["service"] for c in inc.root_causes[:3]]:
                inc.root_causes = causes
                events.append(IncidentEvent(inc.id, changed.get(inc.id, "updated"), w, tuple(inc.services), causes))
        return events

    def _forget_edges(self, w: int) -> None:
        horizon = w - int(EDGE_TTL_S * 1e9)
        for caller in list(self.edges):
            callees = {c: t for c, t in self.edges[caller].items() if t >= horizon}
            if callees:
                self.edges[caller] = callees
            else:
                del self.edges[caller]

    def _neighbours(self, service: str) -> set[str]:
        out = set(self.edges.get(service, {}))
        out.update(caller for caller, callees in self.edges.items() if service in callees)
        return out

    def _linked(self, service: str, w: int) -> _Incident | None:
        """The open incident, active lately, with a service at most LINK_HOPS calls away."""
        near, frontier = {service}, {service}
        for _ in range(LINK_HOPS):
            frontier = {n for f in frontier for n in self._neighbours(f)} - near
            near |= frontier
        for inc in self.open:
            if w - inc.last_active <= JOIN_S * 1e9 and near.intersection(inc.services):
                return inc
        return None

    # -- root causes
    def _calls_of(self, service: str) -> set[str]:
        """Whom the service calls: from the join, and from its CLIENT operations' names."""
        out = set(self.edges.get(service, {}))
        for s in self.recent.get(service, ()):
            out.update(c for e in s.evidence if e.what == "client" and (c := self._callee(service, e.operation)))
        return out

    def _own(self, service: str) -> tuple[float, list[str]]:
        """The strongest anomalies of the service's own work lately, and what they were."""
        best: dict[tuple[str, str, str], float] = {}
        for s in self.recent.get(service, ()):
            for e in s.evidence:
                if e.what in OWN:
                    k = (e.what, e.operation, e.feature)
                    best[k] = max(best.get(k, 0.0), e.score * WEIGHT[e.what] * _traffic(e.feature))
        top = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        return min(top[0][1], CAP) if top else 0.0, [_describe(k, v) for k, v in top]

    def _called_anomalously(self, callee: str) -> dict[str, tuple[float, str]]:
        """Callers whose calls to ``callee`` were slow or failing lately: caller -> (score, feature).
        From the join (the callee's spans under the callers' calls) and from the callers' own
        CLIENT spans, named like one of the callee's SERVER operations."""
        out: dict[str, tuple[float, str]] = {}
        for caller, q in self.recent.items():
            for s in q:
                calls: list[tuple[str | None, float, str]] = list(s.downstream)
                calls += [(self._callee(caller, e.operation), e.score, e.feature)
                          for e in s.evidence if e.what == "client"]  # fmt: skip
                for name, score, feature in calls:
                    if name == callee and score >= 1.0 and score * _traffic(feature) > out.get(caller, (0.0, ""))[0]:
                        out[caller] = (score * _traffic(feature), feature)
        return out

    def _callee(self, caller: str, operation: str) -> str | None:
        """The service a CLIENT operation calls: the one serving a SERVER operation of that name
        (among the caller's callees when several do)."""
        serving = self.server_ops.get(op_key(operation), set()) - {caller}
        if len(serving) > 1:
            serving &= set(self.edges.get(caller, {}))
        return next(iter(serving)) if len(serving) == 1 else None

    def _rank(self, inc: _Incident) -> tuple[dict, ...]:
        candidates = set(inc.services)
        frontier = set(inc.services)
        for _ in range(4):  # what the incident's services call, a few calls deep
            frontier = {c for f in frontier for c in self._calls_of(f)} - candidates
            candidates |= frontier
        scored: dict[str, tuple[float, list[str]]] = {}
        for c in sorted(candidates):
            own, why = self._own(c)
            callers = self._called_anomalously(c)
            support = sum(min(score, CAP) for score, _ in callers.values())
            if (own <= 0 and not callers) or (c not in inc.services and not callers):
                continue  # not alerting itself, and nothing points at it: its anomalies are its own business
            if callers:
                names = ", ".join(sorted(callers))
                why.append(f"calls from {names} anomalous ({', '.join(sorted({f for _, f in callers.values()}))})")
            scored[c] = (own + CALLER_WEIGHT * support, why)
        for c, (score, why) in list(scored.items()):
            deeper = [d for d in self.edges.get(c, {}) if d in scored and self._own(d)[0] > 0
                      and c in self._called_anomalously(d)]  # fmt: skip
            if deeper:
                why.append(f"explained by anomalous callee {sorted(deeper)[0]}")
                scored[c] = (score * EXPLAINED, why)
        ranked = sorted(scored.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP]
        return tuple({"service": c, "score": round(v[0], 6), "evidence": v[1]} for c, v in ranked)


def _traffic(feature: str) -> float:
    return TRAFFIC_WEIGHT if feature in TRAFFIC_FEATURES else 1.0


def op_key(name: str) -> str:
    """An operation name as both sides of a call name it: gRPC instrumentations write
    ``pkg.Service/Method``, ``/pkg.Service/Method`` or ``grpc.pkg.Service/Method``."""
    key = name.strip().lower().lstrip("/")
    return key[5:] if key.startswith("grpc.") else key


def _describe(key: tuple[str, str, str], score: float) -> str:
    what, operation, feature = key
    where = f"{what.upper()} {operation}" if operation else "service"
    return f"{where}: {feature} beyond its band ({score:.1f}x)"


__all__ = ["Evidence", "IncidentTracker"]
