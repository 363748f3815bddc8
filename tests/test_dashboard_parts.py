"""The dashboard's pure parts: trajectories, selections, text, charts, clusters, the SQL sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from analysis.clusters import cluster, cluster_summary
from analysis.synthetic import branch_tree
from dashboard.charts import picked_branches, selected_rows
from dashboard.text import branches_html, context_windows, tree_order
from dashboard.trajectories import anchor_rows, trajectory_lines
from store.sandbox import SqlError, run_query
from views.synthetic import write_tree

ROOT = Path(__file__).resolve().parents[1]

# Branch 0 is the root (0..2); 1 forks off it at 3; 2 forks off 1 at 5; 3 forks off 1 at its first
# position, 3, so its anchor (position 2) lies on 1's parent, 0.
BRANCHES = pl.DataFrame(
    {
        "branch_id": [0, 1, 2, 3],
        "parent_branch_id": [None, 0, 1, 1],
        "fork_position": [0, 3, 5, 3],
        "prompt_id": [0] * 4,
        "kind": ["prompt", "sample", "fork", "fork"],
    }
)
POINTS = pl.DataFrame(
    {
        "branch_id": [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3],
        "position": [0, 1, 2, 3, 4, 5, 6, 5, 6, 3, 4],
        "x": [float(i) for i in range(11)],
        "y": [float(-i) for i in range(11)],
    }
)


def test_anchors_walk_up_the_lineage():
    anchors = anchor_rows(POINTS, BRANCHES).sort("branch_id")
    assert anchors.select("branch_id", "anchor_branch_id", "position").rows() == [
        (1, 0, 2),
        (2, 1, 4),
        (3, 0, 2),
    ]
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
    assert picked_branches({"pick_raw": [{"branch_id": 3}, {"branch_id": 1}], "brush_raw": {}}) == {1, 3}


def test_text_panel_marks_exactly_the_selection_and_escapes_tokens():
    lineage = pl.DataFrame(
        {
            "branch_id": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
            "position": [0, 1, 2, 0, 1, 2, 3, 4, 5, 6],
            "token_text": ["<bos>", "The", " cat", "<bos>", "The", " cat", " <em>", " sat", " down", "."],
        }
    )
    branches = BRANCHES.filter(pl.col("branch_id") <= 1)
    out = branches_html(branches, lineage, {(1, 4), (1, 5)})
    assert out.count("<mark") == 2 and '<mark id="bl-first-selected"> sat</mark><mark> down</mark>' in out
    assert "prompt 0" not in branches_html(branches, lineage, {(1, 4)}, only={1})
    out = branches_html(branches, lineage, {(1, 4)})
    assert "&lt;em&gt;" in out and "<em>" not in out
    assert "from position 3" in out
    assert tree_order(BRANCHES) == [(0, 0), (1, 1), (3, 2), (2, 2)]
    window = context_windows(pl.DataFrame({"branch_id": [1], "position": [4]}), lineage, before=2, after=1)
    assert window == ["… cat <em>[ sat] down…"]


def loop_contexts(points: pl.DataFrame, lineage: pl.DataFrame, before: int = 8, after: int = 4) -> list[str]:
    """The per-point loop context_windows was (17 s for 10^6 points): the reference for the columns."""
    from dashboard.text import printable

    seqs = {}
    for branch, texts in lineage.group_by("branch_id", maintain_order=True).agg("token_text").iter_rows():
        seqs[int(branch)] = list(texts)
    out = []
    for branch, pos in points.select("branch_id", "position").iter_rows():
        seq = seqs.get(int(branch), [])
        left, right = "".join(seq[max(0, pos - before) : pos]), "".join(seq[pos + 1 : pos + 1 + after])
        out.append(printable(f"…{left}[{seq[pos] if pos < len(seq) else ''}]{right}…"))
    return out


def test_prepare_points_in_columns_gives_what_the_per_row_loop_gave():
    from dashboard.space import prepare_points
    from dashboard.text import printable

    rng = np.random.default_rng(3)
    words = np.array([" a", "\nb", " c\x1d", "\td", " é", "[x]", ""])
    lengths = {0: 30, 1: 12, 2: 45, 5: 3}  # branch 7 has points but no lineage
    lineage = pl.DataFrame(
        [(b, p, str(w)) for b, n in lengths.items() for p, w in enumerate(rng.choice(words, n))],
        schema={"branch_id": pl.Int64, "position": pl.Int64, "token_text": pl.String},
        orient="row",
    )
    rows = [(b, p) for b, n in lengths.items() for p in rng.permutation(n + 2)[: n // 2 + 2]] + [
        (7, 0),
        (7, 4),
    ]
    rng.shuffle(rows)
    keys = pl.DataFrame(rows, schema={"branch_id": pl.Int64, "position": pl.Int64}, orient="row")
    res = keys.with_columns(
        pl.col("branch_id").floordiv(3).alias("prompt_id"),
        pl.Series("token_text", rng.choice(words, len(keys)).tolist()),
        pl.Series("x", rng.normal(size=len(keys))),
        pl.Series("y", rng.normal(size=len(keys))),
    )
    branches = pl.DataFrame({"branch_id": [0, 1, 2, 5, 7], "prompt_id": [0, 0, 0, 1, 2]})
    prompts = {0: "a prompt\nwith a newline and more than forty-eight characters in it", 1: "\x00p"}
    points = prepare_points(res, res, branches, lineage, prompts)
    assert points.select("branch_id", "position").equals(keys)  # same rows, same order
    assert points["context"].to_list() == loop_contexts(keys, lineage)
    assert points["token_text"].to_list() == [printable(t) for t in res["token_text"].to_list()]
    want = [f"{p}: {printable(prompts.get(p, ''))[:48]}" for p in res["prompt_id"].to_list()]
    assert points["prompt_label"].to_list() == want


def _points() -> pl.DataFrame:
    from dashboard.palette import branch_colors

    pts = POINTS.with_columns(
        pl.col("x").alias("raw_x"),
        pl.col("y").alias("raw_y"),
        (pl.col("x") * 2).alias("res_x"),
        pl.col("y").alias("res_y"),
        pl.lit(1).alias("depth"),
        pl.lit(0.0).alias("logprob"),
        pl.lit(0).alias("cluster"),
        pl.lit("t").alias("token_text"),
        pl.lit("ctx").alias("context"),
        pl.lit(0.8).alias("alpha"),
        (pl.col("branch_id") // 2).alias("prompt_id"),
    )
    pts = pts.with_columns(pl.format("{}: prompt", "prompt_id").alias("prompt_label"))
    branches = BRANCHES.with_columns((pl.col("branch_id") // 2).alias("prompt_id"))
    return pts.join(branch_colors(branches.select("branch_id", "prompt_id")), on="branch_id"), branches


def test_branch_shades_share_their_prompts_hue():
    import colorsys

    from dashboard.palette import branch_colors

    colours = branch_colors(pl.DataFrame({"branch_id": list(range(12)), "prompt_id": [0] * 5 + [1] * 7}))
    hls = {
        b: colorsys.rgb_to_hls(*(int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)))
        for b, c in zip(colours["branch_id"], colours["shade"])
    }
    assert len(set(colours["shade"])) == 12  # every branch its own shade
    for prompt, ids in ((0, range(5)), (1, range(5, 12))):
        hues = [hls[b][0] for b in ids]
        assert max(hues) - min(hues) < 0.02, (prompt, hues)  # one hue family per prompt
        assert len({round(hls[b][1], 2) for b in ids}) == len(ids)  # shades differ in lightness
    assert abs(hls[0][0] - hls[5][0]) > 0.05  # the two prompts' hues differ
    assert colours.filter(pl.col("branch_id") < 5)["prompt_color"].n_unique() == 1


def test_projection_draws_lines_only_for_lit_hovered_or_clicked_branches():
    from dashboard.charts import projection
    from dashboard.trajectories import anchor_rows, trajectory_lines

    pts, branches = _points()
    xy = pts.select("branch_id", "position", pl.col("raw_x").alias("x"), pl.col("raw_y").alias("y"))
    lines = (
        trajectory_lines(xy, branches)
        .rename({"x": "raw_x", "y": "raw_y"})
        .join(pts.select("branch_id", "shade").unique("branch_id"), on="branch_id")
        .with_columns((pl.col("branch_id") == 2).alias("lit"))
    )
    forks = (
        anchor_rows(xy, branches)
        .rename({"x": "raw_x", "y": "raw_y"})
        .with_columns(pl.lit(False).alias("lit"))
    )
    spec = projection(pts, lines, forks, "raw", "raw").to_dict()
    line_layer = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "line")
    shown = json.dumps(line_layer["transform"])
    assert "hover_raw" in shown and "pick_raw" in shown and "datum.lit" in shown
    dots = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "circle")
    assert {p["name"] for p in spec["params"]} == {
        "brush_raw",
        "pick_raw",
        "hover_raw",
        "zoom_raw",
        "legend_raw",
    }
    assert dots["encoding"]["color"]["field"] == "shade" and dots["encoding"]["color"]["scale"] is None
    assert dots["encoding"]["x"]["scale"]["zero"] is False  # no zero baseline
    legend = next(
        layer
        for layer in spec["layer"]
        if layer["mark"]["type"] == "point" and layer["mark"].get("opacity") == 0
    )
    assert legend["encoding"]["color"]["scale"]["domain"] == ["0: prompt", "1: prompt"]
    assert spec["width"] == "container"
    # Streamlit draws over 2,000 rows on canvas, where the wheel scrolled the page instead of zooming
    # (measured in Chromium on a 5k-point view): the projection asks for SVG, which zooms
    assert spec["usermeta"]["embedOptions"]["renderer"] == "svg"
    every = projection(pts, lines, forks, "raw", "raw", draw_all_lines=True).to_dict()
    assert "transform" not in next(layer for layer in every["layer"] if layer["mark"]["type"] == "line")
    import vl_convert as vlc

    static = projection(pts, lines, forks, "raw", "raw", interactive=False)
    assert static.to_dict()["width"] == 560 and vlc.vegalite_to_png(static.to_json())[:4] == b"\x89PNG"


def test_focus_selects_brushed_or_picked_tokens_and_lights_their_branches():
    from dashboard.space import focus

    pts, _ = _points()
    chosen, lit = focus(pts, {"brush_raw": {"raw_x": [2.5, 5.5], "raw_y": [-10, 0]}}, set(), set())
    assert chosen["x"].to_list() == [3.0, 4.0, 5.0] and lit == {1}
    chosen, lit = focus(pts, {}, {2}, set())  # a clicked branch: all its tokens, its line
    assert set(chosen["branch_id"].to_list()) == {2} and len(chosen) == 2 and lit == {2}
    chosen, lit = focus(pts, {}, {2}, {(3, 4)})  # a picked token wins over its branch's others
    assert chosen.select("branch_id", "position").rows() == [(3, 4)] and lit == {2, 3}
    chosen, lit = focus(pts, {}, set(), set())
    assert len(chosen) == 0 and lit == set()


def test_a_box_over_many_branches_draws_the_lines_of_the_few_it_holds_most_of():
    """Tried: a box over 156 tokens drew every touched branch's line, a mesh that hid the lit points."""
    from dashboard.space import MAX_BOX_LINES, focus

    rows = [
        (b, p, float(p), float(b)) for b in range(30) for p in range(b % 5 + 1)
    ]  # branch b: b % 5 + 1 tokens
    pts = pl.DataFrame(rows, schema=["branch_id", "position", "raw_x", "raw_y"], orient="row")
    chosen, lit = focus(pts, {"brush_raw": {"raw_x": [-1, 10], "raw_y": [-1, 100]}}, {0}, set())
    assert len(chosen) == len(pts) and chosen["branch_id"].n_unique() == 30
    most = sorted(range(30), key=lambda b: (-(b % 5 + 1), b))[:MAX_BOX_LINES]
    assert lit == {0} | set(most) and len(lit) <= MAX_BOX_LINES + 1


