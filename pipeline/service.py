"""Everything telepipe keeps per service: its windows, detectors and scaler.

One ``ServiceState`` per service is the state of the dataflow's keyed step.
Each input item is first *merged* into the service's windows (plain arithmetic
on arrays, which is not expected to fail); each window that closes then goes, in
window order, through *analysis*: anomaly detection (per operation and for the
service), then scaling (which holds scale-down while an alert that should hold it
fires). The output of one input item is a flat list, in a fixed order: per
window its results, then its anomaly updates and alert events, then the scaling
update and event; late counts where they happen.

Failures: a window's results are emitted whatever happens to its analysis. If
anomaly detection or scaling raises on a window, that window's analysis is set
aside as a dead letter (with its traceback) and the next window is analyzed as
usual; nothing that changes state is ever tried twice, so a half-done step is
never applied again.

Configuration is not state: a snapshot holds what was learned and what is open,
and ``bind`` applies the configuration in force after a restart (windows of
another shape are closed as they are; see ``ServiceWindows.bind``).

A service that sent nothing for ``prometheus.service_stale_after_s`` (counted in
empty windows, see ``ServiceWindows``; metric points count as something) is forgotten: its open alerts resolve
(reason "expired"), a ``ServiceExpired`` record tells the sinks, and the keyed
step drops the state (``expired``). If it comes back later, it starts afresh.
"""

from __future__ import annotations

import math

from pipeline.anomaly import ServiceAnomaly
from pipeline.config import Config, MetricTargetConfig
from pipeline.deadletter import DeadLetters
from pipeline.detectors import _strength as strength
from pipeline.incident_model import Evidence, ServiceSummary
from pipeline.metric_series import ServiceMetrics
from pipeline.model import KIND_CLIENT, KIND_SERVER, AnomalyUpdate, ServiceExpired, ServiceWindow
from pipeline.preaggregate import WindowSpec
from pipeline.scaling import ServiceScaler
from pipeline.snapshots import SnapshotTooNew, check_version
from pipeline.windows import ServiceWindows

# Version of the pickled state (recovery snapshots). 2: configuration left out, silence and
# expiry. Older snapshots (no version) are read and converted; newer ones are refused.
STATE_VERSION = 2
__all__ = ["STATE_VERSION", "ServiceState", "SnapshotTooNew"]


def judged_metrics(cfg: Config, service: str) -> tuple[MetricTargetConfig, ...]:
    """The OTLP metrics the service's detector judges: ``[[anomaly.metrics]]``, then the ones it
    is scaled on (``[[scaling.metrics]]`` and its own overrides with a target)."""
    own = next((s.metrics for s in cfg.scaling.services if s.name == service), ())
    return cfg.anomaly.metrics + cfg.scaling.metrics + tuple(m for m in own if m.target > 0)


_WHAT = {KIND_SERVER: "server", KIND_CLIENT: "client", 4: "client", 5: "consumer", -1: "service"}
_WORSE = {"ok": 0, "pending": 1, "firing": 2}


def summarize(
    sw: ServiceWindow, updates: list, downstream: tuple[dict, ...], k: float, told: set[str]
) -> ServiceSummary:
    """What the incident tracker needs of one window: alert state, callees, anomalies (every
    judged feature beyond its band, scored |z| / k)."""
    evidence = []
    state = "ok"
    for u in updates:
        if not isinstance(u, AnomalyUpdate):
            continue
        if _WORSE[u.state] > _WORSE[state]:
            state = u.state
        for j in u.judgements:
            if j.judged and strength(j) > k:
                what = _WHAT.get(u.span_kind, "internal")
                evidence.append(Evidence(what, u.operation, j.feature, round(strength(j) / k, 6)))
    calls = tuple((d["downstream_service"], d["score"], d["feature"]) for d in downstream)
    # SERVER operation names, each told once: a caller's CLIENT span of the same name (gRPC and
    # most HTTP instrumentations name both sides alike) is a call to this service.
    new_ops = sorted({r.operation for r in sw.results if r.span_kind == KIND_SERVER} - told)
    told.update(new_ops)
    return ServiceSummary(sw.service, sw.window_start, state, tuple(d.callee for d in sw.dependencies),
                          tuple(evidence), calls, tuple(new_ops))  # fmt: skip


def silent_limit(cfg: Config, spec: WindowSpec) -> int:
    """Empty windows in a row after which a service is forgotten."""
    return max(1, math.ceil(cfg.prometheus.service_stale_after_s * 1e9 / spec.length_ns))


