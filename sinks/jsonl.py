"""``--emit-jsonl FILE``: every window result (and later every event) as one JSON line.

A single output partition, so one worker writes the file. Its resume state is
the file length: on recovery the file is cut back to the last snapshot and the
re-emitted results (same event times, same values) follow, so the file holds
each result exactly once.

With ``ordered=True`` (replay) lines are held and written at the end in a
canonical order (event time, kind, then the line itself): the set of lines
depends only on the recording, but the order in which bytewax delivers them
depends on its epochs, that is on wall time. Sorting makes the file
byte-identical at any speed and on any number of workers.
"""

from __future__ import annotations

import os

import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from pipeline.anomaly import AlertEvent
from pipeline.model import WindowResult
from pipeline.scaling import ScalingEvent

PARTITION = "jsonl"


WRITTEN = (WindowResult, AlertEvent, ScalingEvent)
_RANK = {"window": 0, "alert": 1, "scaling": 2}


def encode_line(item) -> bytes | None:
    """One result or event -> one line (None for items that are not written)."""
    if not isinstance(item, WRITTEN):
        return None
    return orjson.dumps(item.to_json()) + b"\n"


def sort_key(line: bytes) -> tuple:
    """Canonical order: event time, then kind, then the line itself."""
    doc = orjson.loads(line)
    return (doc.get("window_start", doc.get("time")), _RANK[doc["type"]], line)


class _JsonlPartition(StatefulSinkPartition[object, int]):
    def __init__(self, path: str, resume_state: int | None, ordered: bool) -> None:
        self.ordered = ordered
        self.held: list = []
        mode = "r+b" if resume_state is not None and os.path.exists(path) else "wb"
        self.f = open(path, mode)
        if resume_state is not None:
            self.f.truncate(resume_state)
            self.f.seek(resume_state)

    def write_batch(self, items: list[object]) -> None:
        if self.ordered:
            self.held.extend(line for line in map(encode_line, items) if line is not None)
            return
        lines = [line for line in map(encode_line, items) if line is not None]
        if lines:
            self.f.write(b"".join(lines))
            self.f.flush()

    def snapshot(self) -> int:
        self.f.flush()
        return self.f.tell()

    def close(self) -> None:
        if self.held:
            self.held.sort(key=sort_key)
            self.f.write(b"".join(self.held))
            self.held = []
        self.f.close()


class JsonlSink(FixedPartitionedSink[object, int]):
    """Items must be keyed (any key): all go to the one partition."""

    def __init__(self, path: str, owner: bool = True, ordered: bool = False) -> None:
        self.path = path
        self.ordered = ordered
        self.owner = owner  # in cluster mode only one process holds the file

    def list_parts(self) -> list[str]:
        return [PARTITION] if self.owner else []

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _JsonlPartition:
        return _JsonlPartition(self.path, resume_state, self.ordered)
