"""Background threads that survive what they did not expect.

A daemon that runs for months has threads (sink senders, the spool's fsync, the
recovery reader) whose loop body may one day raise something nobody planned
for. A thread that dies of it silently stops its work while everything else goes
on: a sink that drops every later batch as queue-full, a spool that never syncs
again. Each loop iteration therefore runs through ``survive``: an unexpected
exception is logged with its traceback, counted as
``telepipe_thread_errors_total{thread}``, and the loop carries on after a pause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from pipeline.selfmetrics import SelfMetrics

log = logging.getLogger("telepipe")

T = TypeVar("T")

PAUSE_AFTER_ERROR_S = 1.0  # a loop whose body keeps failing must not spin


def survive(thread: str, metrics: SelfMetrics, fn: Callable[..., T], *args, default: T | None = None) -> T | None:
    """``fn(*args)``; on any exception: logged with its traceback, counted, ``default`` returned."""
    try:
        return fn(*args)
    except Exception:  # the thread must live on: log, count, carry on
        log.exception("%s: unexpected error (carrying on)", thread)
        metrics.inc("thread_errors", 1, thread)
        return default


def loop_forever(
    thread: str, metrics: SelfMetrics, body: Callable[[], object], stop: threading.Event, interval_s: float
) -> None:
    """Call ``body`` every ``interval_s`` until ``stop`` is set; failures are survived (and the
    next try waits at least ``PAUSE_AFTER_ERROR_S``)."""
    failed = object()
    while not stop.is_set():
        ok = survive(thread, metrics, body, default=failed) is not failed
        if stop.wait(interval_s if ok else max(interval_s, PAUSE_AFTER_ERROR_S)):
            return
