"""The Resource of a ResourceSpans read from the wire bytes (numba), for ``span_wire.walk``:
``service.name`` and ``service.instance.id``, checked as upb checks them."""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.decode.protowire import _delimited, _equals, _skip, _tag, _utf8

# Columns of the ``resources`` array of ``span_wire.walk``, one row per ResourceSpans.
SVC_START, SVC_END, INST_START, INST_END, SPANS, RES_START, RES_END = range(7)

_SERVICE_NAME = np.frombuffer(b"service.name", dtype=np.uint8)
_INSTANCE_ID = np.frombuffer(b"service.instance.id", dtype=np.uint8)


@njit(cache=True, nogil=True)
def _string(buf, p, end, wt):
    """A string field's bytes, its length at ``p``: (start, end), or (-1, -1) when its wire type is
    not length-delimited, its length runs past ``end`` or it is not UTF-8 (upb refuses those)."""
    if wt != 2:
        return -1, -1
    a, b = _delimited(buf, p, end)
    if a < 0 or not _utf8(buf, a, b):
        return -1, -1
    return a, b


@njit(cache=True, nogil=True)
def _resource(buf, a, b, resources, r):
    """Reads ``service.name`` / ``service.instance.id`` of the Resource in buf[a:b]; False to give up.

    Every attribute is walked in order and the last of each key wins, as reading the
    parsed message does; a repeated Resource field merges into the same row."""
    p = a
    while p < b:
        field, wt, p = _tag(buf, p, b)
        if p < 0:
            return False
        if field != 1:
            p = _skip(buf, p, b, wt)
            if p < 0:
                return False
            continue
        if wt != 2:
            return False
        ka, kb = _delimited(buf, p, b)  # one KeyValue
        if ka < 0:
            return False
        p = kb
        key_a = key_b = 0
        val_a = val_b = 0
        q = ka
        while q < kb:
            field, wt, q = _tag(buf, q, kb)
            if q < 0:
                return False
            if field == 1:  # key
                key_a, key_b = _string(buf, q, kb, wt)
                if key_a < 0:
                    return False
                q = key_b
            elif field == 2:  # value: an AnyValue, of which only string_value is read
                if wt != 2:
                    return False
                aa, ab = _delimited(buf, q, kb)
                if aa < 0:
                    return False
                q = ab
                s = aa
                while s < ab:
                    field, wt, s = _tag(buf, s, ab)
                    if s < 0:
                        return False
                    if field == 1:
                        val_a, val_b = _string(buf, s, ab, wt)
                        if val_a < 0:
                            return False
                        s = val_b
                    else:
                        s = _skip(buf, s, ab, wt)
                        if s < 0:
                            return False
            else:
                q = _skip(buf, q, kb, wt)
                if q < 0:
                    return False
        if _equals(buf, key_a, key_b, _SERVICE_NAME):
            resources[r, SVC_START] = val_a
            resources[r, SVC_END] = val_b
        elif _equals(buf, key_a, key_b, _INSTANCE_ID):
            resources[r, INST_START] = val_a
            resources[r, INST_END] = val_b
    return True
