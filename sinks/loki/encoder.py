"""Loki's push format: log batches and telepipe's events -> streams -> a gzip JSON body.

Pure functions. Labels stay few and low-cardinality (``service``, ``level``; for
telepipe's events ``source``, ``kind``, ``service``); trace and span ids and kept
attributes go into structured metadata. Entries are sorted by time within a stream.
"""

from __future__ import annotations

import gzip
import re

import orjson

from pipeline.dimensions import readable
from pipeline.model import LogBatch
from pipeline.selfmetrics import SelfMetrics

MAX_LABEL_VALUE_BYTES = 2048  # Loki's default validation limit
UNKNOWN_SERVICE = "unknown_service"  # OTel's name for a missing service.name

# OTLP severity number 1..24, four per level.
_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
_TEXT_LEVELS = {
    **{name: name for name in _LEVELS},
    "information": "info",
    "notice": "info",
    "warning": "warn",
    "err": "error",
    "critical": "fatal",
    "crit": "fatal",
    "alert": "fatal",
    "emerg": "fatal",
    "emergency": "fatal",
    "panic": "fatal",
}
_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_]")


# --- encoder (pure) ---------------------------------------------------------------


def _cut_utf8(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary."""
    if len(text) * 4 <= limit:  # cannot be over: skip the encode
        return text, False
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode(errors="ignore"), True


def level_of(severity: int, severity_text: str) -> str:
    """OTLP severity number (or, when 0, the severity text) -> level label."""
    if 1 <= severity <= 24:
        return _LEVELS[(severity - 1) // 4]
    # Text like "INFO", "Warning" or OTel's short names with a digit ("ERROR2").
    return _TEXT_LEVELS.get(severity_text.strip().lower().rstrip("0123456789"), "unknown")


def metadata_key(key: str) -> str:
    """An attribute key as a structured metadata name: ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    key = _BAD_KEY_CHARS.sub("_", key)
    return key if key and not key[0].isdigit() else f"_{key}"


def encode_streams(
    batch: LogBatch, max_line_bytes: int, *, metrics: SelfMetrics | None = None
) -> list[dict]:
    """One Loki stream per (service, level), entries sorted by time (stable).

    Each value is ``[unix ns as str, line]`` plus a structured metadata dict
    when there is any. Lines over ``max_line_bytes`` are truncated (counted as
    ``loki_line_truncated`` when ``metrics`` is given).
    """
    groups: dict[tuple[str, str], list[tuple[int, list]]] = {}
    truncated = 0
    attributes = batch.attributes
    for i in range(len(batch)):
        line, cut = _cut_utf8(batch.body[i], max_line_bytes)
        truncated += cut
        service, _ = _cut_utf8(batch.service[i] or UNKNOWN_SERVICE, MAX_LABEL_VALUE_BYTES)
        level = level_of(int(batch.severity[i]), batch.severity_text[i])
        meta = {metadata_key(k): str(v) for k, v in attributes[i].items()} if i < len(attributes) else {}
        # Our own fields win over an attribute that sanitizes to the same name.
        for key, value in (
            ("trace_id", batch.trace_id[i]),
            ("span_id", batch.span_id[i]),
            ("service_instance_id", batch.instance[i]),
        ):
            if value:
                meta[key] = value
        ts = max(int(batch.time_ns[i]), 0)  # uint64 garbage shows up negative
        entry: list = [str(ts), line, meta] if meta else [str(ts), line]
        groups.setdefault((service, level), []).append((ts, entry))
    if truncated and metrics is not None:
        metrics.dropped("loki_line_truncated", truncated, detail=f"lines cut to {max_line_bytes} bytes")
    streams = []
    for (service, level), entries in groups.items():
        entries.sort(key=lambda e: e[0])
        streams.append({"stream": {"service": service, "level": level}, "values": [v for _, v in entries]})
    return streams


def encode_push(streams: list[dict]) -> bytes:
    """Streams -> the gzip-compressed JSON push body."""
    return gzip.compress(orjson.dumps({"streams": streams}), compresslevel=6, mtime=0)


def encode_events(events: list, source: str = "telepipe") -> list[dict]:
    """telepipe's own events (alerts, scaling changes, incidents) -> streams labelled source, kind,
    service (an incident's: the first of its services).

    The line is the event's JSON (as ``--emit-jsonl`` writes it); its time is the
    event time of the window that caused it.
    """
    groups: dict[tuple, list[tuple[int, list]]] = {}
    for e in events:
        doc = readable(e.to_json())
        first = doc.get("service") or next(iter(doc.get("services") or ()), None)
        service, _ = _cut_utf8(first or UNKNOWN_SERVICE, MAX_LABEL_VALUE_BYTES)
        labels = (("kind", doc["type"]), ("service", service), ("source", source))
        groups.setdefault(labels, []).append((int(doc["time"]), [str(int(doc["time"])), orjson.dumps(doc).decode()]))
    streams = []
    for labels, entries in groups.items():
        entries.sort(key=lambda e: e[0])
        streams.append({"stream": dict(labels), "values": [v for _, v in entries]})
    return streams


def merge_sorted(groups: dict[tuple, list[list]]) -> list[dict]:
    """Accumulated values per label set -> streams, each sorted by time (stable)."""
    streams = []
    for labels, values in groups.items():
        values.sort(key=lambda v: int(v[0]))
        streams.append({"stream": dict(labels), "values": values})
    return streams
