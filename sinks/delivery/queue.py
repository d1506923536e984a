"""One bounded queue of requests and one guarded sender thread, shared by the Loki and
remote-write sinks: each brings only what its requests are made of and how one is sent.

- The dataflow adds items to the request being built (``add``), which the sink seals
  when it is full (``seal``); the sender seals it when it is ``max_wait_s`` old.
- At most ``max_requests`` sealed requests wait; one more drops the oldest
  (``dropped{reason="<sink>_queue_full"}``): a Loki or Prometheus outage longer than
  the queue costs the oldest data, counted, never memory without bound.
- One thread sends them one at a time, in order (``send(payload, items)``: the sink
  encodes and delivers, ``sinks/delivery/retry.py`` retries). Nothing unexpected ends
  it: an exception while sealing or sending costs that request (counted as
  ``<sink>_internal_error``, and in ``telepipe_thread_errors_total{thread}``), and the
  next one is sent.
- ``flush`` waits until what was added so far has been sent or dropped; ``close``
  flushes, then stops the sender, dropping (counted, ``<sink>_closed``) what is left.

The request being built is the sink's own object (``Building``): items in it, and
``sealed()``, which turns it into the payload the sender gets; it is built under the
queue's lock, and may hold the sink's per-request state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from pipeline.selfmetrics import SelfMetrics
from pipeline.threads import PAUSE_AFTER_ERROR_S, survive

log = logging.getLogger("telepipe")

CLOSE_GRACE_S = 1.0  # close() waits this long for the sender after a timed-out flush
_FAILED = object()  # survive()'s answer when the sender's wait for a request raised


class Building(Protocol):
    """A request being built: how many items it holds, and the payload it seals into."""

    items: int

    def sealed(self) -> object: ...


R = TypeVar("R", bound=Building)


@dataclass
class _Request:
    seq: int
    payload: object
    items: int


class BatchQueue(Generic[R]):
    def __init__(
        self,
        sink: str,
        metrics: SelfMetrics,
        *,
        new_request: Callable[[], R],
        send: Callable[[Any, int], object],
        max_requests: int,
        max_wait_s: float,
        stop: threading.Event,
        thread: str,
        clock: Callable[[], float] = time.monotonic,
        gauge: str | None = None,
    ) -> None:
        """``send(payload, items)`` delivers one sealed request (in the sender thread); ``stop`` is
        set by ``close`` (delivery's backoff sleeps should wait on it); ``thread`` names the sender
        thread and its ``thread_errors`` label; ``gauge``, a self-metric of requests waiting."""
        self.sink, self.metrics = sink, metrics
        self.new_request, self.send = new_request, send
        self.max_requests, self.max_wait_s = max_requests, max_wait_s
        self.stop, self.thread_name, self.clock, self.gauge = stop, thread, clock, gauge
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._inflight: _Request | None = None
        self._seq = 0
        self._closed = False
        self.building = new_request()
        self._started = 0.0  # clock when the request being built got its first item
        self._thread = threading.Thread(target=self._run, name=thread, daemon=True)
        self._thread.start()

    # -- the dataflow's side

    def add(self, fill: Callable[[BatchQueue[R]], object]) -> bool:
        """Run ``fill(self)`` under the queue's lock: it adds to ``self.building`` and may call
        ``seal()`` (when the request is full). False (nothing run) once the queue is closed."""
        with self._cond:
            if self._closed:
                return False
            seals = self._seq
            empty = not self.building.items
            fill(self)
            if self.building.items and (empty or self._seq != seals):
                self._started = self.clock()
            self._cond.notify_all()
            return True

    def seal(self) -> None:
        """The request being built joins the queue (lock held: from ``fill``, or the queue's own).
        Never raises: a request that cannot be sealed is dropped alone."""
        if not self.building.items:
            return
        request, self.building = self.building, self.new_request()
        try:
            payload = request.sealed()
        except Exception as exc:  # the dataflow, flush() and the sender all seal: none may die of it
            log.exception("%s: could not build a request (dropped, carrying on)", self.sink)
            self.metrics.dropped(f"{self.sink}_internal_error", request.items, detail=f"building a request: {exc!r}")
            return
        self._seq += 1
        self._pending.append(_Request(self._seq, payload, request.items))
        while len(self._pending) > self.max_requests:
            old = self._pending.popleft()
            self.metrics.dropped(f"{self.sink}_queue_full", old.items, detail=f"{len(self._pending)} requests waiting")
        self._publish()
        self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is sent or dropped; False on timeout."""
        with self._cond:
            self.seal()
            target = self._seq

            def done() -> bool:
                head = self._inflight or (self._pending[0] if self._pending else None)
                return head is None or head.seq > target

            return self._cond.wait_for(done, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; what is still unsent after ``timeout`` is dropped (the
        sender's backoff sleeps end at once, so it stops within ``CLOSE_GRACE_S``)."""
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            self.stop.set()
            self._cond.notify_all()
        self._thread.join(None if timeout is None else CLOSE_GRACE_S)
        return drained

    def idle(self) -> bool:
        """Nothing waits or is being sent."""
        with self._cond:
            return not self._pending and self._inflight is None

    def sender_alive(self) -> bool:
        return self._thread.is_alive()

    def _publish(self) -> None:
        if self.gauge:
            self.metrics.set_gauge(self.gauge, len(self._pending))

    # -- the sender thread

    def _next(self) -> _Request | None:
        """The next request to send, waiting for one (and sealing by age); None once stopped."""
        while True:
            if self.stop.is_set():
                self.seal()
                for req in self._pending:
                    self.metrics.dropped(f"{self.sink}_closed", req.items, detail="not sent before close")
                self._pending.clear()
                self._publish()
                return None
            if self._pending:
                self._inflight = self._pending.popleft()
                self._publish()
                return self._inflight
            if self.building.items:
                wait = self._started + self.max_wait_s - self.clock()
                if wait <= 0:
                    self.seal()
                    continue
                self._cond.wait(wait)
            else:
                self._cond.wait()

    def _take(self) -> _Request | None:
        with self._cond:
            return self._next()

    def _run(self) -> None:
        while True:
            taken = survive(self.thread_name, self.metrics, self._take, default=_FAILED)
            if taken is _FAILED:
                if self.stop.is_set():
                    return  # even the drain at close failed (logged, counted): do not spin
                self.stop.wait(PAUSE_AFTER_ERROR_S)  # whatever failed must not spin either
                continue
            if taken is None:
                return
            req = cast(_Request, taken)
            try:
                self.send(req.payload, req.items)
            except Exception as exc:  # the thread must live on: count the request, go on with the next
                log.exception("%s: unexpected error (carrying on)", self.thread_name)
                self.metrics.inc("thread_errors", 1, self.thread_name)
                self.metrics.dropped(f"{self.sink}_internal_error", req.items, detail=repr(exc))
            finally:
                with self._cond:
                    self._inflight = None
                    self._cond.notify_all()
