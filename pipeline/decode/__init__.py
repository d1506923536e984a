"""Decode OTLP requests (protobuf bytes or OTLP/JSON objects) into columnar batches.

Decoding is a pure function whose errors are data: a malformed request raises
``MalformedRequest`` (the receiver answers INVALID_ARGUMENT), while individual
invalid spans or log records are left out of the batch and reported as a
rejected count with a message (the receiver puts them in ``partial_success``).

- ``spans``: trace requests (the compiled wire reader ``span_wire``, upb, JSON);
- ``logs``: log requests;
- ``metrics``: metric requests (a row per data point);
- ``common``: ``Decoded``, ``MalformedRequest``, ``DecodeLimits``;
- here: ``accept_times`` (the receiver's clock check) and ``decode_json_line`` (one
  line of an OTLP/JSON recording, either signal).

Both wire forms fill the same column builders, so validation is written once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.config import Config
from pipeline.decode.common import UNKNOWN_SERVICE, Decoded, DecodeLimits, MalformedRequest
from pipeline.decode.logs import anyvalue_to_python, decode_logs, decode_logs_json, render_value
from pipeline.decode.metrics import decode_metrics, decode_metrics_json
from pipeline.decode.spans import decode_traces, decode_traces_json, decode_traces_upb, json_request
from pipeline.graph_calls import PEER_ATTRIBUTES
from pipeline.metric_model import MetricBatch
from pipeline.model import SpanBatch

__all__ = [
    "UNKNOWN_SERVICE", "DecodeLimits", "Decoded", "MalformedRequest", "accept_times", "anyvalue_to_python",
    "decode_json_line", "decode_logs", "decode_logs_json", "decode_metrics", "decode_metrics_json",
    "decode_limits", "decode_traces", "decode_traces_json", "decode_traces_upb", "render_value",
]  # fmt: skip

# The span attributes the database analysis reads (pipeline/db_analysis.py DB_KEYS, written out
# here so that decoding does not import the analysis).
DB_ATTRIBUTES = ("db.system.name", "db.system", "db.query.text", "db.statement", "db.operation.name")


def decode_limits(cfg: Config) -> DecodeLimits:
    """What decoding needs from the configuration: log attribute limits, and the span
    attributes the analyses read: the service graph's virtual nodes always, the database
    analysis's when it is on, the dimensions (``windows.dimensions``, also from resources)."""
    wanted = (DB_ATTRIBUTES if cfg.db.enabled else ()) + PEER_ATTRIBUTES + cfg.windows.dimensions
    return DecodeLimits(
        cfg.otlp.max_log_attributes, cfg.otlp.max_attribute_value_bytes, span_attributes=tuple(dict.fromkeys(wanted)),
        resource_attributes=cfg.windows.dimensions, exceptions=True,
    )  # fmt: skip


def accept_times(decoded: Decoded, now_ns: int, max_future_ns: int) -> Decoded:
    """Stamp the batch with its acceptance time and reject the items that end more than
    ``max_future_ns`` after ``now_ns`` (the receiver's clock): one client with a wrong clock must
    not move event time for everybody. Old items are kept (docs/operations.md)."""
    batch = decoded.batch
    if batch is None:
        return decoded
    times = batch.end_ns if isinstance(batch, SpanBatch) else batch.time_ns
    ahead = times > now_ns + max_future_ns
    future = int(np.count_nonzero(ahead))
    if not future:
        return dataclasses.replace(decoded, batch=dataclasses.replace(batch, received_ns=now_ns))
    what = {SpanBatch: "spans", MetricBatch: "data points"}.get(type(batch), "log records")
    why = f"{future} {what} ending more than {max_future_ns / 1e9:g} s after the receiver's clock"
    kept = batch.select(~ahead) if future < len(batch) else None
    return Decoded(
        batch=None if kept is None else dataclasses.replace(kept, received_ns=now_ns),
        received=decoded.received,
        rejected=decoded.rejected + future,
        message="; ".join(m for m in (decoded.message, why) if m),
        future=future,
    )


def decode_json_line(line: bytes, limits: DecodeLimits = DecodeLimits()) -> list[Decoded]:
    """One line of the Collector's file exporter: a trace, logs and/or metrics request."""
    obj = json_request(line)
    out = []
    if "resourceSpans" in obj:
        out.append(decode_traces_json(obj, limits))
    if "resourceLogs" in obj:
        out.append(decode_logs_json(obj, limits))
    if "resourceMetrics" in obj:
        out.append(decode_metrics_json(obj))
    return out
