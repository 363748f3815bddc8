"""Errors the store raises for problems a user can fix (shown as one line, no traceback)."""


class StoreError(Exception):
    """A store file is missing, locked, of another schema version, or does not fit the data."""


class StoreMissing(StoreError):
    """No store at that path (or, in the app's Store box, no file the app may open there)."""


class StoreBusy(StoreError):
    """Another process holds the file (an ingest committing): wait and try again."""


def reason(exc: BaseException, last_line: bool = False) -> str:
    """The part of an error worth one line: an OS error's strerror, else the message's first line (its last
    with last_line, e.g. for a Ray task error, whose first line is where it ran and last what went wrong)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return (lines[-1] if last_line else lines[0]) if lines else type(exc).__name__