def test_clicked_branches_follow_a_change_of_view_and_boxes_do_not():
    """Chart keys are per view (a box's coordinates mean other tokens in another projection), so the
    branches clicked in the last view are carried: until a chart of the new view is clicked or brushed."""
    from dashboard.space import carry_picks, view_id

    pts, _ = _points()
    a, b = view_id(pts), view_id(pts.with_columns(pl.col("res_x") + 1.0))
    assert (
        a != b and view_id(pts.reverse()) == a and view_id(pts.with_columns(pl.lit(3).alias("cluster"))) == a
    )
    assert carry_picks(None, set(), set(), False) == set()  # first view
    carried = carry_picks({2, 3}, set(), set(), False)  # layer switch after clicking 2 and 3
    assert carried == {2, 3}
    assert carry_picks(None, carried, set(), False) == {2, 3}  # reruns of the new view keep them
    assert carry_picks(set(), carried, set(), False) == {2, 3}  # another switch without a click
    assert carry_picks(None, carried, {1}, False) == set()  # a click in the new view takes over
    assert carry_picks(None, carried, set(), True) == set()  # so does a box


def test_density_keeps_the_majority_prompts_colour_and_the_mean_position():
    from dashboard.charts import density, density_bins

    pts, _ = _points()
    cells = density_bins(pts, "raw", "branch", bins=2)
    assert cells["tokens"].sum() == len(pts)
    for row in cells.iter_rows(named=True):

        def within(col: str, lo: float, hi: float) -> pl.Expr:  # half-open cells, the last one closed
            top = pts[col].max()
            return (pl.col(col) >= lo - 1e-9) & (
                (pl.col(col) < hi - 1e-9) | ((hi >= top - 1e-9) & (pl.col(col) <= hi))
            )

        inside = pts.filter(within("raw_x", row["x0"], row["x1"]) & within("raw_y", row["y0"], row["y1"]))
        top = inside["prompt_label"].value_counts().sort("count", descending=True)
        assert row["majority_share"] == pytest.approx(top["count"][0] / len(inside))
        assert row["mean_position"] == pytest.approx(inside["position"].mean())
        # the cell's colour is its majority prompt's own colour
        assert (
            row["majority_color"]
            == inside.filter(pl.col("prompt_label") == row["majority_prompt"])["prompt_color"][0]
        )
    assert density(pts, "raw", "raw", "position").to_dict()["encoding"]["color"]["field"] == "mean_position"
    spec = density(pts, "raw", "raw", "branch").to_dict()
    assert spec["encoding"]["color"]["field"] == "majority_prompt" and spec["width"] == "container"
    assert "region_raw" in {p["name"] for p in spec["params"]}


