"""``--emit-jsonl FILE``: every window result (and later every event) as one JSON line.

A single output partition, so one worker writes the file. Its resume state is
the file's path and length: on recovery the file is cut back to the last
snapshot and the re-emitted results (same event times, same values) follow, so
the file holds each result exactly once. Resumed onto another path, or onto a
file that is missing or shorter than the snapshot says (moved, rotated, cut by
hand), the file starts clean with a warning: it is never padded, and never cut
to a length that belongs to another file.

With ``ordered=True`` (replay) lines are held and written at the end in a
canonical order (event time, kind, then the line itself): the set of lines
depends only on the recording, but the order in which bytewax delivers them
depends on its epochs, that is on wall time. Sorting makes the file
byte-identical at any speed and on any number of workers.
"""

from sinks.jsonl.encoder import encode_line, sort_key
from sinks.jsonl.sink import JsonlSink

__all__ = ["JsonlSink", "encode_line", "sort_key"]
