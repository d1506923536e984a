"""The bytewax sink that feeds the dataflow's results into the process's ``SeriesState``."""

from __future__ import annotations

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from sinks.prometheus.state import SeriesState


class _MetricsPartition(StatelessSinkPartition[object]):
    def __init__(self, state: SeriesState) -> None:
        self.state = state

    def write_batch(self, items: list[object]) -> None:
        self.state.update(items)


class MetricsSink(DynamicSink[object]):
    """bytewax output that feeds window results into the process's SeriesState."""

    def __init__(self, state: SeriesState) -> None:
        self.state = state

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MetricsPartition:
        return _MetricsPartition(self.state)