def _many_prompts(n_prompts: int) -> pl.DataFrame:
    """Tokens of n_prompts prompts, prompt p holding p + 1 tokens, in the columns the panels read."""
    from dashboard.palette import branch_colors

    prompt = np.repeat(np.arange(n_prompts), np.arange(1, n_prompts + 1))
    rows = pl.DataFrame(
        {
            "prompt_id": prompt,
            "branch_id": prompt,
            "position": np.arange(len(prompt)),
            "raw_x": np.sin(np.arange(len(prompt))),
            "raw_y": np.cos(np.arange(len(prompt))),
        }
    )
    rows = rows.with_columns(
        pl.format("{}: prompt", "prompt_id").alias("prompt_label"),
        pl.lit("t").alias("token_text"),
        pl.lit("").alias("context"),
        pl.lit(0.8).alias("alpha"),
    )
    return rows.join(branch_colors(rows.select("branch_id", "prompt_id").unique()), on="branch_id")


@pytest.mark.parametrize("n_prompts", [11, 40])
def test_legends_name_prompts_in_id_order_and_at_most_legend_max(n_prompts):
    """Over LEGEND_MAX prompts a legend names the LEGEND_MAX with most tokens and says so (150 prompts
    left the plot a 76 px strip above its legend); prompts go by id (10 after 9, not after 1)."""
    from dashboard.charts import LEGEND_MAX, density, projection

    pts = _many_prompts(n_prompts)
    spec = projection(pts, None, None, "raw", "raw", "prompt").to_dict()
    legend_layer = next(layer for layer in spec["layer"] if layer["mark"].get("opacity") == 0)
    key = legend_layer["encoding"]["color"]
    named = key["legend"]["values"]
    ids = [int(v.split(":")[0]) for v in named]
    assert key["scale"]["domain"] == [
        f"{p}: prompt" for p in range(n_prompts)
    ]  # every prompt keeps its colour
    if n_prompts <= LEGEND_MAX:
        assert ids == list(range(n_prompts)) and "named" not in key["legend"]["title"]
    else:  # prompt p has p + 1 tokens: the last LEGEND_MAX have most
        assert ids == list(range(n_prompts - LEGEND_MAX, n_prompts))
        assert key["legend"]["title"] == f"prompt: {LEGEND_MAX} of {n_prompts} named (most tokens)"
    cells = density(pts, "raw", "raw", "prompt").to_dict()["encoding"]["color"]
    assert len(cells["legend"]["values"]) == min(n_prompts, LEGEND_MAX)
    assert [int(v.split(":")[0]) for v in cells["legend"]["values"]] == sorted(
        int(v.split(":")[0]) for v in cells["legend"]["values"]
    )


