"""What every decoder shares: the outcome of decoding a request, the error for a malformed
one, the limits on log attributes and which span attributes are read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pipeline.metric_model import MetricBatch
from pipeline.model import LogBatch, SpanBatch

UNKNOWN_SERVICE = "unknown_service"
MAX_ANYVALUE_DEPTH = 32


class MalformedRequest(ValueError):
    """The request bytes are not a valid OTLP message."""


@dataclass(frozen=True)
class Decoded:
    """Outcome of decoding one request."""

    batch: SpanBatch | LogBatch | MetricBatch | None  # None when no item was valid (or the request was empty)
    received: int
    rejected: int
    message: str  # why items were rejected, or warnings about kept ones ('' when neither)
    future: int = 0  # of ``rejected``: items ending too far ahead of the receiver's clock


@dataclass(frozen=True)
class DecodeLimits:
    max_log_attributes: int = 16
    max_attribute_value_bytes: int = 4096
    # The span attributes read into span batches (string values; what the configured analyses
    # use): every other attribute is walked past, unread.
    span_attributes: tuple[str, ...] = ()
    # Of those, the keys a span without them takes from its resource's attributes (dimensions:
    # ``deployment.environment`` is usually a resource attribute).
    resource_attributes: tuple[str, ...] = ()
    # Read the spans' exception events (``exception.type`` of the last one, as the attribute
    # ``EXCEPTION_TYPE``): for telepipe_exceptions_total.
    exceptions: bool = False


def parse(message, data: bytes, name: str):
    """``data`` parsed into ``message`` (upb); not that message: ``MalformedRequest``."""
    try:
        message.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise MalformedRequest(f"malformed {name}: {exc}") from exc
    return message


def _reason_message(reasons: Counter[str]) -> str:
    return "; ".join(f"{n} {what}" for what, n in sorted(reasons.items()))


