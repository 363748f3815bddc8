"""The dashboard's pure parts: trajectories, selections, text, charts, clusters, the SQL sandbox."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from analysis.clusters import cluster, cluster_summary
from analysis.synthetic import branch_tree
from dashboard.charts import side_by_side, selected_rows
from dashboard.text import branches_html, context_windows, tree_order
from dashboard.trajectories import anchor_rows, trajectory_lines
from store.sandbox import SqlError, run_query
from views.synthetic import write_tree

# Branch 0 is the root (0..2); 1 forks off it at 3; 2 forks off 1 at 5; 3 forks off 1 at its first
# position, 3, so its anchor (position 2) lies on 1's parent, 0.
BRANCHES = pl.DataFrame({"branch_id": [0, 1, 2, 3], "parent_branch_id": [None, 0, 1, 1],
                         "fork_position": [0, 3, 5, 3], "prompt_id": [0] * 4,
                         "kind": ["prompt", "sample", "fork", "fork"]})
POINTS = pl.DataFrame({"branch_id": [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3],
                       "position": [0, 1, 2, 3, 4, 5, 6, 5, 6, 3, 4],
                       "x": [float(i) for i in range(11)], "y": [float(-i) for i in range(11)]})


def test_anchors_walk_up_the_lineage():
    anchors = anchor_rows(POINTS, BRANCHES).sort("branch_id")
    assert anchors.select("branch_id", "anchor_branch_id", "position").rows() == [(1, 0, 2), (2, 1, 4), (3, 0, 2)]
    lines = trajectory_lines(POINTS, BRANCHES)
    two = lines.filter(pl.col("branch_id") == 2).sort("order")
    assert two["position"].to_list() == [4, 5, 6] and two["is_anchor"].to_list() == [True, False, False]
    # Without its anchor plotted (e.g. prompt tokens hidden), a line just starts at its own first token.
    no_root = POINTS.filter(pl.col("branch_id") != 0)
    assert set(anchor_rows(no_root, BRANCHES)["branch_id"].to_list()) == {2}


def test_selected_rows_from_a_brush_event():
    pts = POINTS.with_columns(pl.col("x").alias("raw_x"), pl.col("y").alias("raw_y"))
    chosen = selected_rows(pts, {"brush_raw": {"raw_x": [2.5, 5.5], "raw_y": [-10, 0]}, "brush_res": {}})
    assert chosen["x"].to_list() == [3.0, 4.0, 5.0]
    assert len(selected_rows(pts, {})) == len(pts)


def test_text_panel_marks_exactly_the_selection_and_escapes_tokens():
    lineage = pl.DataFrame({
        "branch_id": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
        "position": [0, 1, 2, 0, 1, 2, 3, 4, 5, 6],
        "token_text": ["<bos>", "The", " cat", "<bos>", "The", " cat", " <em>", " sat", " down", "."],
    })
    branches = BRANCHES.filter(pl.col("branch_id") <= 1)
    out = branches_html(branches, lineage, {(1, 4)})
    assert out.count("<mark>") == 1 and "<mark> sat</mark>" in out
    assert "&lt;em&gt;" in out and "<em>" not in out
    assert "from position 3" in out
    assert tree_order(BRANCHES) == [(0, 0), (1, 1), (3, 2), (2, 2)]
    window = context_windows(pl.DataFrame({"branch_id": [1], "position": [4]}), lineage, before=2, after=1)
    assert window == ["… cat <em>[ sat] down…"]


def test_side_by_side_links_both_panels():
    pts = POINTS.with_columns(
        pl.col("x").alias("raw_x"), pl.col("y").alias("raw_y"), (pl.col("x") * 2).alias("res_x"),
        pl.col("y").alias("res_y"), pl.lit(0).alias("prompt_id"), pl.lit(1).alias("depth"),
        pl.lit(0.0).alias("logprob"), pl.lit(0).alias("cluster"), pl.lit("t").alias("token_text"),
        pl.lit("ctx").alias("context"),
    )
    spec = side_by_side(pts, BRANCHES).to_dict()
    assert [p["name"] for p in spec["params"]] == ["brush_raw", "brush_res"]
    for panel in spec["hconcat"]:
        dots = panel["layer"][-1]
        condition = json.dumps(dots["encoding"]["opacity"])
        assert "brush_raw" in condition and "brush_res" in condition
    import vl_convert as vlc

    assert vlc.vegalite_to_png(side_by_side(pts, BRANCHES).to_json())[:4] == b"\x89PNG"


def test_clusters_find_two_blobs_and_summarize_them():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 8])
    for method in ("kmeans", "hdbscan"):
        labels = cluster(X, method=method, k=2, min_cluster_size=10)
        assert len(set(labels[:50])) == 1 and set(labels[:50]).isdisjoint(labels[50:]), method
    summary = cluster_summary(labels, ["a"] * 60 + ["b"] * 40, np.repeat([7, 8], 50))
    assert [s["size"] for s in summary if s["cluster"] >= 0] == [50, 50]
    assert summary[0]["top_tokens"][0] in (("a", 50), ("b", 40), ("a", 10))
    with pytest.raises(ValueError, match="unknown clustering"):
        cluster(X, method="dbscan")


@pytest.fixture(scope="module")
def sql_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sql") / "s.duckdb"
    write_tree(path, branch_tree(n_prompts=2, branches_per_prompt=3, length=20, d=8))
    return path


def test_sandbox_caps_rows_stops_long_queries_and_allows_describe(sql_store):
    capped = run_query(sql_store, "SELECT * FROM range(100000)", max_rows=50)
    assert capped.table.num_rows == 50 and capped.truncated
    assert not run_query(sql_store, "SELECT 1 AS a", max_rows=50).truncated
    assert "vec" in run_query(sql_store, "DESCRIBE latents").table.column(0).to_pylist()
    with pytest.raises(SqlError, match="time limit"):
        run_query(sql_store, "SELECT count(*) FROM range(100000000000) a, range(1000000) b", timeout_s=0.5)
    bytes_cut = run_query(sql_store, "SELECT repeat('x', 1000000) AS s FROM range(100)", max_bytes=20_000_000)
    assert bytes_cut.truncated and bytes_cut.cut_by == "bytes"
    assert 0 < bytes_cut.table.num_rows < 100 and bytes_cut.table.nbytes <= 20_000_000
    with pytest.raises(SqlError, match="one statement at a time"):
        run_query(sql_store, "SELECT 1; SELECT 2")
    with pytest.raises(SqlError, match="not allowed"):
        run_query(sql_store, "INSERT INTO meta VALUES ('a', 'b')")
    with pytest.raises(SqlError, match="SET statements are not allowed"):
        run_query(sql_store, "SET enable_external_access = true")
    for leak in ("SELECT path FROM duckdb_databases()", 'SELECT * FROM "DuckDB_Settings"()',
                 "SELECT current_setting('home_directory')"):
        with pytest.raises(SqlError, match="names paths on the server"):
            run_query(sql_store, leak)
    with pytest.raises(SqlError, match="file system operations are disabled"):
        run_query(sql_store, "SELECT * FROM glob('/etc/*')")


def test_a_query_interrupt_cannot_stop_is_killed_at_the_time_limit(sql_store):
    """Work inside one expression that DuckDB's interrupt does not reach (it ran 35 s and 7 GB in the app):
    the query's process is killed at the limit, or stopped by the memory limit first; either way one
    SqlError, and the next query runs."""
    with pytest.raises(SqlError, match="time limit|memory|Out of Memory"):
        run_query(sql_store, "SELECT length(list_sort(range(60000000)))", timeout_s=1.0)
    assert run_query(sql_store, "SELECT 42 AS x").table.column("x").to_pylist() == [42]


def test_printable_makes_byte_tokens_safe_for_svg():
    from dashboard.text import printable

    assert printable("a\x1db\nc\td") == "a\\x1db⏎c⇥d"
    import altair as alt
    import vl_convert as vlc

    chart = alt.Chart(pl.DataFrame({"t": [printable("x\x1d\x00y")], "v": [1]})).mark_text().encode(text="t:N")
    assert vlc.vegalite_to_svg(chart.to_json()).startswith("<svg")