def test_a_colour_scale_keeps_its_legend_beside_the_lines():
    """Lines take identity colours without a legend; resolved together with the dots, they took the dots'
    position legend away (the drill-down panels had no key)."""
    from dashboard.charts import projection

    pts, branches = _points()
    lines = pts.select(
        "branch_id", pl.col("position").alias("order"), "raw_x", "raw_y", "shade"
    ).with_columns(pl.lit(True).alias("lit"))
    spec = projection(pts, lines, None, "raw", "raw", "position").to_dict()
    assert spec["resolve"]["scale"]["color"] == "independent"
    dots = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "circle")
    assert dots["encoding"]["color"]["field"] == "position" and "legend" not in dots["encoding"]["color"]


def test_a_box_on_the_density_draws_the_tokens_inside_it():
    from dashboard.charts import region_rows

    pts, _ = _points()
    assert region_rows(pts, "raw", {}) is None
    inside = region_rows(pts, "raw", {"region_raw": {"x0": [6.5, 2.5], "y0": [-10.0, 0.0]}})
    assert inside["raw_x"].to_list() == [3.0, 4.0, 5.0, 6.0]


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


def test_layer_profile_charts_carry_a_raw_and_removed_key():
    """The lines' legend names raw and the method; the bands' colours resolve apart (sharing the scale,
    their legend=None left the Layers tab without a key)."""
    from dashboard.charts import RAW_COLOUR, REMOVED_COLOUR, profile_panel

    rows = pl.DataFrame(
        {
            "layer": [0, 1, 0, 1],
            "method": ["raw", "raw", "per-position mean", "per-position mean"],
            "r2": [0.8, 0.7, 0.01, 0.0],
            "r2_band": [0.02] * 4,
            "chance": [0.001] * 4,
            "chance_band": [0.001] * 4,
        }
    )
    spec = profile_panel(rows, "r2", "r2_band", "chance", "chance_band", "R2_pos").to_dict()
    assert spec["resolve"]["scale"]["color"] == "independent"
    line = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "line")
    colour = line["encoding"]["color"]
    assert colour["legend"] is not None and colour["legend"]["orient"] == "top"
    assert colour["scale"]["domain"] == ["raw", "per-position mean"] and colour["scale"]["range"] == [
        RAW_COLOUR,
        REMOVED_COLOUR,
    ]


