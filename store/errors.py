"""Errors the store raises for problems a user can fix (shown as one line, no traceback)."""


class StoreError(Exception):
    """A store file is missing, locked, of another schema version, or does not fit the data."""
