"""Warms telepipe's numba code: the span wire reader (``pipeline/decode/span_wire.py``) and the
service graph's span index (``pipeline/span_index.py``).

    python -m pipeline.compiled

compiles them into numba's cache next to their files (about 15 s the first time), or
loads them from it (well under a second). ``make venv``, the Dockerfile, the test
session and the daemon (before it accepts OTLP) call it, so no request waits for it.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline import span_index
from pipeline.decode import span_attributes, span_wire


def warm() -> float:
    """Compiles or loads everything; returns seconds."""
    t0 = time.perf_counter()
    span_attributes.intern_ranges(np.frombuffer(b"ab", dtype=np.uint8), np.array([[0, 1], [1, 2]], np.int64))
    return time.perf_counter() - t0 + span_wire.warm() + span_index.warm()


if __name__ == "__main__":
    print(f"numba code compiled or loaded from cache in {warm():.1f} s")
