"""Recovery snapshot formats carry a version; one written by a newer telepipe is refused with a
message that says what to do, rather than restored into state it does not fit."""

from __future__ import annotations


class SnapshotTooNew(RuntimeError):
    """A recovery snapshot written by a newer telepipe than this one."""


def check_version(what: str, version: int, supported: int) -> None:
    """Raise ``SnapshotTooNew`` when ``what``'s snapshot ``version`` is newer than ``supported``."""
    if version > supported:
        raise SnapshotTooNew(
            f"a recovery snapshot of {what} has format {version}; this telepipe reads formats up to {supported}: "
            "run the newer version, or move data_dir/recovery aside"
        )
