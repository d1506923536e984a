"""The scaling signal of every service, gathered on the one process that serves KEDA.

Per-service state (windows, detectors, scalers) is spread over all processes of
a cluster by bytewax; KEDA asks one address. The dataflow therefore keys every
``ScalingUpdate`` to a single output partition, ``SignalsSink``, which only the
KEDA process lists (``owner``): bytewax routes the whole stream there, and the
partition keeps the newest signal per service in a ``ScalingSignals`` board that
the KEDA server reads. With one process it is simply that process.

Nothing here needs recovery state: after a restart the board fills again as
windows close, and KEDA is told NOT_FOUND for a service until then.
"""

from __future__ import annotations

import threading

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from pipeline.scaling import ScalingUpdate

PARTITION = "scaling"


class ScalingSignals:
    """service -> (desired replicas, SERVER calls per second) of its newest window. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, float]] = {}

    def update(self, items: list) -> None:
        with self._lock:
            for u in items:
                if isinstance(u, ScalingUpdate):
                    self._latest[u.service] = (u.desired, u.call_rate)

    def lookup(self, service: str) -> tuple[int, float] | None:
        with self._lock:
            return self._latest.get(service)


class _Partition(StatefulSinkPartition[ScalingUpdate, None]):
    def __init__(self, board: ScalingSignals) -> None:
        self.board = board

    def write_batch(self, items: list[ScalingUpdate]) -> None:
        self.board.update(items)

    def snapshot(self) -> None:
        return None


class SignalsSink(FixedPartitionedSink[ScalingUpdate, None]):
    """Items must be keyed (any key): all go to the one partition, held by the ``owner`` process."""

    def __init__(self, board: ScalingSignals, owner: bool = True) -> None:
        self.board = board
        self.owner = owner

    def list_parts(self) -> list[str]:
        return [PARTITION] if self.owner else []

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Partition:
        return _Partition(self.board)
