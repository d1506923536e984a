"""The ``externalscaler.ExternalScaler`` gRPC service (KEDA's external scaler protocol).

A ScaledObject names the service in its trigger metadata::

    triggers:
      - type: external            # or external-push for StreamIsActive
        metadata:
          scalerAddress: telepipe.monitoring:9465
          service: checkout

``GetMetricSpec`` answers one metric with ``targetSize`` 1 and ``GetMetrics``
answers the desired replicas as its value, so KEDA's HPA, which computes
``ceil(metricValue / targetSize)`` for AverageValue metrics, asks for exactly
telepipe's desired replicas. ``IsActive`` is true while the service had calls
in its latest window (false lets KEDA scale an idle service to zero when the
ScaledObject allows it). A service telepipe has not seen answers NOT_FOUND, a
request without ``service`` metadata INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent import futures

import grpc

from sinks.keda import externalscaler_pb2 as pb
from sinks.keda import externalscaler_pb2_grpc as pb_grpc

log = logging.getLogger("telepipe.keda")

_UNSAFE = re.compile(r"[^a-z0-9-]+")
STREAM_POLL_S = 1.0


def metric_name(service: str) -> str:
    """KEDA metric names are lowercase and DNS-ish; the service name is folded into one."""
    return "telepipe-desired-replicas-" + (_UNSAFE.sub("-", service.lower()).strip("-") or "service")


class _Servicer(pb_grpc.ExternalScalerServicer):
    def __init__(self, lookup: Callable[[str], tuple[int, float] | None], stop: threading.Event) -> None:
        self.lookup = lookup  # service -> (desired replicas, latest call rate) or None
        self.stop = stop

    def _service(self, ref: pb.ScaledObjectRef, context) -> tuple[str, int, float]:
        service = ref.scalerMetadata.get("service", "")
        if not service:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "trigger metadata must name the 'service'")
        found = self.lookup(service)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"telepipe has no scaling signal for service {service!r} yet")
        return service, found[0], found[1]

    def IsActive(self, request, context):  # noqa: N802 (protocol's name)
        _, _, rate = self._service(request, context)
        return pb.IsActiveResponse(result=rate > 0)

    def StreamIsActive(self, request, context):  # noqa: N802
        last = None
        while context.is_active() and not self.stop.is_set():
            _, _, rate = self._service(request, context)
            active = rate > 0
            if active != last:
                last = active
                yield pb.IsActiveResponse(result=active)
            self.stop.wait(STREAM_POLL_S)

    def GetMetricSpec(self, request, context):  # noqa: N802
        service, _, _ = self._service(request, context)
        return pb.GetMetricSpecResponse(
            metricSpecs=[pb.MetricSpec(metricName=metric_name(service), targetSize=1, targetSizeFloat=1.0)]
        )

    def GetMetrics(self, request, context):  # noqa: N802
        service, desired, _ = self._service(request.scaledObjectRef, context)
        name = request.metricName or metric_name(service)
        return pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName=name, metricValue=desired, metricValueFloat=float(desired))]
        )


class KedaScaler:
    """The gRPC server; ``lookup(service)`` gives (desired replicas, call rate) or None."""

    def __init__(self, listen: str, lookup: Callable[[str], tuple[int, float] | None], threads: int = 4) -> None:
        self._stop = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="keda"))
        pb_grpc.add_ExternalScalerServicer_to_server(_Servicer(lookup, self._stop), self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot bind the KEDA scaler address {listen}")

    def start(self) -> None:
        self.server.start()
        log.info("KEDA external scaler on port %d", self.port)

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
