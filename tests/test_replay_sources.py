"""Recording formats: plain, .gz and .zst OTLP/JSON lines, and native recordings from --record."""

import gzip
import time

import grpc
import orjson
import zstandard

from pipeline.config import Config
from telepipe import daemon

from .conftest import TRAINTICKET
from .test_decode import trace_request


def replay_lines(tmp_path, paths):
    out = tmp_path / f"out{time.monotonic_ns()}.jsonl"
    summary, metrics = daemon.replay(Config(), [str(p) for p in paths], emit_jsonl=str(out))
    return out.read_bytes(), summary, metrics


def test_compressed_recordings_replay_identically(tmp_path):
    raw = TRAINTICKET.read_bytes()
    gz = tmp_path / "tt.otlp.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    zst = tmp_path / "tt.otlp.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(raw))
    plain, summary, metrics = replay_lines(tmp_path, [TRAINTICKET])
    assert summary.spans == 4890
    assert metrics.counter("processed_logs") == 2489
    assert replay_lines(tmp_path, [gz])[0] == plain
    assert replay_lines(tmp_path, [zst])[0] == plain


def test_bad_lines_are_counted_and_skipped(tmp_path):
    bad = tmp_path / "mixed.jsonl"
    good_lines = TRAINTICKET.read_bytes().splitlines()[:20]
    bad.write_bytes(b"\n".join([good_lines[0], b"{not json", b"[1,2]", *good_lines[1:]]) + b"\n")
    _, summary, metrics = replay_lines(tmp_path, [bad])
    assert metrics.counter("dropped", "recording_bad_line") == 2
    assert summary.spans > 0


def test_record_then_replay_native(daemon_factory, tmp_path):
    rec = tmp_path / "rec"
    d = daemon_factory("", ["--record", str(rec)])
    channel = grpc.insecure_channel(d.grpc_target)
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None, response_deserializer=None,
    )  # fmt: skip
    base = 1_700_000_000_000_000_000
    for i in range(20):
        spans = [{"name": f"op{j % 3}", "start": base + i * 10**9, "end": base + i * 10**9 + (j + 1) * 10**6}
                 for j in range(25)]  # fmt: skip
        export(trace_request(spans), timeout=10)
    channel.close()
    d.stop()
    out, summary, _ = replay_lines(tmp_path, [rec])
    assert summary.spans == 500
    lines = [x for x in map(orjson.loads, out.splitlines()) if x["type"] == "window"]
    assert {x["operation"] for x in lines} == {"op0", "op1", "op2"}
    assert sum(x["count"] for x in lines) == 500
