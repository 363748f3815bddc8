"""Errors ingest raises for bad input: the CLI prints them as one line and exits non-zero."""


class IngestError(Exception):
    """A problem with the user's model, prompts, config or flags."""
