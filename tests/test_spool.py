import errno
import os
import threading
import time

import pytest

from pipeline.selfmetrics import SelfMetrics
from sources import spool as spool_module
from sources.spool import Spool, SpoolFull, list_segments, read_records, scan_segment, segment_name


def read_all(spool):
    out = []
    for seq in list_segments(spool.dir):
        path = spool.path_of(seq)
        with open(path, "rb") as f:
            off, size = 0, path.stat().st_size
            while True:
                res = read_records(f, off, size, 100, 1 << 20)
                out.extend(res.payloads)
                off = res.offset
                if not res.payloads:
                    break
    return out


def test_append_read_and_rotate(tmp_path):
    sp = Spool(tmp_path, segment_bytes=4096, budget_bytes=1 << 20, fsync="always")
    payloads = [bytes([i]) * 1000 for i in range(10)]
    for p in payloads:
        sp.append(p)
    assert len(sp.segments()) >= 3  # rotated at 4 KiB
    assert read_all(sp) == payloads
    sp.close()


def test_budget_refuses_with_spoolfull(tmp_path):
    sp = Spool(tmp_path, segment_bytes=4096, budget_bytes=8192, fsync="never")
    with pytest.raises(SpoolFull):
        for _ in range(100):
            sp.append(b"x" * 1000)
    assert sp.total_bytes() <= 8192
    # consuming and retiring old segments makes room again
    sp.retire_before(sp.committed()[0])
    sp.append(b"y" * 1000)
    sp.close()


def test_torn_tail_is_truncated_and_counted_at_startup(tmp_path):
    sp = Spool(tmp_path, segment_bytes=1 << 20, budget_bytes=1 << 22, fsync="never")
    for i in range(5):
        sp.append(b"r%d" % i * 100)
    sp.close()
    seg = tmp_path / segment_name(sp.committed()[0])
    with open(seg, "ab") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00")  # a header cut short by a crash
    metrics = SelfMetrics()
    again = Spool(tmp_path, metrics=metrics)
    assert read_all(again) == [b"r%d" % i * 100 for i in range(5)]
    assert metrics.counter("dropped", "spool_corrupt_tail") == 1
    again.close()


def test_corrupt_record_detected_by_checksum(tmp_path):
    sp = Spool(tmp_path, fsync="never")
    sp.append(b"a" * 50)
    sp.append(b"b" * 50)
    sp.close()
    seg = tmp_path / segment_name(sp.committed()[0])
    data = bytearray(seg.read_bytes())
    data[-10] ^= 0xFF  # flip a byte in the second record's payload
    seg.write_bytes(bytes(data))
    metrics = SelfMetrics()
    again = Spool(tmp_path, metrics=metrics)
    assert read_all(again) == [b"a" * 50]
    assert metrics.counter("dropped", "spool_corrupt_tail") == 1
    again.close()


def test_new_segment_each_start_and_empty_ones_removed(tmp_path):
    a = Spool(tmp_path, fsync="never")
    a.close()
    b = Spool(tmp_path, fsync="never")
    b.append(b"z")
    b.close()
    names = sorted(os.listdir(tmp_path))
    assert names == [segment_name(2)]


# -- failures: every acknowledged record is read back once, in order; nothing else is


def read_committed(spool):
    """What a live reader sees (as sources/spool_source.py reads): sealed segments up to
    ``size_of``, the active one up to the committed offset."""
    active, committed = spool.committed()
    out = []
    for seq in spool.segments():
        limit = committed if seq == active else spool.size_of(seq)
        with open(spool.path_of(seq), "rb") as f:
            res = read_records(f, 0, limit, 10_000, 1 << 26)
        assert not res.corrupt and res.offset == limit, f"segment {seq}: misframed at {res.offset} of {limit}"
        out += res.payloads
    return out


def assert_segments_clean(spool):
    """Every segment file holds whole records only, as the start-up check would find it."""
    for seq in list_segments(spool.dir):
        path = spool.path_of(seq)
        assert scan_segment(path) == (path.stat().st_size, 0), path.name


