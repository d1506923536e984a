"""SpanIndex (the service graph's span id -> service code table) against a dict."""

from __future__ import annotations

import pickle

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.span_index import SpanIndex

ids64 = st.integers(0, 2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.one_of(ids64, st.integers(0, 40)), st.integers(0, 9)), max_size=300), max_size=6),
       st.lists(st.one_of(ids64, st.integers(0, 40)), max_size=100))  # fmt: skip
def test_inserts_and_lookups_agree_with_a_dict(batches, queries):
    index, ref = SpanIndex(max_ids=10**6, capacity=2), {}
    for batch in batches:
        ids = np.array([i for i, _ in batch], dtype=np.uint64)
        codes = np.array([c for _, c in batch], dtype=np.int32)
        assert index.insert(ids, codes) == 0
        ref.update(batch)
        assert len(index) == len(ref)
    for probe in (index, pickle.loads(pickle.dumps(index))):
        out = np.full(len(queries), -1, dtype=np.int32)
        probe.lookup(np.array(queries, dtype=np.uint64), out)
        assert out.tolist() == [ref.get(q, -1) for q in queries]


def test_lookup_fills_only_what_is_not_found_yet():
    index = SpanIndex(100)
    index.insert(np.array([7, 8], dtype=np.uint64), np.array([1, 2], dtype=np.int32))
    out = np.array([5, -1, -1], dtype=np.int32)
    index.lookup(np.array([7, 8, 9], dtype=np.uint64), out)
    assert out.tolist() == [5, 2, -1]  # a newer generation's answer is kept


def test_at_most_max_ids_and_the_rest_counted():
    index = SpanIndex(max_ids=1000)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 2**63, size=1500, dtype=np.int64).astype(np.uint64)
    assert index.insert(ids[:900], np.zeros(900, np.int32)) == 0
    assert index.insert(ids[900:], np.ones(600, np.int32)) == 500  # 100 fit
    assert len(index) == 1000 and index.keys.size == 2048  # half full at most
    assert index.insert(ids[:10], np.full(10, 3, np.int32)) == 0  # known ids are updated when full
    out = np.full(1500, -1, dtype=np.int32)
    index.lookup(ids, out)
    assert (out[:10] == 3).all() and (out[10:900] == 0).all() and (out[900:1000] == 1).all() and (out[1000:] == -1).all()


def test_snapshot_holds_the_filled_slots_only():
    index = SpanIndex(max_ids=10**6)
    ids = np.arange(1, 300_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # also sequential-looking ids
    index.insert(ids, (np.arange(300_000) % 7).astype(np.int32))
    blob = pickle.dumps(index)
    assert len(blob) < 300_000 * 12 + 1000 < index.keys.size * 12
    again = pickle.loads(blob)
    out = np.full(ids.size, -1, dtype=np.int32)
    again.lookup(ids, out)
    assert out.tolist() == (np.arange(300_000) % 7).tolist()


def test_id_zero_is_an_ordinary_id():
    """An empty slot's key is 0 too: id 0 must still be counted, so the table never fills up."""
    index = SpanIndex(max_ids=1, capacity=2)
    index.insert(np.array([0], dtype=np.uint64), np.array([4], dtype=np.int32))
    assert len(index) == 1
    assert index.insert(np.array([7], dtype=np.uint64), np.array([1], dtype=np.int32)) == 1  # full
    out = np.full(2, -1, dtype=np.int32)
    index.lookup(np.array([9, 0], dtype=np.uint64), out)  # returns: one slot is still empty
    assert out.tolist() == [-1, 4]
