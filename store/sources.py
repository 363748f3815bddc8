"""What a reader may open as a store: a store file, or a distributed run's shards read in place.

The app and the views read through `reading` here, so a shard directory or an s3:// run URL typed in the
Store box answers the same SQL contract as a store file (store.inplace), without a merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from store import connect
from store.inplace import open_shards


def is_shard_run(path: str | Path) -> bool:
    """A distributed run's shard directory (local, holding run.json) or an s3:// URL of one."""
    text = str(path)
    try:
        return text.startswith("s3://") or (Path(text).is_dir() and (Path(text) / "run.json").is_file())
    except (OSError, ValueError):  # a name too long, a NUL: no shard run; the store path says why in one line
        return False


@contextmanager
def reading(path: str | Path, lock_timeout: float = 0.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read connection, closed after: a store file (store.connect.reading), or a shard run read in place
    (a snapshot of its committed shards)."""
    if not is_shard_run(path):
        with connect.reading(path, lock_timeout) as con:
            yield con
        return
    con = open_shards(str(path))
    try:
        with connect.read_errors(path):
            yield con
    finally:
        con.close()
