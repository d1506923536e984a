"""The bytewax sink that writes the --emit-jsonl file (one partition: one writer)."""

from __future__ import annotations

import logging
import os

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from sinks.jsonl.encoder import encode_line, sort_key

PARTITION = "jsonl"
log = logging.getLogger("telepipe")


def _resume_length(path: str, resume_state) -> int | None:
    """Where to go on writing ``path`` (None: start a new file). Earlier versions' state is the
    length alone."""
    if resume_state is None:
        return None
    old_path, length = resume_state if isinstance(resume_state, tuple) else (path, resume_state)
    if os.path.abspath(old_path) != os.path.abspath(path):
        log.warning("--emit-jsonl: %s is a new path (the snapshot wrote %s): starting it clean", path, old_path)
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        log.warning("--emit-jsonl: %s is missing: starting it clean (lines before the restart are gone)", path)
        return None
    if size < length:
        log.warning("--emit-jsonl: %s holds %d bytes, fewer than the %d written before the restart: starting it "
                    "clean", path, size, length)  # fmt: skip
        return None
    return length


class _JsonlPartition(StatefulSinkPartition[object, tuple[str, int]]):
    def __init__(self, path: str, resume_state, ordered: bool) -> None:
        self.path = path
        self.ordered = ordered
        self.held: list = []
        length = _resume_length(path, resume_state)
        self.f = open(path, "wb" if length is None else "r+b")
        if length is not None:  # cut back to the snapshot: re-emitted lines follow once
            self.f.truncate(length)
            self.f.seek(length)

    def write_batch(self, items: list[object]) -> None:
        if self.ordered:
            self.held.extend(line for line in map(encode_line, items) if line is not None)
            return
        lines = [line for line in map(encode_line, items) if line is not None]
        if lines:
            self.f.write(b"".join(lines))
            self.f.flush()

    def snapshot(self) -> tuple[str, int]:
        self.f.flush()
        return (self.path, self.f.tell())

    def close(self) -> None:
        if self.held:
            self.held.sort(key=sort_key)
            self.f.write(b"".join(self.held))
            self.held = []
        self.f.close()


class JsonlSink(FixedPartitionedSink[object, tuple[str, int]]):
    """Items must be keyed (any key): all go to the one partition."""

    def __init__(self, path: str, owner: bool = True, ordered: bool = False) -> None:
        self.path = path
        self.ordered = ordered
        self.owner = owner  # in cluster mode only one process holds the file

    def list_parts(self) -> list[str]:
        return [PARTITION] if self.owner else []

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state) -> _JsonlPartition:
        return _JsonlPartition(self.path, resume_state, self.ordered)
