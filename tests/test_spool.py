import os

import pytest

from pipeline.selfmetrics import SelfMetrics
from sources.spool import Spool, SpoolFull, list_segments, read_records, segment_name


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
