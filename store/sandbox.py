"""Ad-hoc SQL for users of the app: read-only, no file access, capped rows, a time limit."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from store.connect import open_read

# Enforced by DuckDB itself: no file system or network access (read_csv, COPY, ATTACH, INSTALL all
# fail), and the settings cannot be changed back by a query.
SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}
ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}  # SELECT covers DESCRIBE/SHOW/SUMMARIZE


class SqlError(Exception):
    """A query the sandbox refused or DuckDB rejected; the message is for the user."""


@dataclass
class QueryResult:
    table: pa.Table
    truncated: bool  # more rows existed than max_rows
    seconds: float


def run_query(
    store: str | Path, sql: str, max_rows: int = 10_000, timeout_s: float = 10.0, lock_timeout: float = 5.0,
) -> QueryResult:
    """Run one read-only statement on a fresh sandboxed connection (closed after, so an ingest can write)."""
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise SqlError("empty query")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(_first_line(exc)) from exc
    if len(statements) != 1:
        raise SqlError(f"one statement at a time, got {len(statements)}")
    kind = statements[0].type
    if kind not in ALLOWED:
        raise SqlError(f"read-only: {kind.name} statements are not allowed here (use SELECT, DESCRIBE, SHOW)")
    con = open_read(store, lock_timeout=lock_timeout, config=SANDBOX_CONFIG)
    timer = threading.Timer(timeout_s, con.interrupt)
    start = time.perf_counter()
    try:
        timer.start()
        reader = con.sql(sql).to_arrow_reader(min(max_rows + 1, 65_536))
        batches, n = [], 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n > max_rows:
                break
        table = pa.Table.from_batches(batches, schema=reader.schema) if batches else reader.schema.empty_table()
    except duckdb.InterruptException as exc:
        raise SqlError(f"stopped after {timeout_s:g} s (time limit)") from exc
    except duckdb.Error as exc:
        raise SqlError(_first_line(exc)) from exc
    finally:
        timer.cancel()
        con.close()
    return QueryResult(table.slice(0, max_rows), table.num_rows > max_rows, time.perf_counter() - start)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
