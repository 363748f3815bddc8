"""One view as a Parquet file that other tools open as it is (Embedding Atlas, latent-scope, pandas):
a row per plotted token with its labels and text, the raw projection (raw_x, raw_y) and the one after
removal (x, y), and the view's numbers and verdict in the file's metadata (key `branchlens`, JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from analysis.verdict import verdict
from views.cache import jsonable
from views.errors import StoreError
from views.service import Selection, compute
from views.specs import ViewSpec, raw_of


def export_view(store: str | Path, selection: Selection, spec: ViewSpec, out: str | Path) -> Path:
    """Compute the raw and the removed view of `selection` and write them to `out` (Parquet)."""
    raw = compute(store, selection, raw_of(spec))
    removed = compute(store, selection, spec)
    keys = ["branch_id", "position"]
    points = removed.points.join(
        raw.points.select(*keys, pl.col("x").alias("raw_x"), pl.col("y").alias("raw_y")), on=keys, how="left"
    )
    meta = {
        "store": str(store),
        "selection": selection.key(),
        "spec": spec.to_dict(),
        "verdict": verdict(raw.result.metrics, removed.result.metrics),
        "raw": raw.result.metrics,
        "removed": removed.result.metrics,
    }
    table = points.to_arrow()
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"branchlens": json.dumps(meta, default=jsonable).encode()}
    )
    try:
        pq.write_table(table, str(out))
    except OSError as exc:
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from None
    return Path(out)
