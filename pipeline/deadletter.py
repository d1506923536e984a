"""Poison records: an item that makes a step raise is tried again, then set aside.

A Python exception inside a bytewax step stops the dataflow; after a restart the
same record is read again from the spool and stops it again: a crash loop that
also holds up everything behind the record. Instead, the steps that touch input
data run each item through ``DeadLetters.run``: it tries up to ``tries`` times
(a transient failure such as MemoryError may pass), then writes the item to
``dir`` (one pickle file each, named by time and step), counts it as
``dropped{reason="dead_letter"}``, logs the traceback, and the flow goes on.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from pipeline.selfmetrics import SelfMetrics

log = logging.getLogger("telepipe.deadletter")


class DeadLetters:
    def __init__(self, directory: str | Path | None, metrics: SelfMetrics, tries: int = 3) -> None:
        self.dir = Path(directory) if directory else None
        self.metrics = metrics
        self.tries = tries
        self.count = 0

    def run(self, step: str, fn: Callable, item, *args):
        """``fn(item, *args)``, or None once the item has failed ``tries`` times."""
        for attempt in range(1, self.tries + 1):
            try:
                return fn(item, *args)
            except Exception as exc:  # a poison record must not stop the flow
                error = exc
                log.warning("%s failed on an item (try %d of %d): %r", step, attempt, self.tries, exc)
        self._set_aside(step, item, error)
        return None

    def _set_aside(self, step: str, item, error: Exception) -> None:
        self.count += 1
        detail = f"{step}: {error!r}"
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"{time.time_ns()}-{step}-{self.count}.pkl"
            with open(path, "wb") as f:
                pickle.dump({"step": step, "error": repr(error), "traceback": traceback.format_exc(),
                             "item": item}, f)  # fmt: skip
            detail += f"; saved to {path}"
        self.metrics.dropped("dead_letter", 1, detail=detail)
