"""Span columns read straight from the protobuf wire bytes of an OTLP trace request (numba).

``pipeline/decode`` used to parse every request with upb and read each span
field through a Python object: a wrapper per span and one attribute read per
field, about 2 us per span, two thirds of a replay's time. ``walk`` below reads
the same fields in one compiled pass over the bytes and writes them into arrays,
so no Python object is made per span (about 0.25 us per span walked, 0.45 us
for the whole ``decode_traces``; see docs/performance.md). Compiled functions
release the GIL (``nogil``), so the receiver's threads can decode side by side.

It reads exactly what ``pipeline/decode/span_schema.py`` declares (the ids, name, kind,
times, status and where the trace state is of each span, and ``service.name`` / ``service.instance.id`` of
each resource) and walks past everything else, checking the wire format as upb
does: tags, varints, lengths within their message, UTF-8 of the strings the
schema declares, and the whole ``Status`` message.

Anything it does not handle the way upb would -- malformed bytes, groups, a
known field with an unexpected wire type, a varint longer than 10 bytes -- makes
it give up (``OK`` is not returned) and the caller parses the request with upb
instead, which then answers exactly as before (including the error message of a
malformed request). ``tests/test_span_wire.py`` feeds both decoders the shared
recordings, crafted edge cases and generated and mutated requests and requires
identical results or errors.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

# The protobuf wire primitives, the Resource and span attribute readers. numba's cache tracks this
# file only: after editing protowire.py, resource_wire.py or span_attributes.py, delete
# pipeline/decode/__pycache__/*.nb[ic] (or touch this file) so the walker is compiled again.
from pipeline.decode.protowire import _delimited, _int32, _skip, _tag, _utf8, _varint
from pipeline.decode.resource_wire import RES_END, RES_START, SPANS, _resource
from pipeline.decode.span_attributes import NONE_AT, NONE_WANTED, _span_attribute, attribute_value, wanted_keys

OK = 0
GIVE_UP = 1

# Rows of the ``ints`` array returned by ``walk``, one column per span.
RESOURCE, TRACE_LEN, SPAN_LEN, PARENT_LEN, NAME, KIND, STATUS, STATE_START, STATE_END, EVENTS = range(10)
@njit(cache=True, nogil=True)
def _count(buf):
    """(spans, resources) in the request, walking only the outer three levels; (-1, -1) if malformed."""
    spans = 0
    resources = 0
    end = buf.shape[0]
    p = 0
    while p < end:
        field, wt, p = _tag(buf, p, end)
        if p < 0:
            return -1, -1
        if field == 1 and wt == 2:
            ra, rb = _delimited(buf, p, end)
            if ra < 0:
                return -1, -1
            resources += 1
            p = ra
            while p < rb:
                field, wt, p = _tag(buf, p, rb)
                if p < 0:
                    return -1, -1
                if field == 2 and wt == 2:
                    sa, sb = _delimited(buf, p, rb)
                    if sa < 0:
                        return -1, -1
                    p = sa
                    while p < sb:
                        if buf[p] == 0x12 and p + 2 < sb:  # a span: its length read inline when 1-2 bytes
                            n0 = np.int64(buf[p + 1])
                            if n0 < 0x80:
                                spans += 1
                                p += 2 + n0
                                continue
                            n1 = np.int64(buf[p + 2])
                            if n1 < 0x80:
                                spans += 1
                                p += 3 + (n0 & 0x7F) + (n1 << 7)
                                continue
                        field, wt, p = _tag(buf, p, sb)
                        if p < 0:
                            return -1, -1
                        if field == 2 and wt == 2:
                            spans += 1
                        p = _skip(buf, p, sb, wt)
                        if p < 0:
                            return -1, -1
                    if p != sb:
                        return -1, -1
                else:
                    p = _skip(buf, p, rb, wt)
                    if p < 0:
                        return -1, -1
        else:
            p = _skip(buf, p, end, wt)
            if p < 0:
                return -1, -1
    return spans, resources


@njit(cache=True, nogil=True)
def _status_code(buf, a, b):
    """The code of a serialized ``Status`` (0 if absent); (code, ok)."""
    code = 0
    p = a
    while p < b:
        field, wt, p = _tag(buf, p, b)
        if p < 0:
            return 0, False
        if field == 2:  # message: a string
            if wt != 2:
                return 0, False
            ma, mb = _delimited(buf, p, b)
            if ma < 0 or not _utf8(buf, ma, mb):
                return 0, False
            p = mb
        elif field == 3:  # code: an enum, read like int32
            if wt != 0:
                return 0, False
            value, p = _varint(buf, p, b)
            if p < 0:
                return 0, False
            code = _int32(value)
        else:
            p = _skip(buf, p, b, wt)
            if p < 0:
                return 0, False
    return code, True


@njit(cache=True, nogil=True)
def _scope_spans(buf, sa, sb, r, i, ints, times, trace_id, span_id, parent, table, names, n_names, wanted, wanted_at,
                 firsts, attrs):  # fmt: skip
    """Reads the spans of the ScopeSpans in buf[sa:sb] into columns/rows from ``i`` on.

    Returns the next free row; ``n_names[0]`` counts the distinct names. -1: give up.
    The loops read one-byte tags and lengths inline and call the general helpers only
    for longer ones: a call per field costs more than the field (numba does not inline
    them), so this is written out, not factored."""
    s = sa
    while s < sb:
        t = buf[s]
        if t != 0x12:  # not a span (field 2, length-delimited): scope, schema_url, unknown
            field, wt, s = _tag(buf, s, sb)
            if s < 0 or field == 2:
                return -1
            s = _skip(buf, s, sb, wt)
            if s < 0:
                return -1
            continue
        a, b = _delimited(buf, s + 1, sb)
        if a < 0:
            return -1
        s = b
        ints[RESOURCE, i] = r
        name_a = name_b = 0
        status_a = -1
        status_b = -1
        p = a
        while p < b:
            t = np.int64(buf[p])
            if t >= 0x80:  # a tag of field 16 or more: none of ours
                tag, p = _varint(buf, p, b)
                if p < 0 or tag > np.uint64(0xFFFFFFFF):
                    return -1
                p = _skip(buf, p, b, np.int64(tag & np.uint64(7)))
                if p < 0:
                    return -1
                continue
            p += 1
            field = t >> 3
            wt = t & 7
            if field == 0:
                return -1
            if wt == 2:
                if p >= b:
                    return -1
                n = np.int64(buf[p])
                if n < 0x80:
                    p += 1
                else:
                    va, vb = _delimited(buf, p, b)
                    if va < 0:
                        return -1
                    n = vb - va
                    p = va
                va = p
                vb = p + n
                if vb > b:
                    return -1
                p = vb
                if field == 1 or field == 2 or field == 4:  # an id: its length, and its bytes if right
                    ids = trace_id if field == 1 else span_id if field == 2 else parent
                    ints[TRACE_LEN if field == 1 else SPAN_LEN if field == 2 else PARENT_LEN, i] = n
                    if n == ids.shape[1]:
                        for k in range(n):
                            ids[i, k] = buf[va + k]
                    else:  # last one wins: an earlier right-length id of this span is gone
                        ids[i, :] = 0
                elif field == 5:
                    for k in range(va, vb):
                        if buf[k] >= 0x80:
                            if not _utf8(buf, va, vb):
                                return -1
                            break
                    name_a = va
                    name_b = vb
                elif field == 15:
                    status_a = va
                    status_b = vb
                elif field == 9 and wanted_at.shape[0] > 1:  # an attribute, when some are wanted
                    # The usual form, a short key then the value and nothing else, is read right
                    # here: passed over unless its key is wanted, a short string value taken.
                    # Any other form goes to _span_attribute, which reads every form alike.
                    j = -2  # -2: not the usual form
                    ke = va
                    if n > 2 and buf[va] == 0x0A and buf[va + 1] < 0x80:
                        kl = np.int64(buf[va + 1])
                        ke = va + 2 + kl
                        if ke + 1 < vb and buf[ke] == 0x12 and buf[ke + 1] < 0x80 and ke + 2 + buf[ke + 1] == vb:
                            j = -1
                            c = np.int64(buf[va + 2])
                            if (firsts[kl, c >> 6] >> np.uint64(c & 63)) & np.uint64(1):
                                for jj in range(wanted_at.shape[0] - 1):
                                    wa = wanted_at[jj]
                                    if wanted_at[jj + 1] - wa == kl:
                                        k = 0
                                        while k < kl and buf[va + 2 + k] == wanted[wa + k]:
                                            k += 1
                                        if k == kl:
                                            j = jj
                                            break
                    xa = ke + 4 if j >= 0 else 0  # the string value, when its AnyValue has the usual form
                    if j >= 0 and ke + 3 < vb and buf[ke + 2] == 0x0A and buf[ke + 3] < 0x80 and xa + buf[ke + 3] == vb:
                        if xa < vb:  # an empty string is no value
                            attrs[2 * j, i] = xa
                            attrs[2 * j + 1, i] = vb
                    elif j != -1:
                        j, xa, xb = _span_attribute(buf, va, vb, wanted, wanted_at)
                        if j >= 0:
                            attrs[2 * j, i] = xa
                            attrs[2 * j + 1, i] = xb
                elif field == 3:  # trace_state: where it is (most spans have none)
                    for k in range(va, vb):
                        if buf[k] >= 0x80:
                            if not _utf8(buf, va, vb):
                                return -1
                            break
                    ints[STATE_START, i] = va
                    ints[STATE_END, i] = vb
                elif field == 11:  # an event: counted (span_events reads them when some span has one)
                    ints[EVENTS, i] += 1
                elif field == 6 or field == 7 or field == 8:
                    return -1
            elif wt == 0:
                if p >= b:
                    return -1
                v = np.int64(buf[p])
                if v < 0x80:
                    p += 1
                else:
                    value, p = _varint(buf, p, b)
                    if p < 0:
                        return -1
                    v = _int32(value)
                if field == 6:
                    ints[KIND, i] = v
                elif field <= 8 or field == 15 or field == 9 and wanted_at.shape[0] > 1:  # ours, another wire type
                    return -1
            elif wt == 1:
                if p + 8 > b:
                    return -1
                if field == 7 or field == 8:
                    value = np.uint64(0)
                    for k in range(8):
                        value |= np.uint64(buf[p + k]) << np.uint64(8 * k)
                    times[field - 7, i] = value
                elif field <= 8 or field == 15 or field == 9 and wanted_at.shape[0] > 1:
                    return -1
                p += 8
            elif wt == 5:
                if p + 4 > b or field <= 8 or field == 15 or field == 9 and wanted_at.shape[0] > 1:
                    return -1
                p += 4
            else:
                return -1  # groups, invalid wire types
        # the name's index among the distinct names (open addressing on FNV-1a)
        h = np.uint64(14695981039346656037)
        for k in range(name_a, name_b):
            h ^= np.uint64(buf[k])
            h *= np.uint64(1099511628211)
        mask = table.shape[0] - 1
        slot = np.int64(h & np.uint64(mask))
        while True:
            idx = table[slot]
            if idx < 0:
                idx = n_names[0]
                table[slot] = idx
                names[idx, 0] = name_a
                names[idx, 1] = name_b
                n_names[0] = idx + 1
                break
            na = names[idx, 0]
            if names[idx, 1] - na == name_b - name_a:
                same = True
                for k in range(name_b - name_a):
                    if buf[na + k] != buf[name_a + k]:
                        same = False
                        break
                if same:
                    break
            slot = (slot + 1) & mask
        ints[NAME, i] = idx
        if status_b - status_a == 2 and buf[status_a] == 0x18 and buf[status_a + 1] < 0x80:
            ints[STATUS, i] = buf[status_a + 1]  # the usual form: just a small code
        elif status_a >= 0:
            code, ok = _status_code(buf, status_a, status_b)
            if not ok:
                return -1
            ints[STATUS, i] = code
        i += 1
    return i


@njit(cache=True, nogil=True)
def walk(buf, wanted, wanted_at):
    """One ExportTraceServiceRequest's span fields, as arrays.

    Returns ``(outcome, ints, times, trace_id, span_id, parent, resources, names, n_names,
    attrs)``:
    ``ints`` rows ``RESOURCE .. STATUS`` and ``times`` rows (start, end) have a column per
    span in request order; the id arrays a row per span (bytes copied when the length is
    right, the length in ``ints``); ``resources`` a row per ResourceSpans (byte ranges of the
    service name and instance id, 0..0 when absent, its span count, and the byte range of its
    Resource message(s)); ``names[:n_names]``
    the byte ranges of the distinct span names in order of first appearance (``ints[NAME]``
    indexes them); ``attrs`` rows 2j, 2j + 1 the byte range of span attribute ``j`` of
    ``wanted`` (the keys back to back, ``wanted_at`` their offsets; -1 when absent).
    Outcome ``GIVE_UP``: parse with upb instead.
    """
    n, n_res = _count(buf)
    if n < 0:
        n = n_res = 0
        outcome = GIVE_UP
    else:
        outcome = OK
    ints = np.zeros((10, n), dtype=np.int64)
    times = np.zeros((2, n), dtype=np.uint64)
    trace_id = np.zeros((n, 16), dtype=np.uint8)
    span_id = np.zeros((n, 8), dtype=np.uint8)
    parent = np.zeros((n, 8), dtype=np.uint8)
    resources = np.zeros((n_res, 7), dtype=np.int64)
    size = 16
    while size < 2 * n:
        size *= 2
    table = np.full(size, -1, dtype=np.int64)
    names = np.zeros((n + 1, 2), dtype=np.int64)
    n_names = np.zeros(1, dtype=np.int64)
    attrs = np.full((2 * (wanted_at.shape[0] - 1), n), -1, dtype=np.int64)
    # (length, first byte) of the wanted keys (lengths < 128): bit c of firsts[length] for byte c
    firsts = np.zeros((128, 4), dtype=np.uint64)
    for j in range(wanted_at.shape[0] - 1):
        kl = wanted_at[j + 1] - wanted_at[j]
        if 0 < kl < 128:
            c = np.int64(wanted[wanted_at[j]])
            firsts[kl, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
    if outcome != OK:
        return outcome, ints, times, trace_id, span_id, parent, resources, names, 0, attrs
    end = buf.shape[0]
    i = 0
    r = 0
    p = 0
    while p < end:
        field, wt, p = _tag(buf, p, end)
        if field != 1:  # not resource_spans: walked past (already checked by _count)
            p = _skip(buf, p, end, wt)
            continue
        if wt != 2:
            outcome = GIVE_UP
            break
        ra, rb = _delimited(buf, p, end)
        p = rb
        first = i
        q = ra
        while q < rb:
            field, wt, q = _tag(buf, q, rb)
            if field == 1:  # resource
                if wt != 2:
                    outcome = GIVE_UP
                    break
                xa, xb = _delimited(buf, q, rb)
                if resources[r, RES_END] == 0:
                    resources[r, RES_START] = xa
                resources[r, RES_END] = xb  # a repeated Resource: from the first one's start
                if not _resource(buf, xa, xb, resources, r):
                    outcome = GIVE_UP
                    break
                q = xb
            elif field == 2 and wt == 2:  # scope_spans
                sa, sb = _delimited(buf, q, rb)
                q = sb
                i = _scope_spans(buf, sa, sb, r, i, ints, times, trace_id, span_id, parent, table, names, n_names,
                                 wanted, wanted_at, firsts, attrs)  # fmt: skip
                if i < 0:
                    outcome = GIVE_UP
                    break
            elif field == 2:
                outcome = GIVE_UP  # scope_spans with another wire type
                break
            else:
                q = _skip(buf, q, rb, wt)
        if outcome != OK:
            break
        resources[r, SPANS] = i - first
        r += 1
    return outcome, ints, times, trace_id, span_id, parent, resources, names, n_names[0], attrs


def warm() -> float:
    """Compiles ``walk`` and the upb path's attribute reader (or loads them from numba's cache):
    about 12 s the first time, well under a second after. The daemon calls it before it accepts
    OTLP; returns seconds."""
    t0 = time.perf_counter()
    one_span = (
        b"\x0a\x2e\x0a\x0a\x0a\x08\x0a\x01a\x12\x03\x0a\x01b"  # resource with one attribute
        b"\x12\x20\x12\x1e\x0a\x10" + b"\x01" * 16 + b"\x12\x08" + b"\x02" * 8 + b"\x2a\x00"  # one span
    )
    outcome = walk(np.frombuffer(one_span, dtype=np.uint8), NONE_WANTED, NONE_AT)[0]
    assert outcome == OK, "the wire reader rejected its own warm-up request"
    wanted, wanted_at = wanted_keys(("a",))
    attribute_value(np.frombuffer(b"\x0a\x01a\x12\x03\x0a\x01b", dtype=np.uint8), wanted, wanted_at)  # upb path
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"span wire reader compiled or loaded from cache in {warm():.1f} s")
