"""Lines through each branch's tokens in order; a child's line starts at its fork point on its lineage."""

from __future__ import annotations

import polars as pl


def anchor_rows(points: pl.DataFrame, branches: pl.DataFrame) -> pl.DataFrame:
    """For each plotted child branch, the plotted token it forks off: the token at fork_position - 1 on its
    lineage (the parent, or a further ancestor when the parent itself starts later).

    points: plotted tokens with branch_id, position, x, y. branches: branch_id, parent_branch_id,
    fork_position. Returns rows of branch_id (the child), anchor_branch_id, position, x, y.
    """
    parent = dict(zip(branches["branch_id"].to_list(), branches["parent_branch_id"].to_list()))
    start = dict(zip(branches["branch_id"].to_list(), branches["fork_position"].to_list()))
    xy = {(b, p): (x, y) for b, p, x, y in points.select("branch_id", "position", "x", "y").iter_rows()}
    rows = []
    for child in points["branch_id"].unique().to_list():
        owner, pos = parent.get(child), start.get(child, 0) - 1
        while owner is not None and start.get(owner, 0) > pos:
            owner = parent.get(owner)
        if owner is not None and (owner, pos) in xy:
            x, y = xy[(owner, pos)]
            rows.append((child, owner, pos, x, y))
    schema = {
        "branch_id": pl.Int64,
        "anchor_branch_id": pl.Int64,
        "position": pl.Int64,
        "x": pl.Float64,
        "y": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def trajectory_lines(points: pl.DataFrame, branches: pl.DataFrame) -> pl.DataFrame:
    """Vertices of one line per branch: its anchor (if plotted) then its own tokens by position.

    Columns: branch_id, order (drawing order), position, x, y, is_anchor.
    """
    own = points.select(
        pl.col("branch_id").cast(pl.Int64),
        pl.col("position").cast(pl.Int64),
        pl.col("x").cast(pl.Float64),
        pl.col("y").cast(pl.Float64),
        pl.lit(False).alias("is_anchor"),
    )
    anchors = anchor_rows(points, branches).select(
        "branch_id", "position", "x", "y", pl.lit(True).alias("is_anchor")
    )
    lines = pl.concat([anchors, own]).sort(
        ["branch_id", "position", "is_anchor"], descending=[False, False, True]
    )
    return lines.with_columns(pl.int_range(pl.len()).over("branch_id").alias("order"))
