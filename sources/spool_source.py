"""bytewax source over the local spool shards.

One partition per local shard (``list_parts`` lists only this process's
shards). A partition's state is just ``(segment, offset, step, format version)``:
everything else is derived from it, so a resumed partition continues exactly
after the last record it emitted. ``next_batch`` never blocks: with nothing new it returns
``[]`` and asks to be woken a little later.

The source ends (EOF) when ``stop`` is set and every committed record has been
read: that is the drain step of a graceful shutdown.

Retention: without recovery a segment is deleted once read. With recovery, a
segment is deleted only after a *committed* bytewax snapshot has moved past
it (and ``keep_for``, the backup interval, has passed): a crash resumes from
that snapshot, so every record it may re-read is still on disk.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from pipeline.batch_codec import Batch, Steps, coalesce
from pipeline.batch_codec import decode as batch_from_bytes
from pipeline.model import SpanBatch
from pipeline.snapshots import check_version
from sources.spool import Spool, read_records

POLL_INTERVAL = timedelta(milliseconds=20)
RETENTION_CHECK = timedelta(seconds=1)
MAX_RECORDS_PER_BATCH = 64
MAX_BYTES_PER_BATCH = 8 * 1024 * 1024
STATE_VERSION = 2  # of the resume state (segment, offset, step, version); 1 had no version


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _SpoolPartition(StatefulSourcePartition[Batch, tuple[int, ...]]):
    def __init__(
        self,
        spool: Spool,
        resume_state: tuple[int, ...] | None,
        index: int,
        stop: threading.Event,
        now: Callable[[], datetime],
        committed: Callable[[], int | None] | None,
        keep_for: timedelta,
    ) -> None:
        self.spool = spool
        self.stop = stop
        self.now = now
        self.committed = committed  # segment of the committed snapshot (None: no recovery)
        self.keep_for = keep_for
        self.commits: deque[tuple[datetime, int]] = deque()  # (first seen, committed segment)
        self.next_check = now()
        segments = spool.segments()
        if resume_state is None:
            self.seq, self.offset, step = (segments[0] if segments else 1), 0, 0
        else:
            check_version(f"spool shard {spool.dir.name}", resume_state[3] if len(resume_state) > 3 else 1,
                          STATE_VERSION)
            self.seq, self.offset, step = resume_state[:3]
        self.steps = Steps(index, step)
        self._file = None
        self._file_seq = -1
        self._idle = False
        self.read_at = time.monotonic()  # when the read position last moved (readiness: a stuck flow)

    def unread_bytes(self) -> int:
        """Acknowledged bytes after the read position (any thread may ask)."""
        seq, offset = self.seq, self.offset
        total = 0
        for s in self.spool.segments():
            if s >= seq:
                total += self.spool.size_of(s) - (offset if s == seq else 0)
        return max(total, 0)

    def _open(self):
        if self._file_seq != self.seq:
            if self._file is not None:
                self._file.close()
            self._file = open(self.spool.path_of(self.seq), "rb")
            self._file_seq = self.seq
        return self._file

    def _advance(self) -> bool:
        """Move to the next existing segment; False if this is the active one."""
        later = [s for s in self.spool.segments() if s > self.seq]
        if not later:
            return False
        self.seq, self.offset = later[0], 0
        if self.committed is None:  # no recovery: nothing will ever resume before this point
            self.spool.retire_before(self.seq)
        return True

    def _retire_committed(self) -> None:
        """Delete segments that a committed snapshot moved past at least ``keep_for`` ago."""
        now = self.now()
        if now < self.next_check:
            return
        self.next_check = now + RETENTION_CHECK
        assert self.committed is not None  # only called with recovery
        seq = self.committed()
        if seq is not None and (not self.commits or seq > self.commits[-1][1]):
            self.commits.append((now, seq))
        covered = None
        while self.commits and self.commits[0][0] <= now - self.keep_for:
            covered = self.commits.popleft()[1]
        if covered is not None:
            self.commits.appendleft((now - self.keep_for, covered))  # still the newest known
            self.spool.retire_before(covered)

    def next_batch(self) -> list[Batch]:
        if self.committed is not None:
            self._retire_committed()
        active_seq, active_off = self.spool.committed()
        segments = self.spool.segments()
        if self.seq not in segments and not self._advance():
            return self._nothing(active_seq, active_off)
        limit = active_off if self.seq == active_seq else self.spool.size_of(self.seq)
        if self.offset >= limit:
            if self.seq != active_seq and self._advance():
                return self.next_batch()
            return self._nothing(active_seq, active_off)
        res = read_records(self._open(), self.offset, limit, MAX_RECORDS_PER_BATCH, MAX_BYTES_PER_BATCH)
        if res.offset != self.offset:
            self.read_at = time.monotonic()
        self.offset = res.offset
        self.spool.metrics.set_gauge("spool_unread_bytes", self.unread_bytes())
        if res.corrupt:
            self.spool.metrics.dropped(
                "spool_corrupt_record", 1, detail=f"segment {self.seq} at {self.offset}: rest of segment skipped"
            )
            self.offset = limit
        out = []
        for payload in res.payloads:
            try:
                out.append(batch_from_bytes(payload))
            except ValueError as exc:
                self.spool.metrics.dropped("spool_undecodable_record", 1, detail=str(exc))
        spans = sum(len(b) for b in out if isinstance(b, SpanBatch))
        if spans:
            self.spool.metrics.inc("read_spans", spans)
        self._idle = not out
        return self.steps.stamp(coalesce(out))

    def _nothing(self, active_seq: int, active_off: int) -> list:
        self.spool.metrics.set_gauge("spool_unread_bytes", 0)
        if self.stop.is_set() and self.seq >= active_seq and self.offset >= active_off:
            raise StopIteration()
        self._idle = True
        return []

    def next_awake(self) -> datetime | None:
        return self.now() + POLL_INTERVAL if self._idle else None

    def snapshot(self) -> tuple[int, ...]:
        return (self.seq, self.offset, self.steps.next_seq, STATE_VERSION)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _partition_index(name: str, local: list[str]) -> int:
    """The number batches of this partition are stamped with (``Steps``): a shard's number
    (``shard-001`` -> 1), unique across the processes of a cluster; else its local rank."""
    suffix = name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else local.index(name)


class SpoolSource(FixedPartitionedSource[Batch, tuple[int, ...]]):
    """Reads the spool shards that live in this process."""

    def __init__(
        self,
        spools: dict[str, Spool],
        stop: threading.Event | None = None,
        now: Callable[[], datetime] = _utcnow,
        committed: Callable[[str], int | None] | None = None,
        keep_for: timedelta = timedelta(0),
    ) -> None:
        """``committed(part)``: with recovery, the spool segment of the partition's newest
        committed snapshot; segments before it are deleted once it has been committed for
        ``keep_for``. None (no recovery): a segment is deleted as soon as it has been read."""
        self.spools = spools
        self.stop = stop or threading.Event()
        self.now = now
        self.committed = committed
        self.keep_for = keep_for
        self.parts: dict[str, _SpoolPartition] = {}  # built in this process, for ``progress``
        self.created_at = time.monotonic()

    def progress(self) -> tuple[int, float]:
        """(acknowledged bytes not read yet, seconds since the read position last moved) over
        this process's shards, for ``/readyz``. Before the flow built its partitions, everything
        in the spool counts as unread and the time runs from the source's creation."""
        parts = list(self.parts.values())
        if not parts:
            return sum(sp.total_bytes() for sp in self.spools.values()), time.monotonic() - self.created_at
        unread = sum(p.unread_bytes() for p in parts)
        return unread, time.monotonic() - max(p.read_at for p in parts)

    def list_parts(self) -> list[str]:
        return list(self.spools)

    def build_part(self, step_id: str, for_part: str, resume_state: tuple[int, ...] | None):
        index = _partition_index(for_part, sorted(self.spools))
        committed = None if self.committed is None else functools.partial(self.committed, for_part)
        part = self.parts[for_part] = _SpoolPartition(
            self.spools[for_part], resume_state, index, self.stop, self.now, committed, self.keep_for
        )
        return part