class ServiceState:
    def __init__(self, cfg: Config, spec: WindowSpec, service: str, partition_idle_s: float | None = None) -> None:
        self.service = service
        length_s = spec.length_ns / 1e9
        self.windows = ServiceWindows(
            service, spec, cfg.windows.max_operations_per_service, int(cfg.prometheus.stale_after_s * 1e9),
            partition_idle_s, silent_limit(cfg, spec),
            ServiceMetrics.from_config(cfg.metrics),
        )  # fmt: skip
        self.cfg = cfg
        self.anomaly = ServiceAnomaly(
            cfg.anomaly, service, length_s, cfg.prometheus.stale_after_s, judged_metrics(cfg, service),
            cfg.prometheus.buckets,
        )
        self.scaler = ServiceScaler(cfg.scaling, service, length_s)
        self.pending: list = []  # closed by ``bind``, analyzed with the next call
        self.told: set[str] = set()  # SERVER operations the incident tracker was told of
        self.expired = False
        self.dead: DeadLetters | None = None

    def bind(self, cfg: Config, spec: WindowSpec, partition_idle_s: float | None, dead: DeadLetters | None) -> None:
        """Apply the configuration in force and where to set failed analyses aside."""
        self.cfg, self.dead = cfg, dead
        length_s = spec.length_ns / 1e9
        self.pending.extend(self.windows.bind(
            spec, cfg.windows.max_operations_per_service, int(cfg.prometheus.stale_after_s * 1e9),
            partition_idle_s, silent_limit(cfg, spec),
        ))  # fmt: skip
        self.windows.metrics.bind(cfg.metrics.max_series_per_service, int(cfg.metrics.stale_after_s * 1e9))
        self.anomaly.bind(cfg.anomaly, length_s, cfg.prometheus.stale_after_s, judged_metrics(cfg, self.service),
                          cfg.prometheus.buckets)  # fmt: skip
        self.scaler.bind(cfg.scaling, length_s)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("dead", "cfg")}
        state["version"] = STATE_VERSION
        return state

    def __setstate__(self, state: dict) -> None:
        check_version(f"service {state.get('service', '?')!r}", state.pop("version", 1), STATE_VERSION)
        self.__dict__.update(state)
        self.__dict__.setdefault("service", self.windows.service)
        self.__dict__.setdefault("pending", [])
        self.__dict__.setdefault("expired", False)
        self.__dict__.setdefault("told", set())
        self.dead = None

    def on_item(self, item, now: float) -> list:
        return self._analyze(self.windows.on_item(item, now))

    def on_idle(self, now: float) -> list:
        return self._analyze(self.windows.on_idle(now))

    def close_all(self) -> list:
        return self._analyze(self.windows.close_all())

    def idle_deadline(self) -> float | None:
        return self.windows.idle_deadline()

    def _analyze(self, closed: list) -> list:
        if self.pending:
            closed, self.pending = self.pending + closed, []
        out = []
        for item in closed:
            if not isinstance(item, ServiceWindow):
                out.append(item)  # late counts
                continue
            if self.expired:  # traffic came back after the service was forgotten: it starts afresh
                self._start_afresh()
            out.extend(item.results)
            out.extend(self._analysis(item))
        return out

    def _analysis(self, sw: ServiceWindow) -> list:
        out: list = []
        if sw.blind:  # a gap in the input (nobody sent anything): nothing to judge, nothing to learn
            return out
        try:
            updates, alerts = self.anomaly.on_window(sw)
            out.extend(updates)
            out.extend(alerts)
            out.append(summarize(sw, updates, self.anomaly.downstream_ranking, self.cfg.anomaly.band_k, self.told))
        except Exception as exc:  # the window's results are out already; its analysis is set aside
            self._set_aside("anomaly", sw, exc)
        try:
            update, event = self.scaler.on_window(sw, self.anomaly.holds_scale_down())
            out.append(update)
            if event is not None:
                out.append(event)
        except Exception as exc:
            self._set_aside("scaling", sw, exc)
        if sw.idle_run >= self.windows.silent_limit:
            self.expired = True
            out.extend(self.anomaly.expire_all(sw.window_start))
            out.append(ServiceExpired(self.service, sw.window_start))
        return out

    def _start_afresh(self) -> None:
        length_s = self.windows.spec.length_ns / 1e9
        cfg = self.cfg
        self.anomaly = ServiceAnomaly(
            cfg.anomaly, self.service, length_s, cfg.prometheus.stale_after_s, judged_metrics(cfg, self.service)
        )
        self.scaler = ServiceScaler(cfg.scaling, self.service, length_s)
        self.expired = False

    def _set_aside(self, step: str, sw: ServiceWindow, exc: Exception) -> None:
        if self.dead is None:
            raise exc
        self.dead.set_aside(step, sw, exc)