def test_a_prompt_clicked_in_either_legend_lights_its_tokens_in_both_panels():
    """Tried: clicking a prompt in the legend dimmed the others in that panel only, while boxes and clicked
    branches lit both. The legend's selection is reported to the app, which lights the same tokens in both."""
    from dashboard.charts import legend_prompts
    from dashboard.space import focus

    rows = [(b, p, float(p), float(b), f"{b // 3}: prompt") for b in range(6) for p in range(4)]
    pts = pl.DataFrame(rows, schema=["branch_id", "position", "raw_x", "raw_y", "prompt_label"], orient="row")
    event = {"legend_res": [{"prompt_label": "1: prompt"}], "pick_res": [], "brush_res": {}}
    assert (
        legend_prompts(event) == {"1: prompt"} and legend_prompts({"pick_raw": [{"branch_id": 1}]}) == set()
    )
    chosen, lit = focus(pts, {}, set(), set(), legend_prompts(event))
    assert set(chosen["branch_id"].to_list()) == {3, 4, 5} and len(chosen) == 12 and lit == {3, 4, 5}
    # with a box too: the box's tokens of that prompt only
    chosen, _ = focus(
        pts, {"brush_raw": {"raw_x": [1.5, 3.5], "raw_y": [-1, 10]}}, set(), set(), {"0: prompt"}
    )
    assert set(chosen["branch_id"].to_list()) == {0, 1, 2} and set(chosen["position"].to_list()) == {2, 3}


