"""One result or event -> one JSON line, and the canonical order of lines (replay)."""

from __future__ import annotations

import orjson

from pipeline.db_analysis import Finding
from pipeline.dimensions import readable
from pipeline.incident_model import IncidentEvent
from pipeline.model import AlertEvent, ScalingEvent, WindowResult

WRITTEN = (WindowResult, AlertEvent, ScalingEvent, IncidentEvent, Finding)
_RANK = {"window": 0, "alert": 1, "scaling": 2, "incident": 3, "finding": 4}


def encode_line(item) -> bytes | None:
    """One result or event -> one line (None for items that are not written)."""
    if not isinstance(item, WRITTEN):
        return None
    return orjson.dumps(readable(item.to_json())) + b"\n"


def sort_key(line: bytes) -> tuple:
    """Canonical order: event time, then kind, then the line itself."""
    doc = orjson.loads(line)
    return (doc.get("window_start", doc.get("time")), _RANK[doc["type"]], line)
