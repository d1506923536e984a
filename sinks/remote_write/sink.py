"""The bytewax sink that feeds window results and scaling updates to the process's remote-write client."""

from __future__ import annotations

import logging

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from sinks.remote_write.client import THREAD, RemoteWriteClient

log = logging.getLogger("telepipe")


class _Partition(StatelessSinkPartition):
    def __init__(self, client: RemoteWriteClient) -> None:
        self.client = client

    def write_batch(self, items: list) -> None:
        """Runs in the dataflow, which an exception would stop. ``push`` already drops a bad
        item alone; anything else unexpected costs this batch's items (counted as
        ``remote_write_internal_error``), and the dataflow carries on."""
        try:
            self.client.push(items)
        except Exception as exc:
            log.exception("%s: could not take %d items (dropped, the dataflow carries on)", THREAD, len(items))
            self.client.metrics.dropped("remote_write_internal_error", len(items), detail=repr(exc))


class RemoteWriteSink(DynamicSink):
    """bytewax output feeding window results and scaling updates to one client per process."""

    def __init__(self, client: RemoteWriteClient) -> None:
        self.client = client

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(self.client)

