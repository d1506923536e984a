"""Exceptions recorded on spans: span events named ``exception`` (OTel semantic conventions),
their ``exception.type``.

The wire reader walks past span events; when the configuration asks for exceptions
(``DecodeLimits.exceptions``) and a request holds the bytes ``exception`` at all (a fast
search; most requests do not), upb parses only the spans' events (``TraceEvents``), in the
wire reader's span order. Each span gets the type of its last exception event (the one that
ended it, usually; a span that recorded several counts once) as the attribute
``EXCEPTION_TYPE`` of its batch (``SpanBatch.attribute``), ``"unknown"`` when the event has
no type. ``pipeline/exceptions.py`` counts them.
"""

from __future__ import annotations

import numpy as np

from pipeline.decode.common import MalformedRequest, parse
from pipeline.decode.span_attributes import attribute_value, wanted_keys
from pipeline.decode.span_schema import TraceEvents

EXCEPTION_TYPE = "exception.type"
UNKNOWN_TYPE = "unknown"
_WANTED = wanted_keys((EXCEPTION_TYPE,))


def _event_type(attributes) -> str:
    found = UNKNOWN_TYPE
    for raw in attributes:
        j, a, b = attribute_value(np.frombuffer(raw, dtype=np.uint8), *_WANTED)
        if j >= 0:
            found = raw[a:b].decode(errors="replace")
    return found


def exception_types(data: bytes, n: int) -> list[str | None] | None:
    """Per span of the request (in order), the type of its last exception event (None: none);
    None when no span has one."""
    if b"exception" not in data:
        return None
    try:  # events the wire reader walked past: one upb does not take costs its exceptions, not the request
        req = parse(TraceEvents(), data, "ExportTraceServiceRequest")
    except MalformedRequest:
        return None
    types: list[str | None] = []
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                last = None
                for ev in span.events:
                    if ev.name == b"exception":
                        last = ev
                types.append(None if last is None else _event_type(last.attributes))
    if len(types) != n or not any(types):
        return None
    return types


def json_exception_type(events) -> str | None:
    """An OTLP/JSON span's ``events``: the type of its last exception event (None: none)."""
    found = None
    for ev in events or ():
        if isinstance(ev, dict) and ev.get("name") == "exception":
            found = UNKNOWN_TYPE
            for kv in ev.get("attributes") or ():
                value = (kv.get("value") or {}).get("stringValue") if isinstance(kv, dict) else None
                if kv.get("key") == EXCEPTION_TYPE and isinstance(value, str) and value:
                    found = value
    return found


def with_exception_types(attributes, keys: tuple[str, ...], n: int, types: list[str | None] | None):
    """The batch's attribute columns with one more, ``EXCEPTION_TYPE`` (unchanged when ``types`` is None)."""
    if types is None:
        return attributes
    keys_, values, idx = attributes if attributes is not None else (keys, (), np.full((len(keys), n), -1, np.int32))
    table = {v: i for i, v in enumerate(values)}
    row = np.array([-1 if t is None else table.setdefault(t, len(table)) for t in types], dtype=np.int32)
    if EXCEPTION_TYPE in keys_:  # also asked for as a span attribute: the event's type wins
        j = keys_.index(EXCEPTION_TYPE)
        idx[j] = np.where(row >= 0, row, idx[j])
        return keys_, tuple(table), idx
    return (*keys_, EXCEPTION_TYPE), tuple(table), np.vstack([idx, row[None, :]])
