"""The app's read-only SQL box: one statement in a sandboxed child process (store.sandbox)."""

import pyarrow as pa

from store.sandbox import MAX_BYTES, QueryResult, SqlError, run_query

MAX_ROWS = 10_000
TIME_LIMIT_S = 10.0
LIMITS = (
    f"Read-only: no writes, no file or network access; at most {MAX_ROWS:,} rows, "
    f"{MAX_BYTES // 2**20} MB of results, 1 GB of memory and {TIME_LIMIT_S:g} s per query."
)


def query(store: str, sql: str) -> QueryResult:
    """Run `sql` on `store` within the limits above; SqlError / StoreBusy / StoreError otherwise."""
    return run_query(store, sql, max_rows=MAX_ROWS, timeout_s=TIME_LIMIT_S)


def displayable(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """The result as the table and its downloads can show it, and a note per change: repeated column names
    made unique (`a`, `a (2)`: a join's or `SELECT 1 AS a, 2 AS a` crashed the tab), and INTERVAL, UNION and
    MAP columns, which the data frame or the table on the page cannot hold, as text."""
    notes, names, seen = [], [], {}
    for name in table.column_names:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    repeated = sorted(n for n, c in seen.items() if c > 1)
    if repeated:
        notes.append(f"repeated column names made unique: {', '.join(repeated)}")
    columns, as_text = [], []
    for name, column in zip(names, table.columns):
        if (
            pa.types.is_interval(column.type)
            or pa.types.is_union(column.type)
            or pa.types.is_map(column.type)
        ):
            as_text.append(name)
            column = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
        columns.append(column)
    if as_text:
        notes.append(f"shown as text (intervals, unions and maps): {', '.join(as_text)}")
    return pa.Table.from_arrays(columns, names=names), notes


__all__ = ["LIMITS", "QueryResult", "SqlError", "displayable", "query"]
