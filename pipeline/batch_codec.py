"""The binary form of batches (what the spool and native recordings store), and the
source-side helpers that cut and stamp them.

- ``encode(batch)`` / ``decode(data)``: a ``SpanBatch`` as a small JSON header (string
  tables, acceptance time) and its numpy columns as raw bytes, read back with
  ``numpy.frombuffer`` (no copy); a ``LogBatch`` as a JSON header and two columns.
  The receiver decodes each request once and spools this form.
- ``concat``: one span batch of several (string tables merged).
- ``coalesce``: the span batches of one read step merged into few large ones.
- ``Steps``: numbers a source partition's read steps and stamps them on its batches
  (watermarks advance only between steps, see ``pipeline/windows.py``).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np
import orjson

from pipeline.metric_model import METRIC_COLUMNS, MetricBatch
from pipeline.model import SPAN_COLUMNS, LogBatch, SpanBatch

Batch = SpanBatch | LogBatch | MetricBatch
_MAGIC_SPANS = b"TPS1"
_MAGIC_LOGS = b"TPL1"
_MAGIC_METRICS = b"TPM1"
_HEADER = struct.Struct("<4sII")  # magic, header json length, row count


def encode(batch: Batch) -> bytes:
    if isinstance(batch, SpanBatch):
        return _encode_spans(batch)
    if isinstance(batch, MetricBatch):
        return _encode_metrics(batch)
    return _encode_logs(batch)


def decode(data: bytes | memoryview) -> Batch:
    """A spooled batch of any kind; ValueError when it is not one (or is cut short)."""
    magic = bytes(data[:4])
    if magic == _MAGIC_SPANS:
        return _decode_spans(data)
    if magic == _MAGIC_LOGS:
        return _decode_logs(data)
    if magic == _MAGIC_METRICS:
        return _decode_metrics(data)
    raise ValueError(f"unknown batch type {magic!r}")


def _encode_metrics(batch: MetricBatch) -> bytes:
    head: dict[str, object] = {"s": batch.services, "i": batch.instances, "n": batch.names, "a": batch.attrs}
    if batch.received_ns:
        head["r"] = batch.received_ns
    raw = orjson.dumps(head)
    parts = [_HEADER.pack(_MAGIC_METRICS, len(raw), len(batch)), raw]
    parts.extend(np.ascontiguousarray(getattr(batch, name), dtype=dtype).tobytes() for name, dtype in METRIC_COLUMNS)
    return b"".join(parts)


def _read_columns(data: bytes | memoryview, columns: tuple, what: str) -> tuple[dict, dict[str, Any]]:
    """A batch's JSON header and its columns (no copy: views of ``data``)."""
    _, hlen, n = _HEADER.unpack_from(data, 0)
    pos = _HEADER.size
    head = orjson.loads(bytes(data[pos : pos + hlen]))
    pos += hlen
    cols: dict[str, Any] = {}
    for name, dtype in columns:
        dt = np.dtype(dtype)
        size = dt.itemsize * n
        if pos + size > len(data):
            raise ValueError(f"truncated {what} batch")
        cols[name] = np.frombuffer(data, dtype=dt, count=n, offset=pos)
        pos += size
    return head, cols


def _decode_metrics(data: bytes | memoryview) -> MetricBatch:
    head, cols = _read_columns(data, METRIC_COLUMNS, "metric")
    batch = MetricBatch(
        services=tuple(head["s"]), instances=tuple(head["i"]), names=tuple(head["n"]), attrs=tuple(head["a"]),
        received_ns=int(head.get("r", 0)), **cols,
    )  # fmt: skip
    batch.check()
    return batch


def _encode_spans(batch: SpanBatch) -> bytes:
    head: dict[str, object] = {"s": batch.services, "o": batch.operations, "i": batch.instances}
    if batch.received_ns:
        head["r"] = batch.received_ns
    if batch.weight is not None:
        head["w"] = 1  # an adjusted-count column follows the others
    if batch.attrs is not None:
        head["ak"], head["av"] = batch.attr_keys, batch.attr_values  # then the attribute columns
    raw = orjson.dumps(head)
    parts = [_HEADER.pack(_MAGIC_SPANS, len(raw), len(batch)), raw]
    for name, _dtype in SPAN_COLUMNS:
        parts.append(getattr(batch, name).tobytes())
    if batch.weight is not None:
        parts.append(np.ascontiguousarray(batch.weight, dtype=np.int32).tobytes())
    if batch.attrs is not None:
        parts.append(np.ascontiguousarray(batch.attrs, dtype=np.int32).tobytes())
    return b"".join(parts)


_WEIGHTED_COLUMNS = (*SPAN_COLUMNS, ("weight", np.int32))


def _decode_spans(data: bytes | memoryview) -> SpanBatch:
    head, cols = _read_columns(data, SPAN_COLUMNS, "span")
    if head.get("w"):
        head, cols = _read_columns(data, _WEIGHTED_COLUMNS, "span")
    attrs = None
    if "ak" in head:
        _, hlen, n = _HEADER.unpack_from(data, 0)
        keys = len(head["ak"])
        row = sum(np.dtype(d).itemsize for _, d in SPAN_COLUMNS) + (4 if "w" in head else 0)
        pos = _HEADER.size + hlen + row * n
        if pos + 4 * keys * n > len(data):
            raise ValueError("truncated span batch")
        attrs = np.frombuffer(data, dtype=np.int32, count=keys * n, offset=pos).reshape(keys, n)
    batch = SpanBatch(
        services=tuple(head["s"]),
        operations=tuple(head["o"]),
        instances=tuple(head["i"]),
        received_ns=int(head.get("r", 0)),
        attr_keys=tuple(head.get("ak", ())),
        attr_values=tuple(head.get("av", ())),
        attrs=attrs,
        **cols,  # type: ignore[arg-type]  # the columns, by name
    )
    batch.check()
    return batch


