"""``--emit-jsonl FILE``: every window result (and later every event) as one JSON line.

A single output partition, so one worker writes the file. Its resume state is
the file length: on recovery the file is cut back to the last snapshot and the
re-emitted results (same event times, same values) follow, so the file holds
each result exactly once.

With ``ordered=True`` (replay) results are held and written at the end in a
canonical order (window start, service, operation, kind): the set of results
depends only on the recording, but the order in which bytewax delivers them
depends on its epochs, that is on wall time. Sorting makes the file
byte-identical at any speed and on any number of workers.
"""

from __future__ import annotations

import os

import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from pipeline.model import LateSpans, WindowResult

PARTITION = "jsonl"


def encode_line(item) -> bytes | None:
    """One result -> one line (None for items that are not written)."""
    if isinstance(item, LateSpans):
        return None
    doc = item.to_json() if hasattr(item, "to_json") else item
    return orjson.dumps(doc) + b"\n"


def sort_key(item) -> tuple:
    return (item.window_start, item.service, item.operation, item.span_kind, item.window_end)


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
            self.held.extend(i for i in items if not isinstance(i, LateSpans))
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
            self.f.write(b"".join(map(encode_line, self.held)))
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
