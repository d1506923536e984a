"""The telepipe program: the ``telepipe`` command and the daemon that wires sources, the
dataflow and sinks together.

This package is the top of the import graph: it imports ``pipeline`` (records, config,
decoding, analysis state, the dataflow), ``sources`` and ``sinks``; none of them imports it.
"""