def failing_fdatasync(monkeypatch, fail):
    """Replace os.fdatasync (as the spool module calls it): raises EIO while ``fail()`` says so."""
    real = spool_module.os.fdatasync
    calls = []

    def fdatasync(fd):
        calls.append(fd)
        if fail():
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(spool_module.os, "fdatasync", fdatasync)
    return calls


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_always_fsync_failure_refuses_then_continues_on_a_new_segment(tmp_path, monkeypatch):
    metrics = SelfMetrics()
    sp = Spool(tmp_path, fsync="always", metrics=metrics)
    calls = failing_fdatasync(monkeypatch, lambda: len(calls) == 3)  # the 3rd append's fsync
    payloads = [b"p%d" % i * 50 for i in range(6)]
    acked = []
    for i, p in enumerate(payloads):
        if i == 2:
            with pytest.raises(SpoolFull, match="fsync failed"):
                sp.append(p)
            first = sp.committed()
            assert first[1] == sp.path_of(first[0]).stat().st_size == 2 * (8 + 100)  # cut back to p1
        else:
            acked.append(p)
            sp.append(p)
    assert sp.committed()[0] > first[0]  # the segment whose fsync failed took no more appends
    assert metrics.counter("spool_failures", "fsync") == 1
    assert read_committed(sp) == acked == read_all(sp)
    assert_segments_clean(sp)
    sp.close()


def test_fsync_failure_on_a_fresh_segment_leaves_no_empty_segments_behind(tmp_path, monkeypatch):
    metrics = SelfMetrics()
    sp = Spool(tmp_path, fsync="always", metrics=metrics)
    fail = [True]
    failing_fdatasync(monkeypatch, lambda: fail[0])
    for _ in range(5):
        with pytest.raises(SpoolFull, match="fsync failed"):
            sp.append(b"x" * 10)
    fail[0] = False
    sp.append(b"y" * 10)
    assert metrics.counter("spool_failures", "fsync") == 5
    assert read_committed(sp) == [b"y" * 10] == read_all(sp)
    assert len(list_segments(tmp_path)) == 1  # the abandoned ones were empty: removed
    sp.close()


def test_new_segment_failing_after_an_fsync_failure_keeps_refusing_until_it_works(tmp_path, monkeypatch):
    metrics = SelfMetrics()
    sp = Spool(tmp_path, fsync="always", metrics=metrics)
    sp.append(b"a" * 10)
    fail_sync = [True]
    failing_fdatasync(monkeypatch, lambda: fail_sync[0])
    with pytest.raises(SpoolFull, match="fsync failed"):
        sp.append(b"b" * 10)
    fail_sync[0] = False
    no_files = NoNewSegments(monkeypatch)
    for _ in range(3):
        with pytest.raises(SpoolFull, match="rotate failed"):
            sp.append(b"c" * 10)
    assert metrics.counter("spool_failures", "rotate") == 3
    no_files.undo()
    sp.append(b"d" * 10)
    assert read_committed(sp) == [b"a" * 10, b"d" * 10] == read_all(sp)
    assert_segments_clean(sp)
    sp.close()


class NoNewSegments:
    """``open`` in the spool module fails for new segments (EMFILE) until ``undo``."""

    def __init__(self, monkeypatch, err=errno.EMFILE):
        self.failing = True

        def fake_open(path, mode="r", *args, **kw):
            if self.failing and "a" in mode:
                raise OSError(err, os.strerror(err), str(path))
            return open(path, mode, *args, **kw)

        monkeypatch.setattr(spool_module, "open", fake_open, raising=False)

    def undo(self):
        self.failing = False


