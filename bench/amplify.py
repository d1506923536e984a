"""Amplify recordings into a native recording: time-shifted copies with rewritten ids.

The shared recordings are 1-3 minutes long; benchmarks need more. Copy k of the
whole recording is shifted by k times its duration (plus one window) and gets
its trace and span ids xor-ed with k, so it looks like fresh traffic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.batch_codec import encode
from pipeline.model import LogBatch, SpanBatch
from pipeline.selfmetrics import SelfMetrics
from sources.replay import iter_batches
from sources.spool import Spool


def load(paths: list[Path]) -> list[SpanBatch | LogBatch]:
    metrics = SelfMetrics()
    return [b for p in paths for b in iter_batches(Path(p), metrics)]


def _span_bounds(batches) -> tuple[int, int]:
    ends = [b.end_ns for b in batches if isinstance(b, SpanBatch) and len(b)]
    all_ends = np.concatenate(ends)
    return int(all_ends.min()), int(all_ends.max())


def _rewrite(ids: np.ndarray, k: int) -> np.ndarray:
    width = ids.dtype.itemsize
    raw = np.frombuffer(ids.tobytes(), dtype=np.uint8).reshape(-1, width).copy()
    raw[:, -1] ^= k & 0xFF
    raw[:, 0] ^= (k >> 8) & 0xFF
    return raw.reshape(-1).view(f"S{width}")


def shifted(batch: SpanBatch | LogBatch, shift_ns: int, k: int) -> SpanBatch | LogBatch:
    if isinstance(batch, SpanBatch):
        return dataclasses.replace(
            batch,
            end_ns=batch.end_ns + shift_ns,
            trace_id=_rewrite(batch.trace_id, k),
            span_id=_rewrite(batch.span_id, k),
            parent_span_id=_rewrite(batch.parent_span_id, k),
        )
    return dataclasses.replace(batch, time_ns=batch.time_ns + shift_ns)


def amplify(batches, copies: int, window_ns: int = 10_000_000_000):
    """Yield ``copies`` back-to-back time-shifted copies of ``batches``."""
    first, last = _span_bounds(batches)
    period = (last - first) // window_ns * window_ns + 2 * window_ns
    for k in range(copies):
        for b in batches:
            yield shifted(b, k * period, k) if k else b


def write_native(batches, directory: Path) -> int:
    """Write batches as a native recording (spool segments); returns spans written."""
    spool = Spool(directory, budget_bytes=2**62, fsync="never")
    spans = 0
    for b in batches:
        spool.append(encode(b))
        if isinstance(b, SpanBatch):
            spans += len(b)
    spool.close()
    return spans
