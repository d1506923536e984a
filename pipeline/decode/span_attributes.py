"""Span attributes read from the wire bytes (numba), for the walker of ``span_wire`` and the
upb path alike: only the keys asked for, string values only.

``walk`` takes the wanted keys as ``wanted_keys`` makes them (their UTF-8 bytes back to back
and their offsets); it passes over an attribute in the usual form whose key is not wanted
itself, and hands the others to ``_span_attribute``. The upb path hands each attribute's raw
KeyValue bytes to ``attribute_value``, the same function, so both read attributes alike.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.decode.protowire import _delimited, _skip, _tag

# No span attribute wanted (``walk``'s defaults): attributes are walked past unread.
NONE_WANTED = np.zeros(0, dtype=np.uint8)
NONE_AT = np.zeros(1, dtype=np.int64)


def wanted_keys(keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Span attribute keys as ``walk`` takes them: their UTF-8 bytes back to back, and offsets."""
    raw = [k.encode() for k in keys]
    at = np.zeros(len(raw) + 1, dtype=np.int64)
    at[1:] = np.cumsum([len(r) for r in raw]) if raw else []
    return np.frombuffer(b"".join(raw), dtype=np.uint8).copy(), at


@njit(cache=True, nogil=True)
def _delimited_fields(buf, a, b, first, second):
    """The byte ranges of the last ``first`` and last ``second`` length-delimited fields of the
    message in buf[a:b] (-1, -1 for one not there); ``ok`` False when the message is not
    well-formed protobuf or either field has another wire type."""
    fa = fb = sa = sb = -1
    p = a
    while p < b:
        field, wt, p = _tag(buf, p, b)
        if p < 0:
            return fa, fb, sa, sb, False
        if field == first or field == second:
            if wt != 2:
                return fa, fb, sa, sb, False
            xa, xb = _delimited(buf, p, b)
            if xa < 0:
                return fa, fb, sa, sb, False
            p = xb
            if field == first:
                fa, fb = xa, xb
            else:
                sa, sb = xa, xb
        else:
            p = _skip(buf, p, b, wt)
            if p < 0:
                return fa, fb, sa, sb, False
    return fa, fb, sa, sb, True


@njit(cache=True, nogil=True)
def _span_attribute(buf, a, b, wanted, wanted_at):
    """One span attribute, a KeyValue in buf[a:b]: ``(j, start, end)`` of its string value when
    its key is ``wanted`` key ``j`` (keys back to back, ``wanted_at`` their offsets) and the
    value a non-empty ``string_value``; j = -1 otherwise. Within a KeyValue the last key and
    value fields win, within its AnyValue the last string_value. An attribute that is not
    well-formed protobuf, or whose key, value or string_value has another wire type, is
    ignored (j = -1), never a reason to give up: the upb path hands each attribute's bytes to
    this same function (``attribute_value``), so both read attributes alike."""
    key_a, key_b, val_a, val_b, ok = _delimited_fields(buf, a, b, 1, 2)
    if not ok or key_a < 0 or val_a < 0:
        return -1, 0, 0
    match = -1
    for j in range(wanted_at.shape[0] - 1):
        wa = wanted_at[j]
        if wanted_at[j + 1] - wa != key_b - key_a:
            continue
        same = True
        for k in range(key_b - key_a):
            if buf[key_a + k] != wanted[wa + k]:
                same = False
                break
        if same:
            match = j
            break
    if match < 0:
        return -1, 0, 0
    # the AnyValue: its string_value (field 1); other kinds walked past
    str_a, str_b, _, _, ok = _delimited_fields(buf, val_a, val_b, 1, 0)
    if not ok or str_b <= str_a:
        return -1, 0, 0
    return match, str_a, str_b


@njit(cache=True, nogil=True)
def attribute_value(buf, wanted, wanted_at):
    """``_span_attribute`` over a whole buffer (one KeyValue's bytes, from the upb path)."""
    return _span_attribute(buf, 0, buf.shape[0], wanted, wanted_at)


@njit(cache=True, nogil=True)
def intern_ranges(buf, ranges):
    """The walker's attribute byte ranges (rows 2j, 2j + 1: key j's value in each span, -1 when
    absent) told apart: ``(idx, first)``, each value's code (int32, -1 when absent) numbered in
    order of first appearance over key 0's spans, then key 1's, ..., one table for all keys; and
    each code's first byte range. An open-addressing table on FNV-1a hashes; values with equal
    hashes are compared byte by byte; a value equal to the key's previous one (spans of one
    operation or resource in a row) takes its code without hashing. Python then slices only the
    distinct values."""
    keys, n = ranges.shape[0] // 2, ranges.shape[1]
    present = 0
    for j in range(keys):
        for i in range(n):
            if ranges[2 * j, i] >= 0:
                present += 1
    size = 16
    while size < 2 * present:
        size *= 2
    slots = np.full(size, -1, dtype=np.int64)  # -> code
    hashes = np.zeros(size, dtype=np.uint64)
    idx = np.full((keys, n), -1, dtype=np.int32)
    first = np.empty((present, 2), dtype=np.int64)
    codes = 0
    for j in range(keys):
        last = -1  # the code of this key's previous value
        for i in range(n):
            a, b = ranges[2 * j, i], ranges[2 * j + 1, i]
            if a < 0:
                continue
            if last >= 0 and first[last, 1] - first[last, 0] == b - a:
                x = first[last, 0]
                k = 0
                while k < b - a and buf[a + k] == buf[x + k]:
                    k += 1
                if k == b - a:
                    idx[j, i] = last
                    continue
            h = np.uint64(14695981039346656037)
            for k in range(a, b):
                h ^= np.uint64(buf[k])
                h *= np.uint64(1099511628211)
            slot = np.int64(h & np.uint64(size - 1))
            while True:
                c = slots[slot]
                if c < 0:
                    slots[slot] = codes
                    hashes[slot] = h
                    first[codes, 0], first[codes, 1] = a, b
                    idx[j, i] = last = codes
                    codes += 1
                    break
                if hashes[slot] == h and first[c, 1] - first[c, 0] == b - a:
                    same = True
                    x = first[c, 0]
                    for k in range(b - a):
                        if buf[a + k] != buf[x + k]:
                            same = False
                            break
                    if same:
                        idx[j, i] = last = c
                        break
                slot = (slot + 1) & (size - 1)
    return idx, first[:codes]