@pytest.mark.parametrize("mode", ["always", "interval", "never"])
def test_rotate_whose_new_segment_cannot_be_opened_refuses_and_keeps_the_spool_usable(tmp_path, monkeypatch, mode):
    metrics = SelfMetrics()
    sp = Spool(tmp_path, segment_bytes=4096, fsync=mode, fsync_interval_ms=3_600_000, metrics=metrics)
    payloads = [bytes([i]) * 1000 for i in range(8)]
    for p in payloads[:4]:
        sp.append(p)  # 4 x 1008 bytes: the 5th needs a new segment
    before = sp.committed()
    no_files = NoNewSegments(monkeypatch)
    for _ in range(2):
        with pytest.raises(SpoolFull, match="rotate failed.*Too many open files"):
            sp.append(payloads[4])
    assert sp.committed() == before  # still the active segment, intact
    assert metrics.counter("spool_failures", "rotate") == 2
    assert read_committed(sp) == payloads[:4]
    no_files.undo()
    for p in payloads[4:]:
        sp.append(p)
    assert sp.committed()[0] > before[0]
    assert read_committed(sp) == payloads == read_all(sp)
    assert_segments_clean(sp)
    sp.close()


def test_interval_rotate_whose_old_segment_fsync_fails_refuses_until_an_fsync_works(tmp_path, monkeypatch):
    metrics = SelfMetrics()
    sp = Spool(tmp_path, segment_bytes=4096, fsync="interval", fsync_interval_ms=3_600_000, metrics=metrics)
    payloads = [bytes([i]) * 1000 for i in range(6)]
    for p in payloads[:4]:
        sp.append(p)  # acknowledged, not yet synced (the thread waits an hour)
    fail = [True]
    failing_fdatasync(monkeypatch, lambda: fail[0])
    with pytest.raises(SpoolFull, match="fsync failed"):
        sp.append(payloads[4])  # needs a new segment; sealing the old one fails
    with pytest.raises(SpoolFull, match="fsync failing"):
        sp.append(payloads[4])
    assert metrics.counter("spool_failures", "fsync") == 1
    assert read_committed(sp) == payloads[:4]  # acknowledged data stays readable
    fail[0] = False
    sp._sync_once()  # the fsync thread's next tick
    for p in payloads[4:]:
        sp.append(p)
    assert read_committed(sp) == payloads == read_all(sp)
    assert_segments_clean(sp)
    sp.close()


def test_interval_fsync_thread_survives_failures_and_appends_wait_for_it(tmp_path, monkeypatch):
    metrics = SelfMetrics()
    fail = threading.Event()
    calls = failing_fdatasync(monkeypatch, fail.is_set)
    sp = Spool(tmp_path, fsync="interval", fsync_interval_ms=10, metrics=metrics)
    sp.append(b"a" * 100)
    wait_until(lambda: calls)  # the thread synced it
    fail.set()
    sp.append(b"b" * 100)  # acknowledged before the thread noticed
    wait_until(lambda: metrics.counter("spool_failures", "fsync") >= 1)
    with pytest.raises(SpoolFull, match="spool fsync failing; retry later"):
        sp.append(b"c" * 100)
    wait_until(lambda: metrics.counter("spool_failures", "fsync") >= 3)  # it keeps trying, every interval
    assert sp._syncer.is_alive()
    with pytest.raises(SpoolFull, match="fsync failing"):
        sp.append(b"c" * 100)
    assert read_committed(sp) == [b"a" * 100, b"b" * 100]  # acknowledged data stays readable
    fail.clear()

    def accepted():
        try:
            sp.append(b"d" * 100)
            return True
        except SpoolFull:
            return False

    wait_until(accepted)
    synced = len(calls)
    wait_until(lambda: len(calls) > synced)  # later syncs happen
    sp.append(b"e" * 100)
    assert sp.committed()[0] > 1  # the segment whose fsync failed took no more appends
    assert metrics.counter("thread_errors", "spool-fsync") == 0  # failures handled, not survived by luck
    assert read_committed(sp) == [b"a" * 100, b"b" * 100, b"d" * 100, b"e" * 100] == read_all(sp)
    assert_segments_clean(sp)
    sp.close()


