import math
import pickle

import numpy as np
import pytest

from pipeline.sketch import LogMapping, LogSketch


def exact(values, q):
    return np.sort(values)[math.floor(q * (len(values) - 1))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_within_relative_accuracy(seed):
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=-5, sigma=2, size=20_000)  # heavy tailed, us .. s
    sk = LogSketch(LogMapping(0.01))
    sk.add(values)
    for q in (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        est, ex = sk.quantile(q), exact(values, q)
        assert abs(est - ex) <= 0.01 * ex + 1e-15, (q, est, ex)
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    assert sk.quantiles(qs) == [sk.quantile(q) for q in qs]


def test_merge_equals_single_sketch():
    rng = np.random.default_rng(7)
    a, b = rng.exponential(0.01, 5000), rng.exponential(1.0, 3000)
    one = LogSketch(LogMapping())
    one.add(np.concatenate([a, b]))
    left, right = LogSketch(LogMapping()), LogSketch(LogMapping())
    left.add(a)
    right.add(b)
    left.merge(right)
    assert left.count == one.count == 8000
    for q in (0.5, 0.9, 0.99):
        assert left.quantile(q) == one.quantile(q)


def test_zero_durations_and_empty():
    sk = LogSketch(LogMapping())
    assert math.isnan(sk.quantile(0.5))
    sk.add(np.array([0.0, 0.0, 0.0, 1.0]))
    assert sk.quantile(0.5) == 0.0
    assert sk.quantile(1.0) == 1.0
    assert sk.count == 4 and sk.zero_count == 3


def test_pickle_round_trip_is_compact():
    sk = LogSketch(LogMapping())
    sk.add(np.random.default_rng(0).lognormal(-4, 1, 100_000))
    raw = pickle.dumps(sk)
    back = pickle.loads(raw)
    assert back.count == sk.count and back.quantile(0.99) == sk.quantile(0.99)
    nz = np.flatnonzero(sk.counts)
    occupied = int(nz[-1] - nz[0]) + 1
    assert len(raw) < occupied * 4 + 400  # uint32 counts over the occupied range, little else


def test_merge_rejects_other_accuracy():
    with pytest.raises(ValueError):
        LogSketch(LogMapping(0.01)).merge(LogSketch(LogMapping(0.02)))
