"""Poison records: an item that makes a step raise is set aside, not crash-looped on.

A Python exception inside a bytewax step stops the dataflow; after a restart the
same record is read again from the spool and stops it again: a crash loop that
also holds up everything behind the record. Instead, the steps that touch input
data run each item through ``DeadLetters``:

- ``run(step, fn, item, tries=N)`` for pure steps (pre-aggregation): tried up to
  ``N`` times (a transient failure such as MemoryError may pass), then set aside.
- ``run(step, fn, item, tries=1)`` for steps that change state (the service-graph
  join, a service's analysis): never retried, since a second try would apply the
  part of the first that ran before it raised once more.
- ``set_aside(step, item, error)`` when the caller caught the exception itself.

Setting aside writes the item with the exception and its traceback to ``dir``
(one pickle file each, named by time and step; at most ``max_files`` files, after
which items are counted and logged but not saved), counts it as
``dropped{reason="dead_letter"}`` and logs the traceback. Writing the file may
itself fail (disk full, an item that cannot be pickled): that is logged and
counted as ``dropped{reason="dead_letter_unsaved"}``; it never escapes the step.
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

MAX_FILES = 1000


class DeadLetters:
    def __init__(
        self, directory: str | Path | None, metrics: SelfMetrics, tries: int = 3, max_files: int = MAX_FILES
    ) -> None:
        self.dir = Path(directory) if directory else None
        self.metrics = metrics
        self.tries = tries
        self.max_files = max_files
        self.count = 0
        self._saved: int | None = None  # files in ``dir``, counted once on the first write

    def run(self, step: str, fn: Callable, item, *args, tries: int | None = None):
        """``fn(item, *args)``, or None once the item has failed ``tries`` times (default
        ``self.tries``; pass 1 for a function that changes state)."""
        tries = self.tries if tries is None else tries
        for attempt in range(1, tries + 1):
            try:
                return fn(item, *args)
            except Exception as exc:  # a poison record must not stop the flow
                error = exc
                if attempt < tries:
                    log.warning("%s failed on an item (try %d of %d): %r", step, attempt, tries, exc)
        self.set_aside(step, item, error)
        return None

    def set_aside(self, step: str, item, error: BaseException) -> None:
        """Write ``item`` with ``error`` and its traceback; count and log it. Never raises."""
        self.count += 1
        trace = "".join(traceback.format_exception(error))
        detail = f"{step}: {error!r}"
        saved = self._save(step, item, error, trace)
        if saved:
            detail += f"; {saved}"
        log.error("dead letter from %s:\n%s", step, trace)
        self.metrics.dropped("dead_letter", 1, detail=detail)

    def _save(self, step: str, item, error: BaseException, trace: str) -> str:
        """Where the dead letter went ("saved to PATH", "not saved: why"), '' without a directory."""
        if self.dir is None:
            return ""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self._saved is None:
                self._saved = sum(1 for _ in self.dir.glob("*.pkl"))
            if self._saved >= self.max_files:
                return f"not saved: {self.dir} already holds {self.max_files} dead letters"
            path = self.dir / f"{time.time_ns()}-{step}-{self.count}.pkl"
            data = pickle.dumps({"step": step, "error": repr(error), "traceback": trace, "item": item})
            path.write_bytes(data)
            self._saved += 1
            return f"saved to {path}"
        except Exception as exc:  # a dead letter that cannot be written is still counted
            log.error("cannot write a dead letter of %s to %s: %r", step, self.dir, exc)
            self.metrics.dropped("dead_letter_unsaved", 1, detail=f"{step}: {exc!r}")
            return ""
