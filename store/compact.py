"""Compaction: rewrite a store into a fresh file, without free blocks and with latents ordered by layer.

Ingest commits one prompt per transaction. Each commit rewrites the table's last, partly filled row group,
and the blocks it leaves behind stay in the file as free space: a store written prompt by prompt ends up
~1.7x the size of its data (bench/store_read.py). The rewrite drops that space and stores each
(run, variant, layer) contiguously, ordered by (branch_id, position), so a layer is read as one range.

The compaction is the store's one writing job throughout (the claim an ingest or a merge takes, so two
compactions never overlap) and holds a read lock on the file: readers (the app) go on, a writer waits;
the new file replaces the old one atomically, so a reader sees either the old or the new store, both
complete, and only if the file is still the one that was copied.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import duckdb

from store.connect import (
    ATTACHING,
    JOB_LOCK_WAIT,
    connect_with_retry,
    open_read,
    reading,
)
from store.errors import StoreError, StoreMissing, reason
from store.faults import fault_point
from store.leftovers import compact_copy, remove_stale_copies
from store.schema import CONTRACT_TABLES, first_row, read_meta, schema_sql
from store.writer import STORAGE_COMPATIBILITY, StoreWriter

_ORDER = {
    "runs": "run_id",
    "prompts": "run_id, prompt_id",
    "branches": "run_id, branch_id",
    "tokens": "run_id, branch_id, position",
}


@dataclass(frozen=True)
class CompactReport:
    path: Path
    bytes_before: int
    bytes_after: int
    seconds: float

    def summary(self) -> str:
        return (
            f"compacted {self.path}: {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s"
        )


def free_fraction(con: duckdb.DuckDBPyConnection) -> float:
    """Share of the file's blocks that hold nothing (what compaction would give back)."""
    free, total = first_row(
        con,
        "SELECT free_blocks, total_blocks FROM pragma_database_size() "
        "WHERE database_name = current_database()",
    )
    return float(free) / total if total else 0.0


def compact(path: str | Path, lock_timeout: float = 120.0) -> CompactReport:
    """Rewrite the store at `path` in place (see the module doc); raises StoreError, leaving it untouched."""
    path = Path(path)
    if not path.is_file():
        raise StoreMissing(f"store {path} does not exist")
    # The one writing job of the store for the whole rewrite: another compaction, an ingest or a merge
    # waits (an ingest that compacts at its end already holds it). Without it two overlapping compactions
    # each put their own copy in place, and rows committed by a merge between them were lost.
    claim = StoreWriter(path, created_by="branchlens compact")
    claim.claim()
    try:
        # The file itself, not a symlink naming it: the copy goes beside it and replaces it, so the link
        # keeps pointing at the compacted store (replacing the link made it a copy and left the store stale).
        return _compact_claimed(Path(os.path.realpath(path)), lock_timeout)
    finally:
        claim.release()


