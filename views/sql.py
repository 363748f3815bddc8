"""The app's read-only SQL box: one statement in a sandboxed child process (store.sandbox)."""

from store.sandbox import MAX_BYTES, QueryResult, SqlError, run_query

MAX_ROWS = 10_000
TIME_LIMIT_S = 10.0
LIMITS = (f"Read-only: no writes, no file or network access; at most {MAX_ROWS:,} rows, "
          f"{MAX_BYTES // 2**20} MB of results, 1 GB of memory and {TIME_LIMIT_S:g} s per query.")


def query(store: str, sql: str) -> QueryResult:
    """Run `sql` on `store` within the limits above; SqlError / StoreBusy / StoreError otherwise."""
    return run_query(store, sql, max_rows=MAX_ROWS, timeout_s=TIME_LIMIT_S)


__all__ = ["LIMITS", "QueryResult", "SqlError", "query"]
