"""Incident records: what each service's state tells the incident tracker per window
(``ServiceSummary``), and the incidents it opens, updates and resolves (``IncidentEvent``).
The tracker itself is ``pipeline/incidents.py``; other records are in ``pipeline/model.py``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evidence:
    """One anomalous thing seen in a window: a key's feature beyond its band (score >= 1)."""

    what: str  # "server", "internal", "consumer" (the service's own work), "client" (its calls), "service"
    operation: str  # the key's operation ("" for the service key)
    feature: str  # latency_p50, error_rate, error_log_rate, metric:<name>, ...
    score: float  # |z| / k in the feature's alarming direction


@dataclass(frozen=True)
class ServiceSummary:
    """One service in one closed window, for the incident tracker: its alert state, who it
    called (the service graph), its own anomalies and its anomalous calls to each callee."""

    service: str
    window_start: int
    state: str  # worst alert state of its keys: ok, pending, firing
    callees: tuple[str, ...]  # services it called in the window (sampled traces)
    evidence: tuple[Evidence, ...]  # its keys beyond their bands
    downstream: tuple[tuple[str, float, str], ...]  # (callee, score, feature) of calls slower/failing
    server_ops: tuple[str, ...] = ()  # SERVER operations it has not told the tracker of before


@dataclass(frozen=True)
class IncidentEvent:
    """An incident: alerts that started close together on services linked in the service graph."""

    id: str
    state: str  # opened, updated, resolved
    time: int  # unix ns: start of the window that caused the event
    services: tuple[str, ...]  # the alerting services, in the order they joined
    root_causes: tuple[dict, ...]  # {"service", "score", "evidence": [str, ...]}, best first

    def to_json(self) -> dict:
        return {
            "type": "incident",
            "state": self.state,
            "id": self.id,
            "time": self.time,
            "services": list(self.services),
            "root_causes": [dict(rc) for rc in self.root_causes],
        }
