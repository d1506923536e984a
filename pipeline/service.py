"""Everything telepipe keeps per service: its windows, detectors and scaler.

One ``ServiceState`` per service is the state of the dataflow's keyed step.
Each closed ``ServiceWindow`` goes, in window order, through anomaly detection
(per operation and for the service) and then scaling (which holds scale-down
while an alert fires). The output of one input item is a flat list, in a fixed
order: per-operation window results, late-span counts, anomaly updates, alert
events, the scaling update and scaling event.
"""

from __future__ import annotations

from pipeline.anomaly import ServiceAnomaly
from pipeline.config import Config
from pipeline.model import ServiceWindow
from pipeline.scaling import ServiceScaler
from pipeline.windows import ServiceWindows, WindowSpec


class ServiceState:
    def __init__(self, cfg: Config, spec: WindowSpec, service: str, partition_idle_s: float | None = None) -> None:
        length_s = spec.length_ns / 1e9
        self.windows = ServiceWindows(
            service, spec, cfg.windows.max_operations_per_service, int(cfg.prometheus.stale_after_s * 1e9),
            partition_idle_s,
        )  # fmt: skip
        self.anomaly = ServiceAnomaly(cfg.anomaly, service, length_s)
        self.scaler = ServiceScaler(cfg.scaling, service, length_s)

    def on_item(self, item, now: float) -> list:
        return self._analyze(self.windows.on_item(item, now))

    def on_idle(self, now: float) -> list:
        return self._analyze(self.windows.on_idle(now))

    def close_all(self) -> list:
        return self._analyze(self.windows.close_all())

    def idle_deadline(self) -> float | None:
        return self.windows.idle_deadline()

    def _analyze(self, closed: list) -> list:
        out = []
        for item in closed:
            if not isinstance(item, ServiceWindow):
                out.append(item)  # LateSpans
                continue
            out.extend(item.results)
            updates, alerts = self.anomaly.on_window(item)
            out.extend(updates)
            out.extend(alerts)
            update, event = self.scaler.on_window(item, self.anomaly.firing())
            out.append(update)
            if event is not None:
                out.append(event)
        return out
