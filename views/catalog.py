"""What a store holds, for the app's sidebar and text: runs, layers, prompts, branches and their text.

Each read opens the store and closes it at once, so an ingest writing the same file is never blocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from store import queries
from store.sources import reading


def version(path: str | Path, lock_timeout: float = 0.0) -> tuple:
    """Changes whenever an ingest commits to the store: part of every cache key. A short query, not file
    times (two commits within the file system's timestamp resolution would look the same)."""
    with reading(path, lock_timeout) as con:
        return queries.fingerprint(con)


def overview(path: str | Path, lock_timeout: float = 0.0) -> dict[str, Any]:
    """Runs (newest first) with their layers per variant, prompts and token counts."""
    with reading(path, lock_timeout) as con:
        out: dict[str, Any] = {"runs": []}
        for run in queries.list_runs(con).iter_rows(named=True):
            out["runs"].append(
                {
                    **{k: (str(v) if k in ("created_at", "completed_at") else v) for k, v in run.items()},
                    "layers": queries.run_layers(con, run["run_id"]),
                    "prompts": queries.prompts(con, run["run_id"]).to_dicts(),
                    "summary": queries.run_summary(con, run["run_id"]),
                }
            )
    return out


def branches_and_text(
    path: str | Path,
    run_id: str,
    prompt_ids: tuple[int, ...] | None,
    lock_timeout: float = 0.0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The selected prompts' branches (id, parent, fork position, kind, ...) and every token's text on
    each branch's lineage (branch_id, position, token_text)."""
    with reading(path, lock_timeout) as con:
        branches = queries.branches(con, run_id)
        lineage = queries.lineage_text(con, run_id, list(prompt_ids) if prompt_ids is not None else None)
    if prompt_ids is not None:
        branches = branches.filter(pl.col("prompt_id").is_in(list(prompt_ids)))
    return branches, lineage


def newest_run(path: str | Path, lock_timeout: float = 0.0) -> str:
    """The id of the store's newest run; ValueError when it holds none."""
    with reading(path, lock_timeout) as con:
        runs = queries.list_runs(con)
    if runs.is_empty():
        raise ValueError(f"{path} holds no runs")
    return str(runs["run_id"][0])
