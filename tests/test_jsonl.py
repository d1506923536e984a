"""--emit-jsonl across restarts: cut back to the snapshot, never padded, never another file's length."""

import logging

from sinks.jsonl import JsonlSink

from .factories import result


def resumed(path, state):
    return JsonlSink(str(path)).build_part("out", "jsonl", state)


def test_resumed_onto_the_same_file_it_is_cut_back_to_the_snapshot(tmp_path):
    out = tmp_path / "w.jsonl"
    part = JsonlSink(str(out)).build_part("out", "jsonl", None)
    part.write_batch([result("a")])
    state = part.snapshot()
    part.write_batch([result("b")])  # written after the snapshot: re-emitted after a crash
    part.close()
    part = resumed(out, state)
    part.write_batch([result("b")])
    part.close()
    lines = out.read_bytes().splitlines()
    assert len(lines) == 2 and b'"b"' in lines[1]


def test_resumed_onto_a_missing_shorter_or_other_file_it_starts_clean(tmp_path, caplog):
    out = tmp_path / "w.jsonl"
    part = JsonlSink(str(out)).build_part("out", "jsonl", None)
    part.write_batch([result(f"op{i}") for i in range(50)])
    state = part.snapshot()
    part.close()
    caplog.set_level(logging.WARNING)
    for case in ("missing", "shorter", "other path", "old int state"):
        target = out
        if case == "missing":
            out.unlink()
        elif case == "shorter":
            out.write_bytes(b"{}\n")
        elif case == "other path":
            target = tmp_path / "elsewhere.jsonl"
            target.write_bytes(b"x" * 100_000)  # someone else's file, longer than the snapshot
        part = resumed(target, state if case != "old int state" else 10**6)
        part.write_batch([result("after")])
        part.close()
        data = target.read_bytes()
        assert b"\x00" not in data and data.count(b"\n") == 1 and b'"after"' in data, case
        out.write_bytes(b"")
    assert sum("starting it clean" in r.message for r in caplog.records) == 4
