"""Prometheus remote write 1.0, the encoding: window results and scaling updates -> samples ->
a snappy-compressed ``WriteRequest`` (hand-encoded protobuf; labels sorted by name, samples
of a series in time order). Pure functions."""

from __future__ import annotations

import struct

import cramjam

from pipeline.dimensions import labels as dimension_labels
from pipeline.model import SPAN_KINDS, ScalingUpdate, WindowResult

STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.95", "p95"), ("0.99", "p99"), ("1", "max"))

Labels = tuple[tuple[str, str], ...]  # sorted by name, __name__ included


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_series(labels: Labels, samples: list[tuple[int, float]]) -> bytes:
    """One series -> a WriteRequest's ``timeseries`` field (samples in time order)."""
    ts = bytearray()
    for name, value in labels:
        ts += _field(1, _field(1, name.encode()) + _field(2, value.encode()))
    for t, v in sorted(samples, key=lambda s: s[0]):
        # Sample{double value = 1; int64 timestamp = 2;}
        ts += _field(2, b"\x09" + struct.pack("<d", v) + b"\x10" + _varint(t & 0xFFFFFFFFFFFFFFFF))
    return _field(1, bytes(ts))


def compress(fields: list[bytes]) -> bytes:
    """Encoded series -> the snappy-compressed WriteRequest body."""
    return bytes(cramjam.snappy.compress_raw(b"".join(fields)))


def encode_write_request(series: list[tuple[Labels, list[tuple[int, float]]]]) -> bytes:
    """[(labels, [(timestamp ms, value)])] -> snappy-compressed WriteRequest."""
    return compress([encode_series(labels, samples) for labels, samples in series])


def labels_of(name: str, **labels: str) -> Labels:
    items = [("__name__", name)] + [(k, v) for k, v in labels.items() if v != ""]
    return tuple(sorted(items))


def samples_of(item) -> list[tuple[Labels, int, float]]:
    """One window result or scaling update -> (labels, timestamp ms, value) samples."""
    out = []
    if isinstance(item, WindowResult):
        t = item.window_end // 1_000_000
        kind = SPAN_KINDS[item.span_kind] if 0 <= item.span_kind < len(SPAN_KINDS) else str(item.span_kind)
        name, dims = dimension_labels(item.operation)
        base = {"service_name": item.service, "span_name": name, "span_kind": kind, **dict(dims)}
        out.append((labels_of("telepipe_window_calls", **base), t, float(item.count)))
        out.append((labels_of("telepipe_window_errors", **base), t, float(item.errors)))
        for q, attr in QUANTILES:
            out.append((labels_of("telepipe_window_latency_seconds", **base, quantile=q), t, getattr(item, attr)))
    elif isinstance(item, ScalingUpdate):
        t = item.time // 1_000_000
        out.append((labels_of("telepipe_desired_replicas", service_name=item.service), t, float(item.desired)))
        out.append((labels_of("telepipe_observed_replicas", service_name=item.service), t, float(item.observed)))
    return out
