"""Dimensions: span-derived series split by attribute values, as the Collector's span-metrics
connector does (``windows.dimensions``).

A configured key is looked up in the span's attributes, then in its resource's (the decoders
read only the keys asked for: ``pipeline/decode``); a span with neither gets
``windows.dimension_default``. The values are part of the window key. An operation with
dimensions travels through the pipeline as one string, its span name and its key/value pairs
joined by control characters (``compose``), so windows, detectors, rankings, the operation
limit (``windows.max_operations_per_service`` counts every combination: one bound for names
and values alike) and snapshots work on it unchanged; the outputs split it (``split``) into
``span_name`` and a label per dimension (``label_name``: ``deployment.environment`` ->
``deployment_environment``) on ``/metrics`` and in remote write, and into ``operation`` and
``dimensions`` in ``--emit-jsonl`` and Loki (``readable``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.model import SpanBatch

SEP = "\x1f"  # before each dimension, after the span name
KV = "\x1e"  # between a dimension's key and its value
_CLEAN = str.maketrans({SEP: " ", KV: " "})
MAX_CACHE = 100_000  # composed operations remembered across batches (one string object each)
# Labels of the span-derived families that a dimension may not become.
RESERVED_LABELS = frozenset({"service_name", "span_name", "span_kind", "status_code", "le", "quantile", "feature",
                             "job", "instance", "otel_metric_overflow"})  # fmt: skip


def label_name(key: str) -> str:
    """A dimension's label: the attribute key, each character a label may not have an underscore."""
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in key)
    return "_" + name if name[:1].isdigit() else name


def compose(name: str, pairs: list[tuple[str, str]]) -> str:
    """A span name with its dimensions, as one operation string."""
    return name.translate(_CLEAN) + "".join(f"{SEP}{k.translate(_CLEAN)}{KV}{v.translate(_CLEAN)}" for k, v in pairs)


def split(operation: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``compose``'s inverse: (span name, ((key, value), ...)); an operation without dimensions
    (or a stray separator in a name) is the name alone."""
    if SEP not in operation:
        return operation, ()
    name, *parts = operation.split(SEP)
    if not all(KV in p for p in parts):
        return operation, ()
    return name, tuple((k, v) for k, v in (p.split(KV, 1) for p in parts))


def with_dimensions(batch: SpanBatch, keys: tuple[str, ...], default: str, cache: dict | None = None) -> SpanBatch:
    """The batch with each span's operation its name composed with its values of ``keys``.
    ``cache`` (keys -> name and values -> operation) keeps one string per combination across batches."""
    if not keys or not len(batch):
        return batch
    n = len(batch)
    cols = [batch.attribute(k) for k in keys]
    # one int64 code per span: its name and each key's value index (+1: absent is 0)
    code = batch.op_idx.astype(np.int64)
    radix = len(batch.attr_values) + 1
    space = len(batch.operations) * radix ** len(keys)
    if space < 2**62:
        for col in cols:
            code = code * radix + (col.astype(np.int64) + 1 if col is not None else 0)
        unique, inverse = dense_unique(code, space)
        combos = []
        for c in unique.tolist():
            found = []
            for _ in keys:
                c, v = divmod(c, radix)
                found.append(v - 1)
            combos.append((c, *reversed(found)))
    else:  # very many keys and values: rows of codes
        rows = np.stack([code] + [c.astype(np.int64) if c is not None else np.full(n, -1, np.int64) for c in cols])
        unique_rows, inverse = np.unique(rows, axis=1, return_inverse=True)
        combos = [tuple(r) for r in unique_rows.T.tolist()]
    values, names = batch.attr_values, batch.operations
    cache = {} if cache is None else cache
    if sum(map(len, cache.values())) > MAX_CACHE:
        cache.clear()
    known = cache.setdefault(keys, {})
    operations = []
    for combo in combos:
        key = (names[combo[0]], *(values[v] if v >= 0 else default for v in combo[1:]))
        op = known.get(key)
        if op is None:
            op = known[key] = compose(key[0], list(zip(keys, key[1:], strict=True)))
        operations.append(op)
    return dataclasses.replace(batch, operations=tuple(operations), op_idx=inverse.reshape(-1).astype(np.int32))


def dense_unique(code: np.ndarray, space: int, inverse: bool = True):
    """``np.unique(code, return_inverse=inverse)`` for codes in ``range(space)``: by a table of the
    codes present when the space is small (names times values, seconds of a read step: it
    usually is), without a sort."""
    if space > max(4 * code.size, 1 << 16):
        return np.unique(code, return_inverse=True) if inverse else np.unique(code)
    present = np.zeros(space, dtype=bool)
    present[code] = True
    if not inverse:
        return np.flatnonzero(present)
    return np.flatnonzero(present), (np.cumsum(present, dtype=np.int64) - 1)[code]


def labels(operation: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(span name, ((label, value), ...)) for the outputs with labels."""
    name, pairs = split(operation)
    return name, tuple((label_name(k), v) for k, v in pairs)


def readable(doc: dict) -> dict:
    """A JSON document of a result or event with its operations split: ``operation`` the span
    name, ``dimensions`` {key: value} (also in its ``ranking`` entries)."""
    op = doc.get("operation")
    if isinstance(op, str) and SEP in op:
        doc["operation"], pairs = split(op)
        if pairs:
            doc["dimensions"] = dict(pairs)
    if isinstance(doc.get("ranking"), list):
        doc["ranking"] = [readable(dict(r)) if isinstance(r, dict) else r for r in doc["ranking"]]
    return doc
