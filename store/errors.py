"""Errors the store raises for problems a user can fix (shown as one line, no traceback)."""


class StoreError(Exception):
    """A store file is missing, locked, of another schema version, or does not fit the data."""


class StoreMissing(StoreError):
    """No store at that path (or, in the app's Store box, no file the app may open there)."""


class StoreBusy(StoreError):
    """Another process holds the file (an ingest committing): wait and try again."""


def reason(exc: BaseException) -> str:
    """The part of an OS or DuckDB error worth one line: strerror, else the message's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
