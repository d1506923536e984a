"""The spool: append-only segment files of length-prefixed, checksummed records.

The receiver answers OK only after ``Spool.append`` returned, so an
acknowledged request survives a crash of the daemon (kill -9): the record is in
the kernel's page cache at least, and on disk according to the fsync policy:

- ``always``: fdatasync after every append, before the ack (survives power loss).
- ``interval`` (default): a background thread fdatasyncs every
  ``fsync_interval_ms``; a power loss can lose at most that much acknowledged
  data, a process crash loses none.
- ``never``: the kernel writes back when it likes (process crashes lose nothing).

Record: ``<u32 payload length><u32 crc32 of payload><payload>``. Segments are
named by a 16-digit sequence number and rotate at ``segment_bytes``. When the
bytes on disk exceed ``budget_bytes``, ``append`` raises ``SpoolFull`` and the
receiver answers UNAVAILABLE with RetryInfo (backpressure, not drops).

Failures never leave a half-written or unacknowledged record within what
readers read (see below), and never ack what the policy cannot promise. Each is counted as
``spool_failures{op}``, logged, and refused with ``SpoolFull`` (so the client
retries) instead of escaping as an OSError:

- ``write`` (disk full, I/O error): the segment is cut back to its last whole,
  acknowledged record and stays the active one.
- ``fsync`` in ``always`` mode: the same cut; then the segment is abandoned (no
  more appends to it): Linux may have dropped the failed pages and reports the
  error only once, so a later fsync of that file proves nothing. The next
  append starts a new segment (an abandoned segment left empty is deleted).
- ``fsync`` in ``interval`` mode (the background thread, or the old segment's
  sync at rotation): the acknowledged tail's durability is unknown, so appends
  are refused ("spool fsync failing; retry later") until the thread has started
  a new segment and an fsync of it succeeded. The thread survives the failure
  and tries again every interval. What was acknowledged stays readable.
- ``rotate`` (the new segment cannot be opened: EMFILE, ENOSPC, EACCES): the new
  segment is opened before the current one is touched, so the current one stays
  active and intact; the append that needed the new segment is refused and the
  next append tries again (rather than letting the segment grow past
  ``segment_bytes``: a stuck rotation shows as refusals, not as one huge file).

The writer's offset always equals the end of the last acknowledged record, and
readers of the active segment stop there (``committed``); readers of a sealed
segment stop at ``size_of``. If even cutting a segment back fails, it is
abandoned like after an fsync failure, its extra tail beyond ``size_of`` is never
read while the daemon runs, and the start-up check below treats it as a torn
tail (or, if it is a whole record, reads it once more: at-least-once).

At start-up every segment is checked; a torn or corrupt tail is truncated at
the last good record and the loss is counted. A new segment is started on each
start, so old segments are never appended to.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.selfmetrics import SelfMetrics
from pipeline.threads import loop_forever

log = logging.getLogger("telepipe.spool")

RECORD_HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 256 * 1024 * 1024
_SUFFIX = ".seg"


class SpoolFull(Exception):
    """The spool cannot take this record now (over budget, disk full); retry later."""


def segment_name(seq: int) -> str:
    return f"{seq:016d}{_SUFFIX}"


def list_segments(directory: Path) -> list[int]:
    return sorted(int(p.name[: -len(_SUFFIX)]) for p in directory.glob(f"*{_SUFFIX}") if p.name[:-4].isdigit())


def encode_record(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass
class ReadResult:
    payloads: list[bytes]
    offset: int  # where the next read starts
    corrupt: bool  # a bad record was found at ``offset``; nothing after it is readable


def read_records(f, offset: int, limit: int, max_records: int, max_bytes: int) -> ReadResult:
    """Read complete, valid records from ``offset`` up to ``limit`` (a file position).

    ``limit`` is a record boundary (the writer's committed offset, or the file
    size of a sealed segment), so a record running past it is torn.
    """
    payloads: list[bytes] = []
    f.seek(offset)
    buf = f.read(min(limit - offset, max_bytes)) if limit > offset else b""
    i = 0
    while len(payloads) < max_records and i + RECORD_HEADER.size <= len(buf):
        length, crc = RECORD_HEADER.unpack_from(buf, i)
        end = i + RECORD_HEADER.size + length
        if length > MAX_RECORD_BYTES or offset + end > limit:
            return ReadResult(payloads, offset + i, True)
        if end > len(buf):  # cut by max_bytes
            if payloads:
                break
            f.seek(offset + i)  # one record larger than max_bytes: read it whole
            buf, offset, i = f.read(RECORD_HEADER.size + length), offset + i, 0
            end = RECORD_HEADER.size + length
            if len(buf) < end:
                return ReadResult(payloads, offset, True)
        payload = buf[i + RECORD_HEADER.size : end]
        if zlib.crc32(payload) != crc:
            return ReadResult(payloads, offset + i, True)
        payloads.append(payload)
        i = end
    if i < len(buf) and not payloads and i + RECORD_HEADER.size > limit - offset:
        return ReadResult(payloads, offset + i, True)  # a partial header at the very end
    return ReadResult(payloads, offset + i, False)


def scan_segment(path: Path) -> tuple[int, int]:
    """(good length, bad records found) of a segment, checking every record."""
    good = 0
    bad = 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        while good < size:
            res = read_records(f, good, size, 1024, 16 * 1024 * 1024)
            good = res.offset
            if res.corrupt or not res.payloads:
                if good < size:
                    bad += 1
                break
    return good, bad


class Spool:
    """One shard's spool directory: a thread-safe writer plus what readers need."""

    def __init__(
        self,
        directory: str | Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        budget_bytes: int = 1024 * 1024 * 1024,
        fsync: str = "interval",
        fsync_interval_ms: int = 1000,
        metrics: SelfMetrics | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.budget_bytes = budget_bytes
        self.fsync = fsync
        self.metrics = metrics or SelfMetrics()
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        last = self._recover()
        self._seq = last + 1  # never reuse a number, even of an empty segment
        self._file = open(self.dir / segment_name(self._seq), "ab", buffering=0)
        self._offset = 0
        self._sizes[self._seq] = 0
        self._dirty = False  # interval mode: written since the last fsync
        self._abandoned = False  # the active segment takes no more appends (see _abandon)
        self._sync_failing = False  # interval mode: the last fsync failed; appends are refused
        self._closed = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync == "interval":
            self._syncer = threading.Thread(
                target=self._sync_loop, args=(fsync_interval_ms / 1000.0,), name="spool-fsync", daemon=True
            )
            self._syncer.start()
        self._publish_bytes()

    # -- start-up
    def _recover(self) -> int:
        """Check every segment; returns the highest sequence number found."""
        segments = list_segments(self.dir)
        for seq in segments:
            path = self.dir / segment_name(seq)
            good, bad = scan_segment(path)
            size = path.stat().st_size
            if good < size:
                with open(path, "r+b") as f:
                    f.truncate(good)
                self.metrics.dropped("spool_corrupt_tail", bad, detail=f"{path.name}: {size - good} bytes truncated")
            if good == 0:
                path.unlink()
                continue
            self._sizes[seq] = good
        return max(segments, default=0)

    # -- writing
    def append(self, payload: bytes) -> tuple[int, int]:
        """Append one record; returns (segment, offset after it). Raises SpoolFull, never OSError."""
        record = encode_record(payload)
        with self._lock:
            if self._closed:
                raise SpoolFull("spool is closed")
            if self._sync_failing:
                raise SpoolFull("spool fsync failing; retry later")
            if self.total_bytes() + len(record) > self.budget_bytes:
                raise SpoolFull(f"spool over its budget of {self.budget_bytes} bytes")
            if self._abandoned or (self._offset and self._offset + len(record) > self.segment_bytes):
                self._rotate()
            try:
                self._write(record)
            except OSError as exc:
                # Disk full or an I/O error: cut the segment back to the last whole record, so
                # the next append follows a good one, and refuse this one (the client retries).
                self._failed("write", exc)
                self._cut_back()
                raise SpoolFull(f"spool write failed: {_reason(exc)}; retry later") from exc
            if self.fsync == "always":
                try:
                    os.fdatasync(self._file.fileno())
                except OSError as exc:
                    # The record is not durable, so it is not acknowledged: cut it off. Earlier
                    # records were synced by their own appends and stay.
                    self._failed("fsync", exc)
                    self._cut_back()
                    self._abandon()
                    raise SpoolFull(f"spool fsync failed: {_reason(exc)}; retry later") from exc
            elif self.fsync == "interval":
                self._dirty = True
            self._offset += len(record)
            self._sizes[self._seq] = self._offset
            self.metrics.set_gauge("spool_bytes", self.total_bytes())
            return self._seq, self._offset

    def _write(self, record: bytes) -> None:
        view = memoryview(record)
        while view:
            written = self._file.write(view)
            view = view[written:]

    def _failed(self, op: str, exc: OSError, seq: int | None = None) -> None:
        self.metrics.inc("spool_failures", 1, op)
        log.error("spool %s: %s failed on segment %d: %s", self.dir, op, self._seq if seq is None else seq, exc)

    def _cut_back(self) -> None:
        """Truncate the active segment to the end of its last acknowledged record."""
        try:
            self._file.truncate(self._offset)
            self._file.seek(self._offset)
        except OSError:
            # The file now has bytes past ``_offset`` and, opened for append, would write after
            # them: misframed for readers. Readers stop at ``_offset``; no more appends to it.
            log.exception("spool: cannot cut %s back to %d bytes", self._file.name, self._offset)
            self._abandon()

    def _abandon(self) -> None:
        """Append no more to the active segment: the next append (or, in interval mode, the
        fsync thread) starts a new one. After a failed fsync the kernel may have dropped the
        segment's dirty pages and reports that only once, so its later fsyncs prove nothing."""
        self._abandoned = True

    def _rotate(self) -> None:
        """Make a new segment the active one. Raises SpoolFull (counted) when that fails.

        The new segment is opened before the current one is touched: if that fails, the
        current one stays active and intact, and the next append tries again.
        """
        seq = self._seq + 1
        try:
            new = open(self.dir / segment_name(seq), "ab", buffering=0)
        except OSError as exc:
            self._failed("rotate", exc, seq)
            raise SpoolFull(f"spool rotate failed: cannot start segment {seq}: {_reason(exc)}; retry later") from exc
        old, old_seq = self._file, self._seq
        sync_error: OSError | None = None
        if self._dirty:  # interval mode: seal the old segment durable
            try:
                os.fdatasync(old.fileno())
            except OSError as exc:
                sync_error = exc
        try:
            old.close()
        except OSError as exc:  # the data is written (and synced, if the policy asks): nothing lost
            log.warning("spool: closing segment %d failed: %s", old_seq, exc)
        if self._sizes.get(old_seq) == 0:  # an abandoned empty segment: do not pile them up
            try:
                self.path_of(old_seq).unlink()
                del self._sizes[old_seq]
            except OSError:
                pass  # kept as an empty sealed segment; removed at the next start
        self._file, self._seq, self._offset = new, seq, 0
        self._sizes[seq] = 0
        self._abandoned = False
        self._dirty = False
        if sync_error is not None:
            # Records acknowledged in the old segment may not be on disk: stop promising
            # durability until an fsync works again (the fsync thread tries the new segment).
            self._failed("fsync", sync_error, old_seq)
            self._sync_failing = True
            raise SpoolFull(f"spool fsync failed: {_reason(sync_error)}; retry later") from sync_error

    def _sync_loop(self, interval: float) -> None:
        loop_forever("spool-fsync", self.metrics, self._sync_once, self._stop, interval)

    def _sync_once(self) -> None:
        """One tick of the interval fsync; its failures are counted and retried next tick."""
        with self._lock:
            if self._closed or not (self._dirty or self._sync_failing or self._abandoned):
                return
            if self._abandoned:
                try:
                    self._rotate()  # counted as op="rotate" when it fails
                except SpoolFull:
                    return
            try:
                os.fdatasync(self._file.fileno())
            except OSError as exc:
                # Another fsync of this file would report success (the error is reported once)
                # without bringing the lost pages back: not dirty any more, but abandoned.
                self._failed("fsync", exc)
                self._dirty = False
                if not self._sync_failing:
                    log.error("spool %s: refusing appends until an fsync succeeds on a new segment", self.dir)
                self._sync_failing = True
                self._abandon()
                return
            self._dirty = False
            if self._sync_failing:
                self._sync_failing = False
                log.warning("spool %s: fsync works again on segment %d; accepting appends", self.dir, self._seq)

    # -- what readers see
    def committed(self) -> tuple[int, int]:
        """(active segment, bytes written to it): readers never read past this."""
        with self._lock:
            return self._seq, self._offset

    def segments(self) -> list[int]:
        with self._lock:
            return sorted(self._sizes)

    def size_of(self, seq: int) -> int:
        with self._lock:
            return self._sizes.get(seq, 0)

    def path_of(self, seq: int) -> Path:
        return self.dir / segment_name(seq)

    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def over_budget(self) -> bool:
        return self.total_bytes() > self.budget_bytes

    def retire_before(self, seq: int) -> None:
        """Delete sealed segments older than ``seq`` (their records were consumed)."""
        with self._lock:
            for old in [s for s in self._sizes if s < seq and s != self._seq]:
                try:
                    self.path_of(old).unlink()
                except FileNotFoundError:
                    pass
                del self._sizes[old]
            self._publish_bytes()

    def _publish_bytes(self) -> None:
        self.metrics.set_gauge("spool_bytes", self.total_bytes())

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._dirty:
                try:
                    os.fdatasync(self._file.fileno())
                except OSError as exc:
                    self._failed("fsync", exc)
            try:
                self._file.close()
            except OSError as exc:
                log.warning("spool: closing segment %d failed: %s", self._seq, exc)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
