"""What bytewax recovery has committed, read from its recovery partitions, in a child process.

bytewax resumes a dataflow from the newest epoch committed in every recovery
partition. Spool segments may only be deleted once the spool source's position
in such a committed snapshot has moved past them; before that, a crash would
resume into a deleted segment. bytewax 0.21 (its last release) keeps
partitions as SQLite files with ``commits(part_index, commit_epoch)`` and
``snaps(step_id, state_key, snap_epoch, ser_change)`` where ``ser_change`` is
the pickled snapshot.

They are read **in a short-lived child process**, never in the daemon: bytewax
links its own copy of SQLite, and a second copy (Python's ``sqlite3``) opening
and closing the same files in the same process drops the POSIX locks bytewax's
copy holds (POSIX releases a process's locks on a file when *any* of its
descriptors to it closes). Under load that corrupted bytewax's WAL index and
the daemon died with SIGBUS inside SQLite (found by ``bench/live.py memory``).
Another process reading the files is ordinary SQLite concurrency. This file
therefore imports only the standard library when it runs as a script.

The child process is started from a background thread (``CommittedSnapshots``),
never from the dataflow thread that asks: a slow disk or a stuck child must not
stall the flow; the flow reads the newest answer the thread has.
"""

from __future__ import annotations

import json
import logging
import pickle
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

READ_STEP_ID = "telepipe.read"
log = logging.getLogger("telepipe")


def committed_segments(db_dir: Path, step_id: str = READ_STEP_ID) -> dict[str, int]:
    """Source partition -> spool segment of its snapshot in the newest fully committed epoch.

    Opens the SQLite files itself: call it only from a process that is not running bytewax
    (``CommittedSnapshots`` does, through a child process)."""
    conns = [
        sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=1.0) for p in sorted(db_dir.glob("part-*.sqlite3"))
    ]
    try:
        commits = [row[0] for c in conns for row in c.execute("SELECT commit_epoch FROM commits")]
        if not commits or len(commits) < len(conns):
            return {}
        epoch = min(commits)
        best: dict[str, tuple[int, bytes]] = {}
        for c in conns:
            rows = c.execute(
                "SELECT state_key, MAX(snap_epoch), ser_change FROM snaps WHERE step_id = ? AND snap_epoch <= ? "
                "GROUP BY state_key",
                (step_id, epoch),
            )
            for part, snap_epoch, ser in rows:
                if ser is not None and (part not in best or snap_epoch > best[part][0]):
                    best[part] = (snap_epoch, ser)
        out = {}
        for part, (_, ser) in best.items():
            snap = pickle.loads(ser)
            # The service-graph wrapper snapshots (inner state, pickled joiner[, pickled database analyzer]).
            wrapped = isinstance(snap, tuple) and len(snap) in (2, 3) and isinstance(snap[1], bytes)
            inner = snap[0] if wrapped else snap
            out[part] = int(inner[0])  # spool source state: (segment, offset, step[, format version])
        return out
    except sqlite3.Error:
        return {}
    finally:
        for c in conns:
            c.close()


class CommittedSnapshots:
    """The committed spool segment per source partition, read every ``refresh_s`` by a
    background thread (started on first use; ``close`` stops it)."""

    def __init__(self, db_dir: str | Path, step_id: str = READ_STEP_ID, refresh_s: float = 2.0, metrics=None) -> None:
        self.db_dir = Path(db_dir)
        self.step_id = step_id
        self.refresh_s = refresh_s
        self.metrics = metrics
        self._segments: dict[str, int] = {}
        self._lock = threading.Lock()
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _refresh(self) -> None:
        try:
            res = subprocess.run(
                [sys.executable, "-I", __file__, str(self.db_dir), self.step_id],
                capture_output=True, timeout=30, check=True,
            )  # fmt: skip
            segments = {k: int(v) for k, v in json.loads(res.stdout).items()}
            with self._lock:
                self._segments = segments
            self._failing = False
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            # Keep what was known: deleting less is always safe, but a spool that is never cut
            # back fills its budget, so say why (once per run of failures).
            if not self._failing:
                log.warning("cannot read committed snapshots in %s (spool segments kept): %s", self.db_dir, exc)
            self._failing = True

    def _run(self) -> None:
        from pipeline.selfmetrics import SelfMetrics  # here: the script side imports the standard library only
        from pipeline.threads import loop_forever

        loop_forever("recovery-reader", self.metrics or SelfMetrics(), self._refresh, self._stop, self.refresh_s)

    def spool_segment(self, part: str) -> int | None:
        """The spool segment the committed snapshot resumes from (None: nothing known committed yet).
        Never waits: the answer is the background reader's newest."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="recovery-reader", daemon=True)
            self._thread.start()
        with self._lock:
            return self._segments.get(part)

    def close(self) -> None:
        self._stop.set()


if __name__ == "__main__":
    print(json.dumps(committed_segments(Path(sys.argv[1]), sys.argv[2])))
