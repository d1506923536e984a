"""Grafana Loki sink: log batches and telepipe's events -> gzip JSON push requests.

Shaped like Vector's loki sink, one straight pipeline: ``encoder`` (pure: streams,
labels, structured metadata, the push body) -> ``client`` (batched by size and age,
bounded label sets, queued and sent in order through ``sinks/delivery``) -> ``sink``
(the bytewax output). Every line that is not delivered is counted through
``metrics.dropped``.
"""

from sinks.delivery import RetryPolicy
from sinks.loki.client import OVERFLOW_SERVICE, PUSH_PATH, LokiClient, push_url
from sinks.loki.encoder import encode_events, encode_push, encode_streams, level_of, metadata_key
from sinks.loki.sink import LokiSink

__all__ = [
    "OVERFLOW_SERVICE", "PUSH_PATH", "LokiClient", "LokiSink", "RetryPolicy", "encode_events", "encode_push",
    "encode_streams", "level_of", "metadata_key", "push_url",
]  # fmt: skip
