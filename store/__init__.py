"""The DuckDB store: schema, connections, writes and the queries everything else reads through."""

from store.connect import open_read, reading
from store.errors import StoreError
from store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "StoreError", "open_read", "reading"]
