"""Ad-hoc SQL for users of the app: read-only, no file access, bounded rows, bytes, memory and time.

Each query runs in a child process of its own (`python -m store.sandbox`, nothing of the app copied):
DuckDB's interrupt cannot stop some work inside one expression (`list_sort(range(6e7))` ran 35 s
through it), but a process can always be killed. The parent waits for the answer until the time
limit, then kills the child; the page never waits longer.

Every protection is a setting DuckDB or the kernel enforces, not a reading of the query's text (text can
be assembled at run time: `query('SELECT ... duckdb_' || 'settings()')`):

- DuckDB: external access off (no file or network function; a store's views over files fail too), no
  extensions, a memory limit, one thread, the configuration locked against `SET`;
- a fresh private folder per query is the child's home, secret, extension and spill folder, so
  `duckdb_settings()` and error messages name no folder of the server's but that one, and its environment
  is emptied. The store's own path stays visible (`duckdb_databases()`, as in the DuckDB CLI): DuckDB
  resolves links to it, and hiding it would take a file-system namespace;
- the kernel: an address-space limit on the child (what it maps once the store is open, plus 2 GB)
  holds where DuckDB's own memory limit does not (`list_sort(range(3e8))` reached 7 GB through it);
- the child's answer travels on its own descriptor, so anything DuckDB prints (its progress bar after
  2 s) cannot corrupt it; the child ends when the parent does (it watches its standard input), and the
  private folder, spill files included, is removed after each query.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from store.errors import StoreBusy, StoreError, reason
from store.faults import ENV as FAULT_ENV
from store.faults import ONCE_ENV, fault_point
from store.leftovers import query_folder, remove_stale_query_folders

MEMORY_LIMIT_GB = 1
# DuckDB's limit, enforced by DuckDB itself together with the settings that keep a query off the server's
# files; the per-query folders are added in the child.
SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "memory_limit": f"{MEMORY_LIMIT_GB}GB",
    "threads": 1,
    "lock_configuration": True,
}
# The child's address space: what it maps once its store is open (Python, pyarrow, DuckDB: ~1 GB here,
# more on a machine with many cores) plus DuckDB's limit and room for one result; an allocation past it
# fails inside the child ("out of memory"), not on the server.
HEADROOM = (MEMORY_LIMIT_GB + 1) * 2**30
ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}  # SELECT covers DESCRIBE/SHOW/SUMMARIZE
MAX_BYTES = 64 * 1024 * 1024  # of a result, as Arrow buffers
ROOT = Path(__file__).resolve().parents[1]  # so the child imports this checkout's store package


class SqlError(Exception):
    """A query the sandbox refused or DuckDB rejected; the message is for the user."""


@dataclass
class QueryResult:
    table: pa.Table
    truncated: bool  # more rows existed than max_rows, or more bytes than max_bytes
    seconds: float
    cut_by: str = ""  # 'rows' or 'bytes' when truncated


def run_query(
    store: str | Path,
    sql: str,
    max_rows: int = 10_000,
    timeout_s: float = 10.0,
    lock_timeout: float = 5.0,
    max_bytes: int = MAX_BYTES,
) -> QueryResult:
    """Run one read-only statement on a fresh sandboxed connection in a child process (closed after, so an
    ingest can write); SqlError for a refused, failed or stopped query, StoreError for the store itself."""
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise SqlError("empty query")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(reason(exc)) from exc
    if len(statements) != 1:
        raise SqlError(f"one statement at a time, got {len(statements)}")
    kind = statements[0].type
    if kind not in ALLOWED:
        raise SqlError(f"read-only: {kind.name} statements are not allowed here (use SELECT, DESCRIBE, SHOW)")

    start = time.perf_counter()
    remove_stale_query_folders()
    private = query_folder()
    status, text, payload = "eof", "", b""
    try:
        request = (
            json.dumps(
                {
                    "store": str(store),
                    "folder": str(private),
                    "sql": sql,
                    "max_rows": max_rows,
                    "max_bytes": max_bytes,
                    "lock_timeout": lock_timeout,
                }
            ).encode()
            + b"\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-m", "store.sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_child_env(),
            bufsize=0,
        )
        try:
            try:
                child.stdin.write(request)  # stdin stays open: the child ends when it closes (we do, or die)
            except BrokenPipeError:
                pass  # the child ended at once; its (missing) answer says so below
            # the child's start and its wait for a writer's lock do not count against the query's time
            status, text = _line(child.stdout, lock_timeout + 60)
            if status == "started":
                fault_point("sql-wait")
                status, text = _line(child.stdout, timeout_s)
            if status == "ok":
                payload = _read_all(child.stdout, timeout_s)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            child.stdin.close()
            child.stdout.close()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if status == "timeout" or payload is None:
        raise SqlError(f"stopped after {timeout_s:g} s (time limit)")
    if status == "busy":
        raise StoreBusy(text)
    if status == "store":
        raise StoreError(text)
    if status != "ok":
        raise SqlError(text or "the query's process ended without an answer (out of memory?)")
    try:
        table = pa.ipc.open_stream(payload).read_all()
    except pa.ArrowInvalid as exc:
        raise SqlError("the query's process ended before its whole result arrived") from exc
    return QueryResult(table, text != "", time.perf_counter() - start, text)


def _child_env() -> dict[str, str]:
    """The child's whole environment: where Python and this checkout are, nothing else of the server's."""
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", FAULT_ENV, ONCE_ENV) if k in os.environ}
    # one thread's worth of allocator arenas and Arrow workers: their reservations count against the limit
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return keep | {
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
        "PYTHONNOUSERSITE": "1",
    }


def _read_all(stream, seconds: float) -> bytes | None:
    """Everything until the child closes its output, or None if that takes longer than `seconds`."""
    deadline = time.monotonic() + seconds
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            return None
        chunk = stream.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _line(stream, seconds: float) -> tuple[str, str]:
    """The child's next status line, as (status, text); ('timeout', '') when none came in time, ('eof', '')
    when it ended without one."""
    deadline = time.monotonic() + seconds
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            return "timeout", ""
        chunk = stream.read(1)
        if not chunk:
            return "eof", ""
        data += chunk
    status, _, text = data.decode(errors="replace").rstrip("\n").partition("\t")
    return status, text


def _child() -> None:
    """The query's process (python -m store.sandbox): one JSON request line on stdin; status lines, then the
    result as an Arrow IPC stream, on what was its stdout (fd 1 itself then goes to /dev/null)."""
    from store.connect import open_read

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # DuckDB's progress bar and any other print
    req = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_end_with_parent, daemon=True).start()
    folder = Path(req["folder"])
    (folder / "spill").mkdir()
    config = SANDBOX_CONFIG | {
        "home_directory": str(folder),
        "temp_directory": str(folder / "spill"),
        "secret_directory": str(folder / "secrets"),
        "extension_directory": str(folder / "extensions"),
    }

    def say(status: str, text: str = "") -> None:
        out.write(f"{status}\t{' '.join(text.split())}\n".encode())
        out.flush()

    try:
        con = open_read(req["store"], lock_timeout=req["lock_timeout"], config=config)
    except StoreBusy as exc:
        return say("busy", str(exc))
    except StoreError as exc:
        return say("store", str(exc))
    limit = _mapped_bytes() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    say("started")
    try:
        max_rows, max_bytes = req["max_rows"], req["max_bytes"]
        reader = con.sql(req["sql"]).to_arrow_reader(min(max_rows + 1, 2048))
        batches, rows, size, cut_by = [], 0, 0, ""
        for batch in reader:
            if size + batch.nbytes > max_bytes:  # keep the rows that still fit, then stop
                per_row = batch.nbytes / max(batch.num_rows, 1)
                fit = int((max_bytes - size) // per_row) if per_row else 0
                if fit > 0:
                    batches.append(batch.slice(0, fit))
                cut_by = "bytes"
                break
            batches.append(batch)
            fault_point("sql")
            rows += batch.num_rows
            size += batch.nbytes
            if rows > max_rows:
                cut_by = "rows"
                break
        table = (
            pa.Table.from_batches(batches, schema=reader.schema) if batches else reader.schema.empty_table()
        )
        table = table.slice(0, max_rows)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        say("ok", cut_by)
        out.write(sink.getvalue().to_pybytes())
        out.flush()
    except duckdb.Error as exc:
        say("error", reason(exc))
    except MemoryError:
        say("error", "out of memory")
    finally:
        con.close()


def _mapped_bytes() -> int:
    """This process's address space now (VmSize), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 2**30


def _end_with_parent() -> None:
    """Exit at once when stdin reaches its end: the parent closed it, or died (the kernel closed it)."""
    while sys.stdin.buffer.read(1 << 16):
        pass
    os._exit(3)


if __name__ == "__main__":
    _child()
