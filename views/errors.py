"""The errors a view can raise that the app turns into notes (no traceback)."""

from store.errors import StoreBusy, StoreError, StoreMissing
from store.sandbox import SqlError

__all__ = ["SqlError", "StoreBusy", "StoreError", "StoreMissing"]
