"""Opening store files: read-only for the app and SQL users, short-lived writes for ingest."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from store.errors import StoreBusy, StoreError, StoreMissing, reason
from store.schema import check_version, check_whole, read_meta

LOCK_MESSAGE = "Could not set lock"


def _is_lock_error(exc: Exception) -> bool:
    return isinstance(exc, duckdb.IOException) and LOCK_MESSAGE in str(exc)


# No connection of this project may fetch or load DuckDB extensions (a SQLite file would otherwise make
# DuckDB download sqlite_scanner from the network).
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# Every read connection (app, report, views, SQL tab): a store file is data, not code with our rights. Its
# views and macros run inside the reader, so with file access on, a view over read_text('/etc/passwd')
# would show a server file as a prompt. DuckDB refuses every file and network function when external
# access is off (the store file itself stays readable), and the locked configuration cannot be changed
# back by any statement.
READ_CONFIG = NO_EXTENSIONS | {"enable_external_access": False, "lock_configuration": True}
# Compaction reads the store and attaches its copy beside it: the one reader that needs a file of its own.
ATTACHING = {"enable_external_access": True}
JOB_LOCK_WAIT = 30.0  # seconds a job (ingest, compaction, a synthetic write) waits for readers to let go
DUCKDB_MAGIC = b"DUCK"  # bytes 8-11 of every DuckDB database file


def is_duckdb_file(path: str | Path) -> bool:
    """True when path is a readable regular file with DuckDB's header (no connection is opened). Opened
    without waiting and its type checked on the open file: a FIFO typed in the Store box hung the session
    in open(), /dev/zero is no file of ours either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 12, 0)[8:12] == DUCKDB_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def mode_kind(mode: int) -> str:
    """'regular file', 'directory', 'FIFO', 'device', 'socket' or 'special file', of an st_mode."""
    for test, kind in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "device"),
        (stat.S_ISBLK, "device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


def file_kind(path: str | Path) -> str:
    """mode_kind of what path names (links followed; nothing opened), or 'missing'; a path the system
    cannot look up (a name too long, a loop of links, no permission) is one StoreError line."""
    try:
        return mode_kind(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise StoreError(
            f"cannot use store {str(path)[:200]}{'...' if len(str(path)) > 200 else ''}: {reason(exc)}"
        ) from None
    except ValueError as exc:  # a NUL in the path
        raise StoreError(f"cannot use store {str(path)!r}: {exc}") from None


def _connect(path: Path, read_only: bool, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only, config=NO_EXTENSIONS | (config or {}))
    except duckdb.IOException as exc:
        if _is_lock_error(exc):
            raise
        raise StoreError(f"cannot open store {path}: {reason(exc)}") from exc
    except duckdb.Error as exc:
        raise StoreError(f"cannot open store {path}: {reason(exc)}") from exc


def connect_with_retry(
    path: Path, read_only: bool, lock_timeout: float, config: dict | None = None
) -> duckdb.DuckDBPyConnection:
    """Connect, waiting up to lock_timeout seconds while another process holds the file."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.05
    while True:
        try:
            return _connect(path, read_only, config)
        except duckdb.IOException as exc:
            if time.monotonic() >= deadline:
                who = "written by another process" if read_only else "open in another process"
                raise StoreBusy(
                    f"store {path} is {who} (DuckDB allows one writer or many readers); "
                    f"gave up after {lock_timeout:.0f} s"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def open_read(
    path: str | Path, lock_timeout: float = 0.0, config: dict | None = None
) -> duckdb.DuckDBPyConnection:
    """A read-only, locked-down (READ_CONFIG, plus `config`) connection to an existing store whose schema
    version this code reads."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise StoreMissing(f"store {path} does not exist")
    if kind != "regular file":
        raise StoreError(f"store {path} is a {kind}, not a DuckDB file")
    con = connect_with_retry(
        path, read_only=True, lock_timeout=lock_timeout, config=READ_CONFIG | (config or {})
    )
    try:
        meta = read_meta(con, str(path))
        check_version(meta, str(path))
        check_whole(con, path, meta)
    except Exception:
        con.close()
        raise
    return con


@contextmanager
def reading(
    path: str | Path, lock_timeout: float = 0.0, config: dict | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """open_read as a context manager that closes the connection; a DuckDB error raised while reading (a
    view of the store that reaches for a file, a missing table or column, a damaged block) becomes one
    StoreError line naming the store."""
    con = open_read(path, lock_timeout, config)
    try:
        with read_errors(path):
            yield con
    finally:
        con.close()


@contextmanager
def read_errors(path: str | Path) -> Iterator[None]:
    """Turn a DuckDB error inside the block into StoreError('cannot read store PATH: <first line>')."""
    try:
        yield
    except duckdb.Error as exc:
        raise StoreError(f"cannot read store {path}: {reason(exc)}") from exc
