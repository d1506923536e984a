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

The server is ``grpc.aio`` on its own event loop in one background thread. An
``external-push`` trigger holds a ``StreamIsActive`` call open for as long as
its ScaledObject exists; on a thread-pool server each open stream held a thread,
so a few ScaledObjects starved ``GetMetrics`` and ``IsActive`` of every thread.
Here an open stream is a coroutine waiting on a timer and costs no thread. What
it still costs (a call in gRPC core, a poll of the board every ``STREAM_POLL_S``)
is bounded: at most ``max_streams`` (config ``keda.max_streams``) streams are
open at once, one more is answered RESOURCE_EXHAUSTED. The unary calls are not
limited; each is answered at once from the board.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Callable

import grpc

from sinks.keda import externalscaler_pb2 as pb
from sinks.keda import externalscaler_pb2_grpc as pb_grpc

log = logging.getLogger("telepipe.keda")

_UNSAFE = re.compile(r"[^a-z0-9-]+")
STREAM_POLL_S = 1.0
REFUSAL_LOG_EVERY_S = 60.0  # a KEDA retrying past the limit must not flood the log
STOP_SLACK_S = 5.0  # stop() waits this long beyond its grace before it gives up on the loop

Lookup = Callable[[str], tuple[int, float] | None]


def metric_name(service: str) -> str:
    """KEDA metric names are lowercase and DNS-ish; the service name is folded into one."""
    return "telepipe-desired-replicas-" + (_UNSAFE.sub("-", service.lower()).strip("-") or "service")


class _Servicer(pb_grpc.ExternalScalerServicer):
    """The handlers; they all run on the server's event loop, so the stream count needs no lock."""

    def __init__(self, lookup: Lookup, max_streams: int, stopping: asyncio.Future) -> None:
        self.lookup = lookup  # service -> (desired replicas, latest call rate) or None; thread-safe, brief lock
        self.max_streams = max_streams
        self.stopping = stopping  # done once stop() began: open streams end at once instead of at the grace
        self.streams = 0  # StreamIsActive calls open now
        self._refused = 0  # since the last warning
        self._warned_at = -math.inf

    async def _service(self, ref, context: grpc.aio.ServicerContext) -> tuple[str, int, float]:
        """(service, desired replicas, call rate) named by a ``ScaledObjectRef``; aborts the call when unknown."""
        service = ref.scalerMetadata.get("service", "")
        if not service:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "trigger metadata must name the 'service'")
        found = self.lookup(service)
        if found is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"telepipe has no scaling signal for service {service!r} (yet, or any more)"
            )
            raise AssertionError("abort raises")  # for the type checker: abort never returns
        return service, found[0], found[1]

    async def IsActive(self, request, context):  # noqa: N802 (protocol's name)
        _, _, rate = await self._service(request, context)
        return pb.IsActiveResponse(result=rate > 0)

    async def StreamIsActive(self, request, context):  # noqa: N802
        if self.streams >= self.max_streams:
            self._warn_refused()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"telepipe serves at most {self.max_streams} StreamIsActive streams at once (keda.max_streams); "
                "use an 'external' trigger (polls IsActive) or raise keda.max_streams",
            )
        # A coroutine writing with context.write, not an async generator: when the client goes away gRPC cancels
        # this task and the finally runs at once, where a generator parked at its yield would wait for the GC.
        self.streams += 1
        try:
            last = None
            while not self.stopping.done():
                _, _, rate = await self._service(request, context)
                active = rate > 0
                if active != last:
                    last = active
                    await context.write(pb.IsActiveResponse(result=active))
                # asyncio.wait on the shared future: no task per stream and poll, and stop() wakes every stream.
                await asyncio.wait([self.stopping], timeout=STREAM_POLL_S)
        finally:
            self.streams -= 1

    def _warn_refused(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= REFUSAL_LOG_EVERY_S:
            log.warning(
                "KEDA StreamIsActive refused (RESOURCE_EXHAUSTED) %d time(s) since the last such warning: "
                "%d streams open, the limit keda.max_streams is %d",
                self._refused, self.streams, self.max_streams,
            )  # fmt: skip
            self._warned_at, self._refused = now, 0

    async def GetMetricSpec(self, request, context):  # noqa: N802
        service, _, _ = await self._service(request, context)
        return pb.GetMetricSpecResponse(
            metricSpecs=[pb.MetricSpec(metricName=metric_name(service), targetSize=1, targetSizeFloat=1.0)]
        )

    async def GetMetrics(self, request, context):  # noqa: N802
        service, desired, _ = await self._service(request.scaledObjectRef, context)
        name = request.metricName or metric_name(service)
        return pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName=name, metricValue=desired, metricValueFloat=float(desired))]
        )


class KedaScaler:
    """The gRPC server; ``lookup(service)`` gives (desired replicas, call rate) or None.

    The address is bound at construction (``port`` is known before ``start()``); ``start()`` runs the event loop
    in a daemon thread, ``stop()`` ends open streams, stops the server and the loop.
    """

    def __init__(self, listen: str, lookup: Lookup, max_streams: int = 1000) -> None:
        if max_streams < 1:
            raise ValueError(f"keda.max_streams must be positive, got {max_streams}")
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stopped = False
        try:
            # A grpc.aio server belongs to the loop it is created on: create and bind it there, on this thread,
            # before the loop runs in its own thread.
            bound = self._loop.run_until_complete(self._bind(listen, lookup, max_streams))
            self.server, self.port, self._servicer = bound
        except BaseException:
            self._loop.close()
            raise

    @staticmethod
    async def _bind(listen: str, lookup: Lookup, max_streams: int) -> tuple[grpc.aio.Server, int, _Servicer]:
        servicer = _Servicer(lookup, max_streams, asyncio.get_running_loop().create_future())
        server = grpc.aio.server()
        pb_grpc.add_ExternalScalerServicer_to_server(servicer, server)
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as e:  # grpc raises where it used to return 0
            raise OSError(f"cannot bind the KEDA scaler address {listen}: {e}") from e
        if port == 0:
            raise OSError(f"cannot bind the KEDA scaler address {listen}")
        return server, port, servicer

    def start(self) -> None:
        if self._thread is not None or self._stopped:
            raise RuntimeError("KedaScaler.start() may be called once, before stop()")
        self._thread = threading.Thread(target=self._run, name="keda", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)
        log.info("KEDA external scaler on port %d (at most %d open streams)", self.port, self._servicer.max_streams)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # What asyncio.run does on its way out: nothing the loop owns outlives it.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    async def _shutdown(self, grace: float) -> None:
        if not self._servicer.stopping.done():
            self._servicer.stopping.set_result(None)
        await self.server.stop(grace)

    def stop(self, grace: float = 1.0) -> None:
        """Open streams end (status OK) at once; unary calls in flight get ``grace`` seconds. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is None:  # never started: nothing runs, the loop only holds the bound server
            self._loop.run_until_complete(self._shutdown(0))
            self._loop.close()
            return
        done = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
        try:
            done.result(timeout=grace + STOP_SLACK_S)
        except TimeoutError:
            log.warning("KEDA scaler did not stop within %.1f s; leaving its thread behind", grace + STOP_SLACK_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STOP_SLACK_S)
