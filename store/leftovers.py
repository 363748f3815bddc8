"""Files a killed process leaves beside a store (or a SQL query's folder), and their clean-up by the next
writer (or query)."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

SQL_FOLDER = "branchlens-sql-"  # + the app's pid + '-': a query's private folder in the temp directory


def compact_copy(store: Path, pid: int) -> Path:
    """Where compaction by process `pid` writes its copy of `store` (its WAL is this name + '.wal')."""
    return store.with_name(f"{store.name}.compact-{pid}")


def creating_copy(store: Path, pid: int) -> Path:
    """Where process `pid` builds a new `store` before linking it into place (one per process)."""
    return store.with_name(f"{store.name}.creating-{pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_copies(store: str | Path) -> list[Path]:
    """Delete the half-written compaction copies and new-store files (and their WALs) of processes that
    are no longer running; those of a live process are kept. Returns what was removed."""
    store = Path(store)
    removed = []
    for kind in ("compact", "creating"):
        for leftover in store.parent.glob(f"{glob.escape(store.name)}.{kind}-*"):
            pid = leftover.name.removeprefix(f"{store.name}.{kind}-").removesuffix(".wal")
            if pid.isdigit() and not _alive(int(pid)):
                try:
                    leftover.unlink()
                    removed.append(leftover)
                except OSError:
                    pass
    return removed


def query_folder() -> Path:
    """A fresh private folder for one SQL query, named for this process so another can tell it is stale."""
    return Path(tempfile.mkdtemp(prefix=f"{SQL_FOLDER}{os.getpid()}-"))


def remove_stale_query_folders() -> list[Path]:
    """Delete the query folders (spill files included) of app processes that are no longer running: a
    killed app cannot remove its own."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{SQL_FOLDER}*-*"):
        pid = folder.name.removeprefix(SQL_FOLDER).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
