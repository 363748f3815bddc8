"""The store's schema: one versioned SQL file, created once per store, checked on every open."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import duckdb

from store.errors import StoreError

SCHEMA_VERSION = 1
CONTRACT_TABLES = ("runs", "prompts", "branches", "tokens", "latents")
CONTRACT_VIEWS = ("branch_lineage", "branch_tokens", "branch_latents")


def first_row(con: duckdb.DuckDBPyConnection, sql: str, params: list | dict | None = None) -> tuple | None:
    """The first row of a query, fully fetched (DuckDB 2 keeps a connection busy after fetchone())."""
    rows = con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()
    return rows[0] if rows else None


def schema_sql(dim: int) -> str:
    """The schema script with the vector width filled in."""
    text = files("store").joinpath("schema.sql").read_text(encoding="utf-8")
    return text.replace("{dim}", str(int(dim)))


def schema_statements(dim: int, names: tuple[str, ...]) -> list[str]:
    """The CREATE statements of schema.sql for the named tables and views, in the file's order."""
    text = re.sub(r"--[^\n]*", "", schema_sql(dim))  # comments may hold semicolons
    statements = re.findall(r"^(CREATE (?:TABLE|VIEW) (\w+)\b.*?;)", text, re.S | re.M)
    return [sql for sql, name in statements if name in names]


def file_schema_version() -> int:
    """The version written in schema.sql's header (kept equal to SCHEMA_VERSION by a test)."""
    text = files("store").joinpath("schema.sql").read_text(encoding="utf-8")
    match = re.search(r"schema_version:\s*(\d+)", text)
    if match is None:
        raise RuntimeError("store/schema.sql has no 'schema_version:' marker")
    return int(match.group(1))


def create_schema(con: duckdb.DuckDBPyConnection, dim: int, created_by: str) -> None:
    """Create every table and view in an empty database, in one transaction."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(schema_sql(dim))
        con.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [["schema_version", str(SCHEMA_VERSION)], ["vector_dim", str(dim)], ["created_by", created_by]],
        )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def read_meta(con: duckdb.DuckDBPyConnection, path: str) -> dict[str, str]:
    """The store's meta table; raises StoreError if the file is not a branchlens store."""
    has_meta = first_row(
        con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta' AND schema_name = 'main'"
    )[0]
    if not has_meta:
        raise StoreError(f"{path} is a DuckDB file but not a branchlens store (no meta table)")
    return dict(con.execute("SELECT key, value FROM meta").fetchall())


def check_version(meta: dict[str, str], path: str) -> None:
    """Raise StoreError unless the store was written with this schema version."""
    found = meta.get("schema_version")
    if found != str(SCHEMA_VERSION):
        raise StoreError(
            f"{path} has store schema version {found}, this branchlens reads version {SCHEMA_VERSION}; "
            "re-ingest into a new store file or use the branchlens release that wrote it"
        )


HEADER_BYTES = 3 * 4096  # DuckDB's file header and two database headers, before the first block


def check_whole(con: duckdb.DuckDBPyConnection, path: str | Path | None, meta: dict[str, str]) -> None:
    """Raise one StoreError line for a store that is damaged where its meta cannot see: a contract table
    missing, a vector width in meta that its latents column does not have, or (for a file with no
    write-ahead log beside it) a file shorter than the blocks in use need, i.e. truncated. Cheap:
    catalog and header only, no data read."""
    where = str(path) if path is not None else "store"
    tables = {
        r[0]
        for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()
    }
    missing = [t for t in CONTRACT_TABLES if t not in tables]
    if missing:
        raise StoreError(
            f"{where} is a damaged branchlens store: table(s) {', '.join(missing)} missing; "
            "re-ingest into a new store file"
        )
    declared = first_row(
        con,
        "SELECT data_type FROM duckdb_columns() WHERE schema_name = 'main' AND "
        "table_name = 'latents' AND column_name = 'vec'",
    )
    width = re.fullmatch(r"FLOAT\[(\d+)\]", declared[0]) if declared else None
    if width is None or meta.get("vector_dim") != width.group(1):
        raise StoreError(
            f"{where} is a damaged branchlens store: its meta says vector_dim "
            f"{meta.get('vector_dim')!r}, its latents column is {declared[0] if declared else 'missing'}; "
            "re-ingest into a new store file"
        )
    if path is None or not Path(path).is_file() or Path(f"{path}.wal").exists():
        return
    # Used blocks sit at their own offsets, so the file holds at least that many (free ones at the end may
    # have been cut off by a checkpoint: the total count is no bound).
    size = first_row(con, "SELECT block_size, used_blocks FROM pragma_database_size()")
    if size and Path(path).stat().st_size < HEADER_BYTES + size[0] * size[1]:
        raise StoreError(
            f"{where} is damaged: the file has {Path(path).stat().st_size} bytes, its blocks in use "
            f"need {HEADER_BYTES + size[0] * size[1]} (truncated by a copy or a full disk?); "
            "restore it from a copy or re-ingest into a new store file"
        )
