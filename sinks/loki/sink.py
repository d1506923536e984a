"""The bytewax sink that feeds log batches and telepipe's events to the process's Loki client."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from pipeline.model import LogBatch
from sinks.loki.client import LokiClient

log = logging.getLogger("telepipe")


class _LokiPartition(StatelessSinkPartition[LogBatch]):
    def __init__(self, sink: LokiSink) -> None:
        self.sink = sink
        self.client = sink._acquire()

    def write_batch(self, items: list) -> None:
        """Push the items. This runs in the dataflow, which an exception would stop: an item
        that cannot be pushed (a bug, a malformed batch) is dropped alone, as
        ``loki_internal_error``, and the others still go."""
        events = []
        for item in items:
            if isinstance(item, LogBatch):
                self._push(self.client.push, item, len(item))
            else:
                events.append(item)
        if not events:
            return
        try:
            self.client.push_events(events)
        except Exception:  # a failed push added nothing: find the bad events one by one
            for event in events:
                self._push(self.client.push_events, [event], 1)

    def _push(self, push: Callable[[Any], object], what: object, lines: int) -> None:
        try:
            push(what)
        except Exception as exc:
            log.exception("loki: could not take %d lines (dropped, the dataflow carries on)", lines)
            self.client.metrics.dropped("loki_internal_error", lines, detail=repr(exc))

    def close(self) -> None:
        self.sink._release()


class LokiSink(DynamicSink[LogBatch]):
    """Writes LogBatch items (and telepipe's events) to Loki through one ``LokiClient`` per process.

    Give it a client or a factory (called once, at the first ``build``). The
    client is closed (flushed, up to ``close_timeout_s``) when the last
    partition of this process closes.
    """

    def __init__(self, client: LokiClient | Callable[[], LokiClient], close_timeout_s: float = 30.0) -> None:
        self._client = client if isinstance(client, LokiClient) else None
        self._factory = None if isinstance(client, LokiClient) else client
        self.close_timeout_s = close_timeout_s
        self._lock = threading.Lock()
        self._users = 0

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LokiPartition:
        return _LokiPartition(self)

    def _acquire(self) -> LokiClient:
        with self._lock:
            if self._client is None:
                assert self._factory is not None
                self._client = self._factory()
            self._users += 1
            return self._client

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or self._client is None:
                return
            client = self._client
            if self._factory is not None:  # a later run builds a fresh client
                self._client = None
        client.close(self.close_timeout_s)
