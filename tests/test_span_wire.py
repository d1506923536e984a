"""The wire reader (pipeline/decode/span_wire.py) against upb: identical results or errors, always.

``decode_traces`` reads spans straight from the wire bytes and falls back to upb
(``decode_traces_upb``) for what the reader does not handle; these tests check that
the fast path agrees with upb on real and generated requests, and that it is
actually taken for everything a real exporter sends.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.load import RecordedTraces, SyntheticTraces, Template
from bench.replay_bench import payloads
from pipeline.decode import Decoded, DecodeLimits, MalformedRequest, decode_traces, decode_traces_upb, span_wire
from pipeline.decode import span_attributes

from .conftest import ONLINEBOUTIQUE, TRAINTICKET

ZIPKIN = ONLINEBOUTIQUE.parent / "zipkin-captures.otlp.jsonl"


WANTED = DecodeLimits(span_attributes=("db.system", "db.query.text", "k"))


def walked(data: bytes, limits: DecodeLimits = DecodeLimits()) -> bool:
    return span_wire.walk(np.frombuffer(data, dtype=np.uint8), *span_attributes.wanted_keys(limits.span_attributes))[0] == 0


def outcome(decode, data: bytes, limits: DecodeLimits = DecodeLimits()):
    try:
        return decode(data, limits)
    except MalformedRequest:
        return "malformed"


def assert_same(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Decoded | str:
    fast, ref = outcome(decode_traces, data, limits), outcome(decode_traces_upb, data, limits)
    if isinstance(ref, str) or isinstance(fast, str):
        assert fast == ref
        return ref
    assert (fast.received, fast.rejected, fast.message) == (ref.received, ref.rejected, ref.message)
    assert (fast.batch is None) == (ref.batch is None)
    if ref.batch is not None:
        for name in ("services", "operations", "instances"):
            assert getattr(fast.batch, name) == getattr(ref.batch, name), name
        for name in ("service_idx", "op_idx", "instance_idx", "kind", "status", "end_ns", "duration_ns",
                     "trace_id", "span_id", "parent_span_id"):  # fmt: skip
            a, b = getattr(fast.batch, name), getattr(ref.batch, name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert (fast.batch.weight is None) == (ref.batch.weight is None)
        if ref.batch.weight is not None:
            assert np.array_equal(fast.batch.weight, ref.batch.weight)
        assert fast.batch.attr_keys == ref.batch.attr_keys
        # the keys some span has, in the order asked for (() when no span had one)
        assert fast.batch.attr_keys == tuple(k for k in limits.span_attributes if k in fast.batch.attr_keys)
        if fast.batch.attr_keys:  # the same value per span and key (tables may differ in order)
            for b in (fast.batch, ref.batch):
                assert b.attrs.shape == (len(b.attr_keys), len(b)) and (b.attrs >= 0).any(axis=1).all()
            values = [[[b.attr_values[i] if i >= 0 else None for i in row] for row in b.attrs.tolist()]
                      for b in (fast.batch, ref.batch)]  # fmt: skip
            assert values[0] == values[1]
    return ref


# ------------------------------------------------------------------ raw protobuf encoding


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append(n & 0x7F | 0x80)
        n >>= 7


def field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    tag = varint(number << 3 | wire_type)
    if wire_type == 0:
        return tag + varint(payload)
    if wire_type == 1:
        return tag + int(payload).to_bytes(8, "little")
    if wire_type == 5:
        return tag + int(payload).to_bytes(4, "little")
    return tag + varint(len(payload)) + payload


def msg(number: int, *parts: bytes) -> bytes:
    return field(number, 2, b"".join(parts))


def attribute(key: str, value: str) -> bytes:
    return msg(1, field(1, 2, key.encode()), msg(2, field(1, 2, value.encode())))


def span_attribute(key: bytes, value: bytes) -> bytes:
    return msg(9, field(1, 2, key), field(2, 2, value))


def span(name: str = "op", tid: bytes = b"\x01" * 16, sid: bytes = b"\x02" * 8, *extra: bytes) -> bytes:
    return msg(
        2, field(1, 2, tid), field(2, 2, sid), field(5, 2, name.encode()), field(6, 0, 2),
        field(7, 1, 1_000), field(8, 1, 3_000), *extra,
    )  # fmt: skip


def request(*spans: bytes, resource: bytes = attribute("service.name", "svc")) -> bytes:
    return msg(1, msg(1, resource), msg(2, *spans))


# ------------------------------------------------------------------------- real requests


@pytest.mark.parametrize("copies", [1, 3])
def test_recordings_take_the_fast_path_with_upbs_results(copies):
    requests = [body for signal, body, _ in payloads([ONLINEBOUTIQUE, TRAINTICKET, ZIPKIN], copies) if signal == "spans"]
    assert len(requests) > 100
    for body in requests:
        assert walked(body)
        assert isinstance(assert_same(body), Decoded)


@pytest.mark.parametrize("mix", ["recorded", "synthetic"])
def test_load_generator_requests_take_the_fast_path(mix):
    traces = RecordedTraces() if mix == "recorded" else SyntheticTraces(1000)
    for spans in (1, 64, 512):
        body = Template(spans, 7, traces).at(time.time_ns(), salt=12345)
        assert walked(body)
        assert assert_same(body).received == spans


# ------------------------------------------------------------------------ crafted requests

CRAFTED = {
    "empty request": b"",
    "resource without spans": msg(1, msg(1, attribute("service.name", "a"))),
    "empty scope and empty span": msg(1, msg(2), msg(2, field(2, 2, b""))),
    "unknown fields everywhere": field(9, 0, 5) + msg(
        1, field(7, 5, 1), msg(1, field(3, 1, 9), attribute("service.name", "a"), field(2, 0, 3)),
        msg(2, msg(1, field(1, 2, b"scope")), span("x", b"\x01" * 16, b"\x02" * 8, field(9, 2, b"\x0a\x01k"),
            field(10, 0, 1), field(16, 5, 0x301), field(99, 1, 7), field(2047, 0, 1)), field(3, 2, b"url")),
    ),  # fmt: skip
    "duplicated fields, last wins": request(
        span("first", b"\x03" * 16, b"\x04" * 8, field(5, 2, b"second"), field(1, 2, b"\x05" * 16),
             field(6, 0, 3), field(15, 2, field(3, 0, 2)), field(15, 2, field(3, 0, 1)), field(8, 1, 9_000)),
    ),  # fmt: skip
    "missing fields": request(msg(2, field(1, 2, b"\x01" * 16), field(2, 2, b"\x02" * 8))),
    "long name and long span": request(span("n" * 300, b"\x01" * 16, b"\x02" * 8, field(9, 2, b"x" * 20_000))),
    "kinds beyond int32": request(*(span("k", b"\x01" * 16, b"\x02" * 8, field(6, 0, k))
                                    for k in (2**32 + 1, -1, 2**31, 5, 6, 2**63))),  # fmt: skip
    "status forms": request(*(span("s", b"\x01" * 16, b"\x02" * 8, field(15, 2, st_))
                              for st_ in (b"", field(3, 0, 2), field(2, 2, b"boom") + field(3, 0, 1),
                                          field(3, 0, 2**40 + 2), field(3, 0, -5), field(9, 0, 1) + field(3, 0, 2),
                                          field(2, 2, "é🙂".encode()) + field(3, 0, 2)))),  # fmt: skip
    "bad status": request(span("s", b"\x01" * 16, b"\x02" * 8, field(15, 2, b"\x18"))),
    "status message not utf-8": request(span("s", b"\x01" * 16, b"\x02" * 8, field(15, 2, field(2, 2, b"\xc3")))),
    "unicode names": request(span("é"), span("日本"), span("🙂"), span("é")),
    "trace states": request(*(span("t", b"\x01" * 16, bytes([0, 0, 0, 0, 0, 0, 0, i + 1]), field(3, 2, ts))
                              for i, ts in enumerate((b"ot=th:c", b"", b"k=v,ot=th:8;rv:ab", b"ot=th:zz", "é=1".encode(),
                                                      b"ot=th:4", b"ot=th:c")))),  # fmt: skip
    "invalid utf-8 trace state": request(span("t", b"\x01" * 16, b"\x02" * 8, field(3, 2, b"\xc3"))),
    "invalid utf-8 name": request(msg(2, field(5, 2, b"\xc0\x80"))),
    "surrogate name": request(msg(2, field(5, 2, b"\xed\xa0\x80"))),
    "beyond U+10FFFF": request(msg(2, field(5, 2, b"\xf4\x90\x80\x80"))),
    "truncated sequence": request(msg(2, field(5, 2, b"ab\xe6\x97"))),
    "invalid utf-8 in a skipped attribute": request(span("a", b"\x01" * 16, b"\x02" * 8, field(9, 2, b"\x0a\x01\xff"))),
    "invalid utf-8 service": request(span(), resource=msg(1, field(1, 2, b"service.name"), msg(2, field(1, 2, b"\xff")))),
    "service twice, resource twice": msg(
        1, msg(1, attribute("service.name", "a"), attribute("service.instance.id", "i1"), attribute("service.name", "b")),
        msg(2, span()), msg(1, attribute("service.name", "c")),
    ),  # fmt: skip
    "service value not a string": request(span(), resource=msg(1, field(1, 2, b"service.name"), msg(2, field(3, 0, 7)))),
    "empty service name": request(span(), resource=attribute("service.name", "")),
    "value merged twice": request(span(), resource=msg(
        1, field(1, 2, b"service.name"), msg(2, field(1, 2, b"x")), msg(2, field(3, 0, 1)))),  # fmt: skip
    "bad ids": request(span("a", b"\x01" * 15), span("b", bytes(16)), span("c", b"\x01" * 16, bytes(8)),
                       span("d", b"\x01" * 16, b"\x02" * 8, field(4, 2, bytes(8))),
                       span("e", b"\x01" * 16, b"\x02" * 8, field(4, 2, b"\x03" * 7)),
                       span("f", b"\x01" * 16, b"\x02" * 8, field(4, 2, b""))),  # fmt: skip
    "an id, then an id of another length": request(
        span("p", b"\x01" * 16, b"\x02" * 8, field(4, 2, b"\x02" * 8), field(4, 2, b"")),
        span("t", b"\x01" * 16, b"\x02" * 8, field(1, 2, b"\x03" * 3)),
        span("s", b"\x01" * 16, b"\x02" * 8, field(2, 2, b""), field(4, 2, b"\x04" * 8), field(4, 2, b"\x05" * 9)),
    ),  # fmt: skip
    "end before start": request(span("a", b"\x01" * 16, b"\x02" * 8, field(8, 1, 10))),
    "group in a span": request(span("g", b"\x01" * 16, b"\x02" * 8, varint(9 << 3 | 3) + varint(9 << 3 | 4))),
    "known field, other wire type": request(span("w", b"\x01" * 16, b"\x02" * 8, field(7, 0, 5), field(1, 0, 3))),
    "resource_spans as a varint": field(1, 0, 3),
    "truncated": request(span())[:-2],
    "length past the end": request(span()) + b"\x0a\x05ab",
    "field number zero": request(span()) + b"\x02\x00",
    "11-byte varint": request(span("v", b"\x01" * 16, b"\x02" * 8, b"\x48" + b"\xff" * 10 + b"\x01")),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_requests_agree_with_upb(case):
    assert_same(CRAFTED[case])


def test_the_fast_path_handles_what_exporters_send():
    """Crafted cases that stay on the fast path (the others give up and use upb)."""
    for case in ("empty request", "unknown fields everywhere", "duplicated fields, last wins", "long name and long span",
                 "kinds beyond int32", "status forms", "unicode names", "service twice, resource twice", "bad ids",
                 "an id, then an id of another length", "trace states"):  # fmt: skip
        assert walked(CRAFTED[case]), case
    for case in ("group in a span", "known field, other wire type", "truncated", "invalid utf-8 name",
                 "invalid utf-8 trace state"):  # fmt: skip
        assert not walked(CRAFTED[case]), case


def test_span_attributes_are_read_only_when_wanted_and_alike_on_both_paths():
    def kv(key: bytes, value: bytes) -> bytes:
        return span_attribute(key, field(1, 2, value))

    spans = [
        span("a", b"\x01" * 16, b"\x02" * 8, kv(b"db.system", b"postgresql"), kv(b"k", b"v1"), kv(b"k", b"v2")),
        span("b", b"\x01" * 16, b"\x03" * 8, msg(9, field(2, 2, field(1, 2, b"late key")), field(1, 2, b"k")),
             kv(b"db.query.text", b"\xffSELECT")),  # value before key; not UTF-8: replaced
        span("c", b"\x01" * 16, b"\x04" * 8, msg(9, field(1, 2, b"k"), field(2, 2, field(3, 0, 7))),  # an int
             msg(9, field(1, 2, b"db.system"), field(2, 2, b"\x0a")),  # a broken AnyValue: ignored
             kv(b"other", b"x"), kv(b"k", b"")),  # an empty string: absent
    ]  # fmt: skip
    body = request(*spans)
    assert walked(body, WANTED) and walked(body)
    assert_same(body, WANTED)
    b = decode_traces(body, WANTED).batch
    got = [[b.attr_values[i] if i >= 0 else None for i in row] for row in b.attrs.T.tolist()]
    assert got == [["postgresql", None, "v2"], [None, "\ufffdSELECT", "late key"], [None, None, None]]
    assert decode_traces(body).batch.attrs is None  # nothing wanted: nothing read


def test_results_of_the_crafted_cases():
    states = decode_traces(CRAFTED["trace states"]).batch
    # th:c -> 4, none -> 1, th:8 -> 2, malformed th -> 1, no ot -> 1, th:4 -> 4/3: 1 or 2 by span id
    assert states.weight.tolist()[:4] + states.weight.tolist()[6:] == [4, 1, 2, 1, 4]
    assert states.weight[4] == 1 and states.weight[5] in (1, 2)
    dup = decode_traces(CRAFTED["duplicated fields, last wins"]).batch
    assert dup.operations == ("second",) and dup.trace_id[0] == b"\x05" * 16
    assert dup.kind.tolist() == [3] and dup.status.tolist() == [1] and dup.duration_ns.tolist() == [8_000]
    assert decode_traces(CRAFTED["kinds beyond int32"]).batch.kind.tolist() == [1, 0, 0, 5, 0, 0]
    assert decode_traces(CRAFTED["status forms"]).batch.status.tolist() == [0, 2, 1, 2, 0, 2, 2]
    twice = decode_traces(CRAFTED["service twice, resource twice"]).batch
    assert twice.services == ("c",) and twice.instances == ("i1",)
    bad = decode_traces(CRAFTED["bad ids"])
    assert (bad.received, bad.rejected) == (6, 4)  # all-zero and empty parents are roots
    with pytest.raises(MalformedRequest):
        decode_traces(CRAFTED["invalid utf-8 name"])


# ---------------------------------------------------------------------- generated requests

ids = st.sampled_from([b"\x01" * 16, b"\x07" * 16, b"\x02" * 8, b"\x09" * 8, b"", bytes(8), bytes(16), b"\x05" * 7])
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
numbers = st.integers(-(2**63), 2**64 - 1)


def unknown_fields(numbers):
    return st.builds(
        lambda n, wt, v: field(n, wt, v if wt != 2 else v.to_bytes(8, "little", signed=False)[: v % 9]),
        st.sampled_from(numbers),
        st.sampled_from([0, 1, 2, 5]),
        st.integers(0, 2**32 - 1),
    )


unknown = unknown_fields([10, 11, 12, 13, 14, 16, 40, 1000])
trace_states = st.one_of(
    st.sampled_from(["", "ot=th:c", "ot=th:8;rv:abcdef01234567", "vendor=x, ot=th:4", "ot=th:fffffffffffffff",
                     "ot=th:", "ot=rv:01", "ot=th:C"]),
    texts,
)  # fmt: skip
status = st.lists(
    st.one_of(
        st.builds(lambda c: field(3, 0, c), numbers),
        st.builds(lambda m: field(2, 2, m.encode()), texts),
        unknown_fields([1, 4, 16]),
    ),
    max_size=3,
).map(b"".join)
span_field = st.one_of(
    st.builds(lambda v: field(1, 2, v), ids),
    st.builds(lambda v: field(2, 2, v), ids),
    st.builds(lambda v: field(4, 2, v), ids),
    st.builds(lambda v: field(5, 2, v.encode()), texts),
    st.builds(lambda v: field(6, 0, v), numbers),
    st.builds(lambda v: field(7, 1, v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: field(8, 1, v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: field(15, 2, v), status),
    st.builds(lambda v: field(3, 2, v.encode()), trace_states),
    st.builds(
        span_attribute,
        st.sampled_from([b"db.system", b"db.query.text", b"k", b"other", b"db.system.name", b"\xff"]),
        st.one_of(
            st.builds(lambda t: field(1, 2, t.encode()), texts),  # a string value
            st.builds(lambda b: field(1, 2, b), st.binary(max_size=6)),  # not UTF-8, sometimes
            st.builds(lambda n: field(3, 0, n), numbers),  # an int value
            st.just(b""),  # an empty AnyValue
        ),
    ),
    unknown,
)
spans = st.lists(st.lists(span_field, max_size=12).map(lambda fs: field(2, 2, b"".join(fs))), max_size=6)
attr = st.builds(
    lambda k, v: msg(1, field(1, 2, k.encode()), msg(2, v)),
    st.sampled_from(["service.name", "service.instance.id", "host.name"]),
    st.one_of(st.builds(lambda s: field(1, 2, s.encode()), texts), st.builds(lambda n: field(3, 0, n), numbers)),
)
resource_spans = st.builds(
    lambda res, scopes: msg(1, *(msg(1, *a) for a in res), *(msg(2, *s) for s in scopes)),
    st.lists(st.lists(attr, max_size=4), max_size=2),
    st.lists(spans, max_size=3),
)
requests = st.lists(resource_spans, max_size=4).map(b"".join)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_generated_requests_agree_with_upb(body):
    assert_same(body)
    assert walked(body)  # generated from the schema: nothing for upb alone
    assert_same(body, WANTED)
    assert walked(body, WANTED)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.integers(0, 10_000), st.binary(min_size=1, max_size=6), st.sampled_from(["insert", "overwrite", "cut"]))
def test_mutated_requests_agree_with_upb(body, at, noise, how):
    at = at % (len(body) + 1)
    if how == "insert":
        body = body[:at] + noise + body[at:]
    elif how == "overwrite":
        body = body[:at] + noise + body[at + len(noise) :]
    else:
        body = body[:at] + body[at + len(noise) :]
    assert_same(body)
    assert_same(body, WANTED)
