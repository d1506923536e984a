"""Exceptions per (service, span name, exception type), from the spans' exception events
(``pipeline/decode/span_events.py`` reads them): ``ExceptionCounts`` items, which ``/metrics``
adds up as ``telepipe_exceptions_total{service_name, span_name, exception_type}``.

Counted where spans are read, next to the service-graph join, one item per (service, span
name, type) per batch, weighted by sampling (``SpanBatch.weight``). Stateless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.decode.span_events import EXCEPTION_TYPE
from pipeline.model import SpanBatch


@dataclass(frozen=True)
class ExceptionCounts:
    service: str
    operation: str
    exception_type: str
    count: int
    end_ns: int  # the newest span end among them


def count_exceptions(batch: SpanBatch) -> list[ExceptionCounts]:
    col = batch.attribute(EXCEPTION_TYPE)
    if col is None:
        return []
    rows = np.flatnonzero(col >= 0)
    if not rows.size:
        return []
    svc, op, typ = batch.service_idx[rows], batch.op_idx[rows], col[rows]
    weight = batch.weights()[rows].astype(np.int64)
    end = batch.end_ns[rows]
    out = []
    for s, o, t in sorted(set(zip(svc.tolist(), op.tolist(), typ.tolist(), strict=True))):
        m = (svc == s) & (op == o) & (typ == t)
        out.append(ExceptionCounts(batch.services[s], batch.operations[o], batch.attr_values[t], int(weight[m].sum()),
                                   int(end[m].max())))  # fmt: skip
    return out