def test_legends_and_per_prompt_panels_fit_a_1366_px_window():
    """Tried at 1366x768: the legend's third column was cut ("2: In 1969, th") and the per-prompt panels of
    Where branches go apart overflowed with a page-wide scrollbar. With the sidebar open a panel is ~430 px
    there (measured in Chromium), the main area ~900 px."""
    from dashboard.charts import divergence_per_prompt, prompt_legend

    rows = pl.DataFrame(
        {
            "prompt_id": range(6),
            "label": [f"{i}: In 1969, the first person to" for i in range(6)],
            "colour": ["#000000"] * 6,
        }
    )
    _, legend = prompt_legend(rows, "label", "colour")
    legend = legend.to_dict()
    # a column takes its label and ~45 px more (symbol, offsets, column padding)
    assert legend["columns"] * (legend["labelLimit"] + 45) <= 430
    data = pl.DataFrame(
        {
            "prompt": [p for p in range(6) for _ in range(3)],
            "offset": list(range(3)) * 6,
            "view": ["raw"] * 18,
            "median": [1.0] * 18,
            "lo": [0.9] * 18,
            "hi": [1.1] * 18,
        }
    )
    spec = divergence_per_prompt(data).to_dict()
    assert spec["columns"] * (spec["spec"]["width"] + 60) <= 900


def _crossings(x: float, y: float, polygon: list) -> bool:
    """Even-odd rule, one point at a time (as webgl.js's canvas fills a lasso): the reference for inside."""
    odd = False
    for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1]):
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            odd = not odd
    return odd


def test_webgl_inside_matches_the_even_odd_rule_on_a_concave_lasso():
    from dashboard.webgl import inside

    rng = np.random.default_rng(0)
    q = rng.integers(0, 1000, size=(5000, 2)).astype(np.uint16)
    # an L shape (concave) and a star that crosses itself (its centre is outside under even-odd)
    shapes = [
        [[100, 100], [600, 100], [600, 300], [300, 300], [300, 800], [100, 800]],
        [[500, 50], [650, 950], [50, 350], [950, 350], [350, 950]],
    ]
    for polygon in shapes:
        expect = np.array([_crossings(float(x), float(y), polygon) for x, y in q])
        got = inside(q, polygon)
        assert 0 < got.sum() < len(q) and np.array_equal(got, expect)
    assert not inside(q, [[0, 0], [999, 999]]).any()  # two points enclose nothing


@pytest.mark.parametrize("color_by", ["prompt", "position", "cluster"])
def test_webgl_colours_follow_the_charts_choice(color_by):
    """The WebGL panels colour as the Vega ones do: one hue per prompt, the viridis ramp over position
    (dark first, yellow last, named in the legend), a palette per nominal value."""
    from dashboard.webgl import MAX_COLOURS, RAMP, _rgb, colour_bins

    points = pl.DataFrame(
        {
            "prompt_color": ["#4e79a7", "#4e79a7", "#f28e2b", "#f28e2b"],
            "position": [0, 10, 20, 30],
            "cluster": [2, 1, 2, 0],
        }
    )
    bins, rgb, legend = colour_bins(points, color_by)
    colours = [rgb[b] for b in bins.to_list()]
    if color_by == "prompt":
        assert colours == [_rgb("#4e79a7")] * 2 + [_rgb("#f28e2b")] * 2 and legend == "colour: prompt"
    elif color_by == "position":
        assert (
            colours[0] == _rgb(RAMP[0])
            and colours[-1] == _rgb(RAMP[-1])
            and "0 (dark) to 30 (yellow)" in legend
        )
        assert bins.to_list() == sorted(bins.to_list()) and len(set(bins.to_list())) == 4
    else:
        assert colours[0] == colours[2] != colours[1] != colours[3] and len(rgb) <= MAX_COLOURS


def test_webgl_tree_carries_the_shown_branches_and_their_ancestors_for_the_hover_text():
    """The hover's text around a token is read in the browser from the points; before a fork it comes from
    the parent's points, so the header carries each shown branch's parent and fork, up to its root."""
    from dashboard.webgl import decode, payload, tree_of

    branches = pl.DataFrame(
        {
            "branch_id": [0, 1, 2, 3],
            "parent_branch_id": [None, 0, 1, None],
            "fork_position": [0, 5, 8, 0],
        }
    )
    points = pl.DataFrame({"branch_id": [2, 2], "position": [8, 9], "raw_x": [0.0, 1.0], "raw_y": [0.0, 1.0]})
    tree = tree_of(points, branches)
    assert tree == [[0, -1, 0], [1, 0, 5], [2, 1, 8]]  # branch 3 is neither shown nor an ancestor
    header = decode(payload(points, "raw", "branch", tree=tree)[0])
    assert header["tree"] == tree and header["context"] == [8, 4]


