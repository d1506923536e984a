"""Delivering requests to an HTTP sink, shared by Loki and remote write: one bounded
queue and guarded sender thread (``queue``), retries with backoff and a circuit
breaker (``retry``)."""

from sinks.delivery.queue import BatchQueue, Building
from sinks.delivery.retry import MAX_ERROR_BODY_BYTES, CircuitBreaker, Delivery, RetryPolicy

__all__ = ["MAX_ERROR_BODY_BYTES", "BatchQueue", "Building", "CircuitBreaker", "Delivery", "RetryPolicy"]