def _compact_claimed(path: Path, lock_timeout: float) -> CompactReport:
    remove_stale_copies(path)
    tmp = compact_copy(path, os.getpid())
    t0 = time.perf_counter()
    before = path.stat().st_size
    try:
        _merge_wal(path, lock_timeout)
        copied_from = _identity(path)
        # its own errors name the compaction (below), not a read
        with closing(open_read(path, lock_timeout=lock_timeout, config=ATTACHING)) as con:
            meta = read_meta(con, str(path))
            source = first_row(con, "SELECT current_database()")[0]
            con.execute(
                f"ATTACH '{_quoted(tmp)}' AS packed (READ_WRITE, STORAGE_VERSION '{STORAGE_COMPATIBILITY}')"
            )
            try:
                con.execute("USE packed")
                con.execute(schema_sql(int(meta["vector_dim"])))
                con.execute("BEGIN TRANSACTION")  # one commit: row groups are written once, never rewritten
                con.execute(f'INSERT INTO packed.meta SELECT * FROM "{source}".meta ORDER BY key')
                for table in CONTRACT_TABLES:
                    if table == "latents":
                        continue
                    con.execute(
                        f'INSERT INTO packed.{table} SELECT * FROM "{source}".{table} '
                        f"ORDER BY {_ORDER[table]}"
                    )
                groups = con.execute(
                    f'SELECT DISTINCT run_id, variant, layer FROM "{source}".latents ORDER BY ALL'
                ).fetchall()
                for run_id, variant, layer in groups:  # one layer at a time bounds the sort's memory
                    con.execute(
                        f'INSERT INTO packed.latents SELECT * FROM "{source}".latents '
                        "WHERE run_id = ? AND variant = ? AND layer = ? ORDER BY branch_id, position",
                        [run_id, variant, layer],
                    )
                _check_counts(con, source)
                fault_point("compact")
                con.execute("COMMIT")
                con.execute("CHECKPOINT packed")
            finally:
                try:
                    con.execute("ROLLBACK")  # after a failure mid-copy; with nothing open it just fails
                except duckdb.Error:
                    pass
                con.execute(f'USE "{source}"')
                con.execute("DETACH packed")
            if Path(f"{tmp}.wal").exists():
                raise StoreError(
                    f"the compacted copy's write-ahead log was not merged ({tmp.name}.wal left behind)"
                )
            if _identity(path) != copied_from:  # replaced or rewritten underneath (not by a branchlens job)
                raise StoreError(
                    f"cannot compact store {path}: the file changed while it was being compacted "
                    "(replaced by another process); the copy was discarded, the file left as it is now"
                )
            os.replace(tmp, path)  # still under the read lock and the claim: no writer can slip in between
    except (OSError, duckdb.Error) as exc:
        raise StoreError(f"cannot compact store {path}: {reason(exc)}; the store is unchanged") from exc
    finally:
        for leftover in (tmp, Path(f"{tmp}.wal")):
            leftover.unlink(missing_ok=True)
    return CompactReport(path, before, path.stat().st_size, time.perf_counter() - t0)


COMPACT_ABOVE = 0.2  # share of free blocks in the file above which the end of a run compacts it


def compact_if_worth(path: str | Path, log: Callable[[str], None]) -> None:
    """Give back the free space that per-prompt commits leave in the file, when it is worth a rewrite.
    A failure (e.g. no room for the copy) is a warning: the store as written is complete."""
    with reading(path, lock_timeout=JOB_LOCK_WAIT) as con:
        free = free_fraction(con)
    if free < COMPACT_ABOVE:
        return
    log(f"compacting the store ({free:.0%} of the file is free space)")
    try:
        log(compact(path).summary())
    except StoreError as exc:
        log(f"warning: {exc} (run `python -m store compact {path}` later)")


def _merge_wal(path: Path, lock_timeout: float) -> None:
    """Checkpoint a write-ahead log left beside the store (a writer killed, or a disk that filled) into
    the file first: the copy must replace a file whose log holds nothing, or the next open would replay
    the old file's log onto the new one ("WAL does not match") and the store could not be opened."""
    if not Path(f"{path}.wal").exists():
        return
    con = connect_with_retry(path, read_only=False, lock_timeout=lock_timeout)
    try:
        con.execute("CHECKPOINT")
    finally:
        con.close()
    if Path(f"{path}.wal").exists():
        raise StoreError(f"the write-ahead log {path}.wal could not be merged into the store")


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What tells this file's content apart from another's or from a later version: (device, inode, size,
    modification time)."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_counts(con: duckdb.DuckDBPyConnection, source: str) -> None:
    for table in CONTRACT_TABLES:
        old = first_row(con, f'SELECT count(*) FROM "{source}".{table}')[0]
        new = first_row(con, f"SELECT count(*) FROM packed.{table}")[0]
        if old != new:
            raise StoreError(f"compacted copy of {table} has {new} rows, the store {old}")


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")
