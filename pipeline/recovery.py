"""What bytewax recovery has committed, read from its recovery partitions.

bytewax resumes a dataflow from the newest epoch committed in every recovery
partition. Spool segments may only be deleted once the spool source's position
in such a committed snapshot has moved past them; before that, a crash would
resume into a deleted segment. bytewax 0.21 (its last release) keeps
partitions as SQLite files with ``commits(part_index, commit_epoch)`` and
``snaps(step_id, state_key, snap_epoch, ser_change)`` where ``ser_change`` is
the pickled snapshot; this module reads them, read-only.
"""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path

READ_STEP_ID = "telepipe.read"


class CommittedSnapshots:
    """Reads the committed snapshot of a source partition from a recovery directory."""

    def __init__(self, db_dir: str | Path, step_id: str = READ_STEP_ID) -> None:
        self.db_dir = Path(db_dir)
        self.step_id = step_id

    def _connections(self) -> list[sqlite3.Connection]:
        return [
            sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=1.0)
            for p in sorted(self.db_dir.glob("part-*.sqlite3"))
        ]

    def snapshot(self, part: str):
        """The source partition's snapshot in the newest fully committed epoch, or None."""
        conns = self._connections()
        try:
            commits = [row[0] for c in conns for row in c.execute("SELECT commit_epoch FROM commits")]
            if not commits or len(commits) < len(conns):
                return None
            epoch = min(commits)
            best = None
            for c in conns:
                row = c.execute(
                    "SELECT snap_epoch, ser_change FROM snaps WHERE step_id = ? AND state_key = ? "
                    "AND snap_epoch <= ? ORDER BY snap_epoch DESC LIMIT 1",
                    (self.step_id, part, epoch),
                ).fetchone()
                if row and (best is None or row[0] > best[0]):
                    best = row
            return pickle.loads(best[1]) if best and best[1] is not None else None
        except sqlite3.Error:
            return None
        finally:
            for c in conns:
                c.close()

    def spool_segment(self, part: str) -> int | None:
        """The spool segment the committed snapshot resumes from (None: nothing committed yet)."""
        snap = self.snapshot(part)
        if snap is None:
            return None
        inner = snap[0] if isinstance(snap, tuple) and len(snap) == 2 and isinstance(snap[1], bytes) else snap
        return int(inner[0])  # (segment, offset, step)
