"""Prometheus remote write 1.0: window results and scaling signals as samples.

Each closed window becomes samples at its end time (ms), one per series:

- ``telepipe_window_calls``, ``telepipe_window_errors``
  {service_name, span_name, span_kind}
- ``telepipe_window_latency_seconds`` {..., quantile} (0.5, 0.9, 0.95, 0.99, 1 = max)
- ``telepipe_desired_replicas``, ``telepipe_observed_replicas`` {service_name}

Every value is a function of its window alone, so a window re-emitted after a
crash produces identical samples (Prometheus accepts an identical duplicate;
if newer samples of that series already arrived, it answers 400 out-of-order,
which is counted as ``remote_write_rejected_400`` and not retried). When a
series ends (no sample for ``stale_after_s`` of event time) it gets a stale
marker. The body is the snappy *block* encoding of a hand-encoded
``WriteRequest`` protobuf; labels sorted by name, samples of a series in time
order, requests sent one at a time in order through ``sinks/delivery``.

``encoder`` (pure), ``client`` (series state, stale markers, batching through the
shared queue of ``sinks/delivery``), ``sink`` (the bytewax output).

Nothing unexpected stops it, as it runs for months: an exception in the sender
thread costs the request it hit, never the thread (which would leave every later
request to be dropped as queue-full); in the dataflow's ``write_batch`` it costs
the item it hit, and a series that cannot be encoded costs that series' samples in
that request. All of these are counted as ``remote_write_internal_error``.
"""

from sinks.remote_write.client import RemoteWriteClient
from sinks.remote_write.encoder import STALE_NAN, encode_series, encode_write_request, labels_of, samples_of
from sinks.remote_write.sink import RemoteWriteSink

__all__ = ["STALE_NAN", "RemoteWriteClient", "RemoteWriteSink", "encode_series", "encode_write_request", "labels_of",
           "samples_of"]  # fmt: skip
