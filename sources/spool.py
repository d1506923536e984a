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
        self._dirty = False
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
        """Append one record; returns (segment, offset after it). Raises SpoolFull."""
        record = encode_record(payload)
        with self._lock:
            if self._closed:
                raise SpoolFull("spool is closed")
            if self.total_bytes() + len(record) > self.budget_bytes:
                raise SpoolFull(f"spool over its budget of {self.budget_bytes} bytes")
            if self._offset and self._offset + len(record) > self.segment_bytes:
                self._rotate()
            try:
                self._write(record)
            except OSError as exc:
                # Disk full or an I/O error: cut the segment back to the last whole record, so
                # the next append follows a good one, and refuse this one (the client retries).
                self._truncate_to(self._offset)
                raise SpoolFull(f"spool append failed: {exc.strerror or exc}") from exc
            if self.fsync == "always":
                os.fdatasync(self._file.fileno())
            else:
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

    def _truncate_to(self, offset: int) -> None:
        try:
            self._file.truncate(offset)
            self._file.seek(offset)
        except OSError:
            log.exception("spool: cannot cut %s back to %d bytes", self._file.name, offset)

    def _rotate(self) -> None:
        if self.fsync != "never":
            os.fdatasync(self._file.fileno())
        self._file.close()
        self._seq += 1
        self._file = open(self.dir / segment_name(self._seq), "ab", buffering=0)
        self._offset = 0
        self._sizes[self._seq] = 0

    def _sync_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                if self._dirty and not self._closed:
                    os.fdatasync(self._file.fileno())
                    self._dirty = False

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
            if self.fsync != "never":
                os.fdatasync(self._file.fileno())
            self._file.close()