def test_webgl_payload_carries_every_token_its_colour_selection_and_lines():
    from dashboard.webgl import GRID, decode, payload

    points = POINTS.rename({"x": "raw_x", "y": "raw_y"}).with_columns(
        pl.col("branch_id").cast(pl.String).alias("token_text"),
        pl.lit("#4e79a7").alias("prompt_color"),
        pl.col("branch_id")
        .replace_strict({0: "#111111", 1: "#222222", 2: "#333333", 3: "#444444"})
        .alias("shade"),
    )
    blob, legend = payload(points, "raw", "branch", np.array([4, 5]), {1, 3}, view="v1", selection=[[0, 0]])
    got = decode(blob)
    assert got["n"] == len(points) and got["view"] == "v1" and got["selection"] == [[0, 0]]
    assert got["branch"].tolist() == points["branch_id"].to_list()
    assert got["position"].tolist() == points["position"].to_list()
    assert [got["vocab"][t] for t in got["tok"]] == points["token_text"].to_list()  # hover text, every point
    assert len(got["vocab"]) == points["token_text"].n_unique()
    # x from 0 to the grid's right edge; y flipped (screen y grows downward)
    assert got["q"][:, 0].min() == 0 and got["q"][:, 0].max() == GRID[0] - 1
    assert got["q"][0, 1] == 0 and got["q"][-1, 1] == GRID[1] - 1
    # one colour per branch shade, as the palette holds them
    shades = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in points["shade"]]
    assert [tuple(got["palette"][b]) for b in got["bin"]] == shades
    assert got["chosen"].tolist() == [4, 5] and "branch" in legend
    # lines: branch 1 (4 tokens) then branch 3 (2), each in position order
    assert got["lines"] == [4, 2]
    rows = got["line_rows"]
    assert got["branch"][rows].tolist() == [1, 1, 1, 1, 3, 3]
    assert got["position"][rows].tolist() == [3, 4, 5, 6, 3, 4]


def test_the_per_prompt_divergence_panels_draw_an_x_axis_under_each_panel_and_none_under_empty_cells():
    """Four prompts in rows of three: the x axis was drawn under the last row's two empty cells (once per
    column, three in all); now each of the four panels has its own, as rendered by Vega (vl-convert)."""
    import vl_convert as vlc

    from dashboard.charts import divergence_per_prompt

    rows = pl.DataFrame(
        {
            "prompt": [p for p in range(4) for _ in range(2) for _ in range(5)],
            "view": [v for _ in range(4) for v in ("raw", "removed") for _ in range(5)],
            "offset": [o for _ in range(8) for o in range(5)],
            "median": [0.8] * 40,
            "lo": [0.7] * 40,
            "hi": [0.9] * 40,
            "n_pairs": [3] * 40,
        }
    )
    svg = vlc.vegalite_to_svg(divergence_per_prompt(rows).to_dict())
    assert svg.count(">tokens since parting<") == 4


def test_the_app_skips_the_chart_schema_check_and_serializes_the_same(tmp_path):
    """Outside the tests (no BRANCHLENS_VALIDATE_CHARTS) Altair's schema check is off: a chart the check
    refuses serializes, and a projection panel's spec is the one the check passes, unchanged."""
    import os
    import subprocess
    import sys

    script = """
import json, altair as alt, polars as pl
from dashboard import charts
from test_dashboard_parts import _points
assert not charts.VALIDATE
def bad():
    return alt.Chart(pl.DataFrame({"a": [1]}), mark="point", width="nonsense")  # width must be a number
charts.unchecked(bad()).to_dict()  # no check: serializes
try:
    bad().to_dict()
    refused = False
except Exception as exc:
    refused = type(exc).__name__ == "SchemaValidationError"
pts, _ = _points()
panel = charts.projection(pts, None, None, "raw", "raw", "prompt")
print(json.dumps({"refused": refused, "same": charts.unchecked(panel).to_dict() == panel.to_dict(validate=True)}))
"""
    env = {k: v for k, v in os.environ.items() if k != "BRANCHLENS_VALIDATE_CHARTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"refused": True, "same": True}
