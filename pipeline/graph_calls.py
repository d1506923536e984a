"""Service-graph request metrics and virtual nodes, as Grafana Tempo's metrics-generator and
the Collector's ``servicegraph`` connector count them (``traces_service_graph_*``).

The join (``pipeline/servicegraph.py``) pairs each child span with its parent; a pair across
services is a request ``client -> server``. Besides the edges it feeds the per-service state,
it sums, per (client, server, connection type), the requests, the failed ones (the server
span's status is ERROR) and a histogram of the server span's duration: ``GraphCalls`` items,
which ``/metrics`` adds up as ``telepipe_service_graph_request_total``,
``telepipe_service_graph_request_failed_total`` and ``telepipe_service_graph_request_server_seconds``.

A CLIENT or PRODUCER span whose callee is not instrumented has no child span. Its callee is a
*virtual node*, named by the span's attributes (``peer_of``):

- a database call (``db.system.name`` or the older ``db.system``): ``connection_type="database"``,
  server ``peer.service``, else ``db.namespace``, else the database system; counted at once
  (a database never sends a span of its own);
- a message sent to a broker (``messaging.system``): ``"messaging_system"``, server
  ``peer.service``, else the messaging system;
- any other call naming its peer (``peer.service``, else ``server.address``): ``"virtual_node"``.

The last two wait for a child for the join's ``ttl`` and become virtual-node requests only if
none came; a call with a child is an ordinary request, counted from the child. Latency of a
virtual-node request is the client span's duration (the only one there is).

Counts come from the join's trace sample (``servicegraph.sample_one_in``) and are scaled up by
it, and by each span's sampling weight (``SpanBatch.weight``): estimates when the sample is
1 in more than 1, exact with ``sample_one_in = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.model import KIND_CLIENT, SpanBatch

KIND_PRODUCER = 4
DATABASE, MESSAGING, VIRTUAL = "database", "messaging_system", "virtual_node"
# The span attributes virtual nodes are named by (what the wire reader is asked for).
PEER_ATTRIBUTES = ("peer.service", "db.namespace", "db.system.name", "db.system", "messaging.system", "server.address")


@dataclass(frozen=True)
class GraphCalls:
    """Requests from ``client`` to ``server`` seen in one batch (or virtual-node requests whose
    wait ended in it), scaled to the traffic they stand for."""

    client: str
    server: str
    connection_type: str  # "" (both sides instrumented), "virtual_node", "database", "messaging_system"
    calls: int
    failed: int
    bucket_counts: tuple[int, ...]  # server-side seconds, by the configured bounds (+Inf last)
    sum_s: float
    end_ns: int  # the newest span end among them


class GraphSums:
    """``GraphCalls`` being summed for one batch: per (client, server, connection type)."""

    def __init__(self, bounds: np.ndarray, scale: int) -> None:
        self.bounds, self.scale = bounds, scale
        self.sums: dict[tuple[str, str, str], list] = {}  # -> [calls, failed, buckets, sum, end]

    def bucket(self, seconds: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, seconds, side="left")

    def _row(self, key: tuple[str, str, str]) -> list:
        row = self.sums.get(key)
        if row is None:
            row = self.sums[key] = [0, 0, np.zeros(self.bounds.size + 1, dtype=np.int64), 0.0, 0]
        return row

    def add_spans(self, key: tuple[str, str, str], w: np.ndarray, failed: np.ndarray, seconds: np.ndarray,
                  end: np.ndarray) -> None:  # fmt: skip
        """Spans (their weights, failed flags, durations and ends) as requests of ``key``."""
        row = self._row(key)
        row[0] += int(w.sum())
        row[1] += int(w[failed].sum())
        row[2] += np.bincount(self.bucket(seconds), weights=w, minlength=self.bounds.size + 1).astype(np.int64)
        row[3] += float((seconds * w).sum())
        row[4] = max(row[4], int(end.max()))

    def add_summed(self, key: tuple[str, str, str], buckets: dict[int, int], failed: int, seconds: float,
                   end: int) -> None:  # fmt: skip
        """Requests summed while they waited (``LinkJoiner``): bucket -> weighted calls."""
        row = self._row(key)
        for b, n in buckets.items():
            row[0] += n
            row[2][b] += n
        row[1] += failed
        row[3] += seconds
        row[4] = max(row[4], end)

    def records(self) -> list[GraphCalls]:
        k = self.scale
        return [
            GraphCalls(client, server, ctype, calls * k, failed * k, tuple((buckets * k).tolist()), total * k, end)
            for (client, server, ctype), (calls, failed, buckets, total, end) in sorted(self.sums.items())
            if calls
        ]


def peer_of(batch: SpanBatch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the spans ``rows``: the value index (in ``batch.attr_values``) of the virtual node each
    CLIENT or PRODUCER span names (-1: none, or another kind), and its connection type
    (0: none, 1: database, 2: messaging system, 3: other virtual node)."""
    none = np.full(rows.size, -1, dtype=np.int32)

    def col(*keys: str) -> np.ndarray:
        c = batch.attribute(*keys)
        return none if c is None else c[rows]

    if batch.attrs is None or not rows.size:
        return none, np.zeros(rows.size, dtype=np.int8)
    system, messaging = col("db.system.name", "db.system"), col("messaging.system")
    database = system >= 0
    db_name = col("peer.service", "db.namespace", "db.system.name", "db.system")
    other = col("peer.service", "messaging.system", "server.address")
    kind = batch.kind[rows]
    caller = (kind == KIND_CLIENT) | (kind == KIND_PRODUCER)
    name = np.where(caller, np.where(database, db_name, other), -1)
    ctype = np.where(name < 0, 0, np.where(database, 1, np.where(messaging >= 0, 2, 3))).astype(np.int8)
    return name.astype(np.int32), ctype


CTYPE_NAMES = ("", DATABASE, MESSAGING, VIRTUAL)