class TruncateFails:
    """A segment file whose truncate fails: the cut back after a failed write fails too."""

    def __init__(self, f):
        self._f = f

    def truncate(self, size):
        raise OSError(errno.EIO, "Input/output error")

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_write_failure_whose_cut_back_fails_abandons_the_segment(tmp_path):
    metrics = SelfMetrics()
    sp = Spool(tmp_path, fsync="never", metrics=metrics)
    sp.append(b"a" * 100)
    real_write = sp._write

    def half(record):
        real_write(record[: len(record) // 2])  # half of it reached the file, then EIO
        raise OSError(errno.EIO, "Input/output error")

    sp._write = half
    sp._file = TruncateFails(sp._file)
    with pytest.raises(SpoolFull) as err:
        sp.append(b"b" * 100)
    sp._write = real_write
    sp.append(b"c" * 100)
    sp.append(b"d" * 100)
    assert read_committed(sp) == [b"a" * 100, b"c" * 100, b"d" * 100]  # not appended after the torn half
    assert "write failed" in str(err.value)
    assert metrics.counter("spool_failures", "write") == 1
    sp.close()
    # At the next start the torn half record is found and cut off; nothing else is lost.
    again = Spool(tmp_path, fsync="never", metrics=metrics)
    assert read_all(again) == [b"a" * 100, b"c" * 100, b"d" * 100]
    assert metrics.counter("dropped", "spool_corrupt_tail") == 1
    again.close()


def test_spool_source_reads_each_acknowledged_batch_once_across_failures(tmp_path, monkeypatch):
    from pipeline.batch_codec import encode
    from pipeline.decode import decode_traces
    from sources.spool_source import SpoolSource

    from .test_decode import trace_request

    sp = Spool(tmp_path, segment_bytes=600, fsync="always")
    part = SpoolSource({"shard-000": sp}).build_part("read", "shard-000", None)
    fail_sync = [False]
    failing_fdatasync(monkeypatch, lambda: fail_sync[0])
    no_files = NoNewSegments(monkeypatch)
    no_files.undo()
    acked, read = [], []
    for i in range(40):
        fail_sync[0] = i % 7 == 3
        no_files.failing = i % 11 == 5
        payload = encode(decode_traces(trace_request([{"end": 2_000_000_000 + i}])).batch)
        try:
            sp.append(payload)
            acked.append(2_000_000_000 + i)
        except SpoolFull:
            pass
        if i % 3 == 0:  # the reader runs alongside, sometimes on the segment being written
            read += [int(t) for b in part.next_batch() for t in b.end_ns]
    for _ in range(50):
        read += [int(t) for b in part.next_batch() for t in b.end_ns]
    assert len(acked) < 40 and read == acked
    part.close()
    sp.close()


def test_receiver_answers_unavailable_with_retryinfo_while_fsync_fails(tmp_path, monkeypatch):
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from pipeline.config import OtlpConfig
    from sources.otlp_grpc import OtlpReceiver

    from .conftest import free_port
    from .test_decode import trace_request
    from .test_receiver import TRACES, call, spooled

    metrics = SelfMetrics()
    sp = Spool(tmp_path / "spool", fsync="always", metrics=metrics)
    cfg = OtlpConfig(grpc_listen=f"127.0.0.1:{free_port()}")
    rx = OtlpReceiver(cfg, sp, metrics, retry_after_ms=700)
    rx.start()
    ch = grpc.insecure_channel(cfg.grpc_listen)
    fail = [False]
    failing_fdatasync(monkeypatch, lambda: fail[0])
    try:
        call(ch, TRACES, trace_request([{}] * 2))
        fail[0] = True
        with pytest.raises(grpc.RpcError) as err:
            call(ch, TRACES, trace_request([{}] * 3))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "fsync failed" in err.value.details()
        infos = [d for d in rpc_status.from_call(err.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(infos) == 1
        info = error_details_pb2.RetryInfo()
        infos[0].Unpack(info)
        assert (info.retry_delay.seconds, info.retry_delay.nanos) == (0, 700_000_000)
        fail[0] = False  # the fault clears; the client's retry is accepted
        call(ch, TRACES, trace_request([{}] * 5))
        assert [len(b) for b in spooled(sp)] == [2, 5]
        assert metrics.counter("spool_failures", "fsync") == 1
        assert metrics.counter("refused_requests", "spool_append") == 1
        assert metrics.counter("accepted_spans") == 7
    finally:
        ch.close()
        rx.stop(0)
        sp.close()
