"""SpanIndex: span id -> small int (a service code), a hash table in numpy arrays.

The service graph keeps the sampled spans of the last ~40 s of event time to find
each child's parent: at 300,000 spans/s (75,000 kept) that is ~3 million ids. A
Python dict of them cost ~150 bytes an id (440 MiB), ~800 ns of dict work per span
read, and 0.55 s to pickle at every snapshot (measured, bench/load traffic with
fresh ids). Here an id costs 12 bytes in two arrays (open addressing, linear
probing, at most half full), inserts and look-ups are compiled loops over a batch,
and a snapshot pickles the filled slots only.

A negative value marks an empty slot (codes are >= 0).
"""

from __future__ import annotations

import time

import numba
import numpy as np

MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: span ids are random, but not all clients' are


@numba.njit(cache=True, nogil=True)
def _insert(keys, values, shift, held, ids, codes, limit):
    """Stores ``ids[i] -> codes[i]`` (a later one wins) in a table holding ``held`` ids, until
    it holds ``limit``; returns how many it holds and how many new ids found it full."""
    mask = np.uint64(keys.size - 1)
    full = 0
    for i in range(ids.size):
        key = ids[i]
        slot = (key * MIX) >> shift
        while True:
            if values[slot] < 0:  # empty (checked first: an empty slot's key is 0, a valid id here)
                if held >= limit:
                    full += 1
                else:
                    keys[slot] = key
                    values[slot] = codes[i]
                    held += 1
                break
            if keys[slot] == key:
                values[slot] = codes[i]
                break
            slot = (slot + np.uint64(1)) & mask
    return held, full


@numba.njit(cache=True, nogil=True)
def _lookup(keys, values, shift, ids, out):
    """``out[i]`` = the code of ``ids[i]`` where ``out[i]`` is still -1 and the id is held."""
    mask = np.uint64(keys.size - 1)
    for i in range(ids.size):
        if out[i] >= 0:
            continue
        key = ids[i]
        slot = (key * MIX) >> shift
        while values[slot] >= 0:
            if keys[slot] == key:
                out[i] = values[slot]
                break
            slot = (slot + np.uint64(1)) & mask


class SpanIndex:
    """At most ``max_ids`` span ids, each with an int32 code. Picklable (filled slots only)."""

    def __init__(self, max_ids: int, capacity: int = 1024) -> None:
        assert capacity >= 2 and capacity & (capacity - 1) == 0, "a power of two"
        self.max_ids = max_ids
        self.held = 0
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.values = np.full(capacity, -1, dtype=np.int32)

    def __len__(self) -> int:
        return self.held

    def insert(self, ids: np.ndarray, codes: np.ndarray) -> int:
        """Stores the ids (uint64) with their codes; returns how many of them (new ids, counted
        per occurrence) were not stored because ``max_ids`` are held."""
        need = self.held + ids.size
        if need * 2 > self.keys.size and self.keys.size < 2 * self.max_ids:
            capacity = self.keys.size
            while capacity < 2 * min(need, self.max_ids):
                capacity *= 2
            self._rehash(capacity)
        # half full at most (probes stay short): the limit is what fits that way
        limit = min(self.max_ids, self.keys.size // 2)
        codes = np.asarray(codes, dtype=np.int32)
        self.held, full = _insert(self.keys, self.values, self._shift(), self.held, ids, codes, limit)
        return full

    def lookup(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Fills ``out[i]`` (int32, -1 where not known yet) with the code of ``ids[i]``, if held."""
        if self.held:
            _lookup(self.keys, self.values, self._shift(), ids, out)

    def codes(self) -> np.ndarray:
        """The codes held (one per id)."""
        return self.values[self.values >= 0]

    def recode(self, new: np.ndarray) -> None:
        """Every held code c becomes ``new[c]``."""
        filled = self.values >= 0
        self.values[filled] = new[self.values[filled]]

    def _shift(self) -> np.uint64:
        """The hash's top bits index the table (its size is a power of two)."""
        return np.uint64(64 - (self.keys.size.bit_length() - 1))

    def _rehash(self, capacity: int) -> None:
        filled = self.values >= 0
        keys, values = self.keys[filled], self.values[filled]
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.values = np.full(capacity, -1, dtype=np.int32)
        self.held, _ = _insert(self.keys, self.values, self._shift(), 0, keys, values, capacity)

    def __getstate__(self) -> dict:
        filled = self.values >= 0
        return {
            "max_ids": self.max_ids, "capacity": self.keys.size,
            "keys": self.keys[filled], "values": self.values[filled],
        }  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.max_ids = state["max_ids"]
        self.keys = np.zeros(state["capacity"], dtype=np.uint64)
        self.values = np.full(state["capacity"], -1, dtype=np.int32)
        keys, values = state["keys"], state["values"]
        self.held, _ = _insert(self.keys, self.values, self._shift(), 0, keys, values, state["capacity"])


def warm() -> float:
    """Compiles the table's loops (or loads them from numba's cache); returns seconds."""
    t0 = time.perf_counter()
    index = SpanIndex(4)
    index.insert(np.array([1, 2], dtype=np.uint64), np.array([0, 1], dtype=np.int32))
    out = np.full(3, -1, dtype=np.int32)
    index.lookup(np.array([2, 3, 1], dtype=np.uint64), out)
    assert out.tolist() == [1, -1, 0], "the span index lost its warm-up ids"
    return time.perf_counter() - t0
