"""Sampling weights: a span's adjusted count from its tracestate's ``ot=th`` threshold
(../shared/PROTOCOLS.md, OTel probability sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import batch_codec
from pipeline.config import DEFAULT_BUCKETS, WindowsConfig
from pipeline.model import SpanBatch
from pipeline.preaggregate import WindowSpec, preaggregate
from pipeline.sampling import adjusted_count, integer_weights


@pytest.mark.parametrize(
    "state, want",
    [
        ("", 1.0), ("ot=th:0", 1.0), ("ot=th:8", 2.0), ("ot=th:c", 4.0), ("ot=th:e", 8.0), ("ot=th:f", 16.0),
        ("ot=th:fc", 64.0), ("ot=rv:0123456789abcd;th:c", 4.0), ("congo=t61rcWkgMzE, ot=th:8", 2.0),
        (" ot=th:c ", 4.0), ("ot=th:4", 4 / 3), ("ot=th:aaaaaaaaaaaaab", 3.0),
        # not a valid threshold: counted once
        ("ot=th:C", 1.0), ("ot=th:", 1.0), ("ot=th:123456789abcdef", 1.0), ("ot=th:g", 1.0), ("xot=th:c", 1.0),
        ("ot=rv:ff", 1.0),
    ],
)  # fmt: skip
def test_adjusted_count(state, want):
    assert adjusted_count(state) == pytest.approx(want, rel=1e-12)


def test_integer_weights_are_exact_when_whole_and_unbiased_otherwise():
    n = 40_000
    span_ids = np.frombuffer(np.arange(1, n + 1, dtype=">u8").tobytes(), dtype="S8")  # sequential ids
    assert integer_weights(np.ones(n), span_ids) is None
    assert integer_weights(np.full(n, 4.0), span_ids).tolist() == [4] * n
    w = integer_weights(np.full(n, 4 / 3), span_ids)
    assert set(w.tolist()) == {1, 2} and w.sum() == pytest.approx(n * 4 / 3, rel=0.02)
    assert np.array_equal(w, integer_weights(np.full(n, 4 / 3), span_ids))  # the same span, the same weight


def _batch(n: int, weight=None, op="GET /a") -> SpanBatch:
    ids = np.frombuffer(np.arange(1, n + 1, dtype=">u8").tobytes(), dtype="S8")
    return SpanBatch(
        services=("svc",), operations=(op,), instances=("",),
        service_idx=np.zeros(n, np.int32), op_idx=np.zeros(n, np.int32), instance_idx=np.zeros(n, np.int32),
        kind=np.full(n, 2, np.int8), status=np.zeros(n, np.int8),
        end_ns=np.full(n, 10**18 + 5 * 10**9, np.int64), duration_ns=np.arange(1, n + 1, dtype=np.int64) * 10**6,
        trace_id=np.repeat(np.array([b"\x01" * 16], dtype="S16"), n), span_id=ids,
        parent_span_id=np.zeros(n, dtype="S8"), weight=weight,
    )  # fmt: skip


def test_weights_survive_the_spool_form_concat_and_select():
    weighted = _batch(4, np.array([4, 4, 2, 1], np.int32))
    plain = _batch(3, op="GET /b")
    back = batch_codec.decode(batch_codec.encode(weighted))
    assert back.weight.tolist() == [4, 4, 2, 1]
    assert batch_codec.decode(batch_codec.encode(plain)).weight is None
    both = batch_codec.concat([plain, weighted])
    assert both.weight.tolist() == [1, 1, 1, 4, 4, 2, 1]
    assert both.select(np.array([0, 0, 0, 1, 0, 1, 0], bool)).weight.tolist() == [4, 2]
    assert batch_codec.concat([plain, plain]).weight is None


def test_preaggregate_counts_sums_and_quantiles_are_weighted():
    spec = WindowSpec.from_config(WindowsConfig(), DEFAULT_BUCKETS)
    # 1 ms weighs 1, 2 ms weighs 1, 3 ms weighs 8: eight of ten observations are 3 ms
    (part,) = preaggregate(_batch(3, np.array([1, 1, 8], np.int32)), spec)
    assert part.status_counts.tolist() == [[10, 0, 0]]
    assert part.status_sums[0, 0] == pytest.approx(0.001 + 0.002 + 8 * 0.003)
    assert int(part.bucket_counts.sum()) == 10 and int(part.sk_cnt.sum()) == 10
    (plain,) = preaggregate(_batch(3), spec)
    assert plain.status_counts.tolist() == [[3, 0, 0]] and int(plain.sk_cnt.sum()) == 3
