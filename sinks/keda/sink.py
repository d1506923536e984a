"""The bytewax sink that gathers every service's scaling signal on the process serving KEDA:
a single partition, listed only by that process (``owner``), so bytewax routes the whole
stream of ``ScalingUpdate`` (and ``ServiceExpired``) there."""

from __future__ import annotations

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from pipeline.model import ScalingUpdate
from sinks.keda.signals import ScalingSignals

PARTITION = "scaling"


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
