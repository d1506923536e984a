"""Protobuf wire-format primitives for the compiled span reader (``span_wire``), numba.

Each reads at a position ``p`` of a ``uint8`` buffer that ends at ``end`` and returns
the new position (or -1 when the bytes are not valid protobuf there), checking what
upb checks: varints of at most 10 bytes, lengths within their message, known wire
types, UTF-8. ``span_wire`` inlines them into its walker; numba caches the walker
with this file's code compiled in, so after editing this file the walker's cache must
be dropped too (see the note at the import in ``span_wire``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_U7 = np.uint64(7)
_MAX_LEN = np.uint64(1 << 40)


@njit(cache=True, nogil=True)
def _varint(buf, p, end):
    """(value, next position); next position -1 if truncated or longer than 10 bytes."""
    value = np.uint64(0)
    shift = np.uint64(0)
    for _ in range(10):
        if p >= end:
            return value, -1
        b = buf[p]
        p += 1
        value |= np.uint64(b & 0x7F) << shift
        if b < 0x80:
            return value, p
        shift += _U7
    return value, -1


@njit(cache=True, nogil=True)
def _tag(buf, p, end):
    """(field number, wire type, next position); next position -1 if not a valid tag."""
    value, q = _varint(buf, p, end)
    if q < 0 or value > np.uint64(0xFFFFFFFF) or (value >> np.uint64(3)) == np.uint64(0):
        return 0, 0, -1
    return np.int64(value >> np.uint64(3)), np.int64(value & np.uint64(7)), q


@njit(cache=True, nogil=True)
def _delimited(buf, p, end):
    """A length-delimited payload at p: (start, end); (-1, -1) if it overruns ``end``."""
    n, q = _varint(buf, p, end)
    if q < 0 or n > _MAX_LEN or np.int64(n) > end - q:
        return -1, -1
    return q, q + np.int64(n)


@njit(cache=True, nogil=True)
def _skip(buf, p, end, wire_type):
    """Position after an unknown field's value; -1 if malformed or a group (left to upb)."""
    if wire_type == 0:
        return _varint(buf, p, end)[1]
    if wire_type == 1:
        return p + 8 if p + 8 <= end else -1
    if wire_type == 2:
        return _delimited(buf, p, end)[1]
    if wire_type == 5:
        return p + 4 if p + 4 <= end else -1
    return -1


@njit(cache=True, nogil=True)
def _int32(value):
    """A varint read into an int32 field, as protobuf does: the low 32 bits, signed."""
    low = np.int64(value & np.uint64(0xFFFFFFFF))
    return low - (1 << 32) if low >= (1 << 31) else low


@njit(cache=True, nogil=True)
def _utf8(buf, a, b):
    """True if buf[a:b] is valid UTF-8 (no overlong forms, surrogates or code points > U+10FFFF)."""
    i = a
    while i < b:
        c = buf[i]
        if c < 0x80:
            i += 1
            continue
        if c < 0xC2:
            return False
        if c < 0xE0:
            more, lo, hi = 1, 0x80, 0xBF
        elif c < 0xF0:
            more = 2
            lo = 0xA0 if c == 0xE0 else 0x80
            hi = 0x9F if c == 0xED else 0xBF
        elif c < 0xF5:
            more = 3
            lo = 0x90 if c == 0xF0 else 0x80
            hi = 0x8F if c == 0xF4 else 0xBF
        else:
            return False
        if i + more >= b:
            return False
        if buf[i + 1] < lo or buf[i + 1] > hi:
            return False
        for k in range(2, more + 1):
            if buf[i + k] < 0x80 or buf[i + k] > 0xBF:
                return False
        i += more + 1
    return True


@njit(cache=True, nogil=True)
def _equals(buf, a, b, const):
    if b - a != const.shape[0]:
        return False
    for k in range(const.shape[0]):
        if buf[a + k] != const[k]:
            return False
    return True
