"""Ad-hoc SQL for users of the app: read-only, no file access, bounded rows, bytes, memory and time.

Each query runs in a child process of its own (`python -m store.sandbox`, nothing of the app copied):
DuckDB's interrupt cannot stop some work inside one expression (`list_sort(range(6e7))` ran 35 s
through it), but a process can always be killed. The parent waits for the answer until the time
limit, then kills the child; the page never waits longer.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from store.errors import StoreBusy, StoreError, reason

# Enforced by DuckDB itself: no file system or network access (read_csv, COPY, ATTACH, INSTALL all
# fail), a memory limit, and the settings cannot be changed back by a query.
SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "memory_limit": "1GB",
    "threads": 1,
    "lock_configuration": True,
}
ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}  # SELECT covers DESCRIBE/SHOW/SUMMARIZE
MAX_BYTES = 64 * 1024 * 1024  # of a result, as Arrow buffers
# System functions that name the server's paths (the store's, the home folder, extension and secret
# directories): refused by name (case and quoting do not change an identifier's letters).
SERVER_PATHS = ("duckdb_databases", "database_list", "duckdb_settings", "current_setting", "duckdb_extensions",
                "duckdb_secrets", "which_secret", "duckdb_temporary_files", "duckdb_memory", "getenv")
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
    store: str | Path, sql: str, max_rows: int = 10_000, timeout_s: float = 10.0, lock_timeout: float = 5.0,
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
    named = [f for f in SERVER_PATHS if f in sql.lower()]
    if named:
        raise SqlError(f"{named[0]} is not available here: it names paths on the server")

    request = json.dumps({"store": str(store), "sql": sql, "max_rows": max_rows, "max_bytes": max_bytes,
                          "lock_timeout": lock_timeout}).encode()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "store.sandbox"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
    payload = b""
    try:
        child.stdin.write(request)
        child.stdin.close()
        # the child's start and its wait for a writer's lock do not count against the query's time
        status, text = _line(child.stdout, lock_timeout + 60)
        if status == "started":
            status, text = _line(child.stdout, timeout_s)
        if status == "ok":
            payload = _read_all(child.stdout, timeout_s)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
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
    """The query's process (python -m store.sandbox): a JSON request on stdin; status lines, then the
    result as an Arrow IPC stream, on stdout."""
    from store.connect import open_read

    out = sys.stdout.buffer
    req = json.loads(sys.stdin.buffer.read())

    def say(status: str, text: str = "") -> None:
        out.write(f"{status}\t{' '.join(text.split())}\n".encode())
        out.flush()

    try:
        con = open_read(req["store"], lock_timeout=req["lock_timeout"], config=SANDBOX_CONFIG)
    except StoreBusy as exc:
        return say("busy", str(exc))
    except StoreError as exc:
        return say("store", str(exc))
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
            rows += batch.num_rows
            size += batch.nbytes
            if rows > max_rows:
                cut_by = "rows"
                break
        table = pa.Table.from_batches(batches, schema=reader.schema) if batches else reader.schema.empty_table()
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


if __name__ == "__main__":
    _child()
