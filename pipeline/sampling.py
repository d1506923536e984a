"""OTel probability sampling: a span's adjusted count from its W3C ``tracestate``.

A span sampled with probability p stands for 1/p spans. OTel's consistent probability
sampling writes the sampler's rejection threshold into the ``ot`` member of the
tracestate: ``ot=th:<hex>``, up to 14 hex digits, padded right with zeros to 56 bits;
p = 1 - threshold / 2^56 (``th:0`` -> 1, ``th:8`` -> 2, ``th:c`` -> 4, ``th:e`` -> 8).
No ``th`` (or a malformed one) -> 1, as Tempo's ``enable_tracestate_span_multiplier``.

Counts stay integers downstream (windows, histograms, sketches), so a span's weight is an
integer: exact for every threshold whose adjusted count is whole (all power-of-two
probabilities, which is what samplers are usually set to), otherwise the floor or the
ceiling, chosen by a hash of the span id read as a uniform fraction, so the expected
weight is the adjusted count and the same span always weighs the same (replays are
byte-identical).
"""

from __future__ import annotations

import re

import numpy as np

_TH = re.compile(r"^[0-9a-f]{1,14}$")
_MAX_WEIGHT = 2**31 - 1  # int32 column; a threshold this close to 2^56 is 1 span in 2^31


def adjusted_count(tracestate: str) -> float:
    """The adjusted count a tracestate gives its span (1.0 without a valid ``ot=th``)."""
    if "ot=" not in tracestate:
        return 1.0
    for member in tracestate.split(","):
        key, _, value = member.strip().partition("=")
        if key != "ot":
            continue
        for field in value.split(";"):
            name, _, th = field.partition(":")
            if name == "th" and _TH.match(th):
                threshold = int(th.ljust(14, "0"), 16)
                return float(2**56) / float(2**56 - threshold)
        return 1.0
    return 1.0


def integer_weights(adjusted: np.ndarray, span_ids: np.ndarray) -> np.ndarray | None:
    """Integer weights (int32) of spans with these adjusted counts and span ids (``S8``); None
    when every span weighs 1."""
    if not len(adjusted) or bool((adjusted == 1.0).all()):
        return None
    whole = np.floor(adjusted)
    frac = adjusted - whole
    out = whole
    if frac.any():
        out = whole + (_uniform(span_ids) < frac)
    return np.minimum(out, _MAX_WEIGHT).astype(np.int32)



def _uniform(span_ids: np.ndarray) -> np.ndarray:
    """A fraction in [0, 1) per span id, well mixed (splitmix64's finalizer), so sequential or
    otherwise patterned ids still round without bias."""
    x = np.frombuffer(np.ascontiguousarray(span_ids).tobytes(), dtype="<u8").copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)