def _encode_logs(batch: LogBatch) -> bytes:
    head = orjson.dumps(
        {
            "st": batch.severity_text,
            "b": batch.body,
            "t": batch.trace_id,
            "sp": batch.span_id,
            "s": batch.service,
            "i": batch.instance,
            "a": batch.attributes,
            **({"r": batch.received_ns} if batch.received_ns else {}),
        }
    )
    return b"".join(
        (
            _HEADER.pack(_MAGIC_LOGS, len(head), len(batch)),
            head,
            batch.time_ns.astype(np.int64).tobytes(),
            batch.severity.astype(np.int8).tobytes(),
        )
    )


def _decode_logs(data: bytes | memoryview) -> LogBatch:
    magic, hlen, n = _HEADER.unpack_from(data, 0)
    pos = _HEADER.size
    head = orjson.loads(bytes(data[pos : pos + hlen]))
    pos += hlen
    if pos + 9 * n > len(data):
        raise ValueError("truncated log batch")
    return LogBatch(
        time_ns=np.frombuffer(data, dtype=np.int64, count=n, offset=pos),
        severity=np.frombuffer(data, dtype=np.int8, count=n, offset=pos + 8 * n),
        severity_text=head["st"],
        body=head["b"],
        trace_id=head["t"],
        span_id=head["sp"],
        service=head["s"],
        instance=head["i"],
        attributes=head["a"],
        received_ns=int(head.get("r", 0)),
    )


def concat(batches: list[SpanBatch]) -> SpanBatch:
    """One batch of several (order kept), string tables merged.

    Fewer, larger batches mean less per-batch overhead downstream (the
    recordings and many SDKs send a few dozen spans per request).
    """
    if len(batches) == 1:
        return batches[0]
    tables: dict[str, dict[str, int]] = {"services": {}, "operations": {}, "instances": {}}
    cols: dict[str, list[Any]] = {name: [] for name, _ in SPAN_COLUMNS}
    remap = {"services": "service_idx", "operations": "op_idx", "instances": "instance_idx"}
    for b in batches:
        for table, col in remap.items():
            merged = tables[table]
            mapping = np.fromiter(
                (merged.setdefault(x, len(merged)) for x in getattr(b, table)), np.int32, len(getattr(b, table))
            )
            cols[col].append(mapping[getattr(b, col)] if len(b) else getattr(b, col))
        for name, _ in SPAN_COLUMNS:
            if name not in remap.values():
                cols[name].append(getattr(b, name))
    weighted = any(b.weight is not None for b in batches)
    keys, values, attrs = _concat_attributes(batches)
    return SpanBatch(
        attr_keys=keys,
        attr_values=values,
        attrs=attrs,
        services=tuple(tables["services"]),
        operations=tuple(tables["operations"]),
        instances=tuple(tables["instances"]),
        received_ns=max(b.received_ns for b in batches),
        weight=np.concatenate([b.weights() for b in batches]) if weighted else None,
        **{name: np.concatenate(parts) for name, parts in cols.items()},  # type: ignore[arg-type]
    )


def _concat_attributes(batches: list[SpanBatch]) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray | None]:
    """The attribute columns of several batches as one: keys and value tables merged."""
    keys: dict[str, int] = {}
    for b in batches:
        for k in b.attr_keys:
            keys.setdefault(k, len(keys))
    if not keys or all(b.attrs is None for b in batches):
        return (), (), None
    values: dict[str, int] = {}
    parts = []
    for b in batches:
        part = np.full((len(keys), len(b)), -1, dtype=np.int32)
        if b.attrs is not None and len(b):
            table = np.fromiter((values.setdefault(v, len(values)) for v in b.attr_values), np.int32,
                                len(b.attr_values))  # fmt: skip
            for j, k in enumerate(b.attr_keys):
                col = b.attrs[j]
                part[keys[k]] = np.where(col >= 0, table[np.maximum(col, 0)] if table.size else -1, -1)
        parts.append(part)
    return tuple(keys), tuple(values), np.concatenate(parts, axis=1)


def coalesce(batches: list[Batch], max_spans: int = 8192) -> list[Batch]:
    """The span batches of one read step merged (up to ``max_spans`` each, order kept), then its
    log and metric batches as they came.

    Spans and logs take separate paths and a step is one unit for watermarks, so their order
    within a step changes nothing downstream; merging across interleaved log requests (the
    recordings alternate them) made the x16 replay's span batches 3 requests long instead of
    16, and every downstream step pays per batch (the service graph join: 353 against 130 ns
    per span)."""
    out: list[Batch] = []
    run: list[SpanBatch] = []
    size = 0
    for b in batches:
        if not isinstance(b, SpanBatch):
            continue
        if run and size + len(b) > max_spans:
            out.append(concat(run))
            run, size = [], 0
        run.append(b)
        size += len(b)
    if run:
        out.append(concat(run))
    out.extend(b for b in batches if not isinstance(b, SpanBatch))
    return out


class Steps:
    """Numbers the steps of one source partition and stamps them on its span batches."""

    def __init__(self, partition: int, next_seq: int = 0) -> None:
        self.partition = partition
        self.next_seq = next_seq

    def stamp(self, step: list[Batch]) -> list[Batch]:
        mark = (self.partition, self.next_seq)
        self.next_seq += 1
        return [dataclasses.replace(b, step=mark) for b in step]
