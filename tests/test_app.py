"""The dashboard driven by Streamlit's AppTest on real stores: a tiny-model ingest and synthetic trees."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import streamlit as st
from helpers import PROMPTS, PYTHON, app_charts, app_elements, ingest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def store(model_dirs, tmp_path_factory):
    """A real ingest on the tiny Llama: 3 prompts x 2 samples x 1 fork, layers 0, 1, 2."""
    from ingest.config import build_config

    path = tmp_path_factory.mktemp("app") / "app.duckdb"
    cfg = build_config(
        dict(
            model=str(model_dirs["llama"]),
            prompts=list(PROMPTS),
            samples=2,
            forks=1,
            depth=1,
            max_new_tokens=10,
            layers=[0, 1, 2],
            device="cpu",
            store=str(path),
        )
    )
    return path, ingest(cfg).run_id


@pytest.fixture(autouse=True)
def app_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BRANCHLENS_NO_WARMUP", "1")
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BRANCHLENS_LOCK_TIMEOUT", "1")


def open_app(path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.session_state["store_path"] = str(path)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> list[tuple[dict, list[pa.Table]]]:
    """Per Vega-Lite chart on the page: its spec and its datasets as Arrow tables."""
    return app_charts(at)


def chart_tables(at: AppTest) -> list[list[pa.Table]]:
    return [tables for _, tables in charts(at)]


def projection(at: AppTest, panel: str = "raw") -> dict[str, pa.Table]:
    """One projection panel's points, trajectory vertices and fork markers ('raw' or 'res')."""
    for spec, tables in charts(at):
        layers = [layer for layer in spec.get("layer", []) if layer.get("mark", {}).get("type") == "circle"]
        if not layers or layers[0].get("encoding", {}).get("x", {}).get("field") != f"{panel}_x":
            continue
        named = {}
        for t in tables:
            cols = set(t.column_names)
            if {"raw_x", "res_x", "token_text"} <= cols:
                named["points"] = t
            elif "order" in cols:
                named.setdefault("lines", t)
            elif "anchor_branch_id" in cols:
                named.setdefault("forks", t)
        return named
    raise AssertionError(f"no {panel} projection on the page")


def scatters(at: AppTest) -> list[tuple[str, dict]]:
    """(widget key, decoded payload) of each WebGL panel on the page (dashboard.webgl), raw first."""
    from dashboard.webgl import decode

    # an element id is "$$ID-<digest>-<key>"
    return [
        (el.proto.id.split("-", 2)[2], decode(el.proto.bytes)) for el in app_elements(at, "bidi_component")
    ]


def dots_layer(spec: dict) -> dict:
    return next(layer for layer in spec["layer"] if layer["mark"]["type"] == "circle")


def open_tab(at: AppTest, tab: str) -> AppTest:
    at.session_state["tab"] = tab
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def text_caption(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "tokens selected" in m.value)


def expected_tokens(path, run_id, layer=1, generated_only=False) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        where = " AND NOT t.is_prompt" if generated_only else ""
        return con.execute(
            "SELECT count(*) FROM latents l JOIN tokens t USING (run_id, branch_id, position) "
            f"WHERE l.run_id = ? AND l.layer = ? AND t.position > 0{where}",
            [run_id, layer],
        ).fetchall()[0][0]


def test_opens_the_store_with_both_projections_trajectories_and_numbers(store):
    path, run_id = store
    at = open_app(path)
    assert at.selectbox(key="run").value == run_id
    assert at.selectbox(key="layer").value == 1  # the middle stored layer
    parts = projection(at)
    # Every stored token but the BOS sinks, once in each panel's dataset (the two panels share it).
    assert parts["points"].num_rows == expected_tokens(path, run_id)
    with duckdb.connect(str(path), read_only=True) as con:
        n_branches, n_children = con.execute(
            "SELECT count(*), count(parent_branch_id) FROM branches WHERE run_id = ?", [run_id]
        ).fetchall()[0]
    assert len(set(parts["lines"].column("branch_id").to_pylist())) == n_branches
    # Every child starts its line at a fork point on its lineage (the BOS is never a fork point here).
    assert parts["forks"].num_rows == n_children
    table = next(m.value for m in at.markdown if "bl-metrics" in m.value)
    assert "R2_pos (variance explained by position)" in table and "<abbr title=" in table
    # the ? help is a mouse-only tooltip: every row's help is also in an expander, readable by keyboard
    meaning = next(e for e in at.expander if e.label == "What each number means")
    listed = " ".join(m.value for m in meaning.markdown)
    from analysis.measures import MEASURES

    assert "**R2_pos (variance explained by position)**" in listed and MEASURES["r2_pos"].help in listed
    assert text_caption(at).startswith("<small>0 tokens selected")
    assert not any("<mark" in m.value for m in at.markdown)  # nothing selected yet
    res = projection(at, "res")["points"]
    assert res.num_rows == parts["points"].num_rows


def test_widgets_change_the_view(store):
    path, run_id = store
    at = open_app(path)
    before = projection(at)["points"]
    at.checkbox(key="generated_only").check().run()
    generated = projection(at)["points"]
    assert generated.num_rows == expected_tokens(path, run_id, generated_only=True) < before.num_rows
    at.checkbox(key="generated_only").uncheck()
    at.selectbox(key="layer").set_value(2).run()
    other_layer = projection(at)["points"]
    assert other_layer.num_rows == before.num_rows
    assert other_layer.column("raw_x").to_pylist() != before.column("raw_x").to_pylist()
    at.checkbox(key="trajectories").uncheck().run()
    assert "lines" not in projection(at) and "forks" not in projection(at)
    at.selectbox(key="color_by").set_value("position").run()
    spec = charts(at)[0][0]
    assert dots_layer(spec)["encoding"]["color"]["field"] == "position"
    at.checkbox(key="keep_sinks").check().run()
    assert projection(at)["points"].num_rows == before.num_rows + 3  # the three prompts' BOS tokens
    assert not at.exception


def test_layers_tab_and_clusters(store):
    path, run_id = store
    at = open_tab(open_app(path), "Layers")
    profile = [(spec, t) for spec, t in charts(at) if t and "method" in t[0].column_names]
    titles = {spec["title"] for spec, _ in profile}
    assert {
        "R2_pos (variance explained by position)",
        "position probe R2, prompts held out",
        "kNN position leak, full space",
        "kNN position leak, other prompts only",
    } <= titles, titles
    assert all(spec["height"] >= 250 for spec, _ in profile)
    assert set(profile[0][1][0].column("layer").to_pylist()) == {0, 1, 2}
    table = at.dataframe[-1].value  # the per-layer table: no column of blanks
    assert "r2_pos" in table.columns and not [c for c in table.columns if table[c].isna().all()]
    # wider than a 1366 px window (issue 30: "cut at the right edge"): it scrolls with its row's layer and
    # view pinned in place
    assert pinned(at.dataframe[-1]) == {"layer", "view"}  # their headers
    at = open_tab(at, "Clusters")
    clusters = at.dataframe[-1].value
    assert clusters["tokens"].sum() == expected_tokens(path, run_id)
    assert pinned(at.dataframe[-1]) == {"cluster"}


def pinned(frame) -> set[str]:
    """The headers of the columns a dataframe keeps in place while it scrolls sideways (its column config)."""
    config = json.loads(frame.proto.columns or "{}")
    return {(c.get("label") or k) for k, c in config.items() if c.get("pinned")}


@pytest.mark.parametrize(
    "sql, message",
    [
        ("CREATE TABLE x AS SELECT 1", "CREATE statements are not allowed"),
        ("COPY tokens TO 'out.csv'", "COPY statements are not allowed"),
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("ATTACH 'other.duckdb' AS other", "ATTACH statements are not allowed"),
    ],
)
def test_sql_tab_refuses_writes_and_files(store, sql, message):
    path, _ = store
    at = open_tab(open_app(path), "SQL")
    at.text_area(key="sql").input(sql)
    at.button(key="sql_run").click().run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def test_sql_tab_runs_a_query(store):
    path, run_id = store
    at = open_tab(open_app(path), "SQL")
    at.text_area(key="sql").input(
        f"SELECT branch_id, count(*) AS n FROM tokens WHERE run_id = '{run_id}' GROUP BY 1"
    )
    at.button(key="sql_run").click().run()
    assert not at.error
    with duckdb.connect(str(path), read_only=True) as con:
        n = con.execute("SELECT count(*) FROM branches WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert len(at.dataframe[-1].value) == n


def test_missing_empty_and_foreign_stores_give_messages(tmp_path):
    at = open_app(tmp_path / "nothing.duckdb")
    assert "No store at" in at.info[0].value
    from store.writer import StoreWriter

    empty = tmp_path / "empty.duckdb"
    StoreWriter(empty, created_by="test").prepare(8)
    at = open_app(empty)
    assert "holds no runs" in at.info[0].value
    newer = tmp_path / "newer.duckdb"
    StoreWriter(newer, created_by="test").prepare(8)
    with duckdb.connect(str(newer)) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    at = open_app(newer)
    assert at.error and "schema version 99" in at.error[0].value
    foreign = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE t(a INT)")
    at = open_app(foreign)
    assert at.error and "branchlens" in at.error[0].value


def test_a_store_held_by_a_writer_shows_a_note_not_a_crash(store, tmp_path):
    """DuckDB allows one writer xor readers: while another process holds the file, the app says so."""
    path, _ = store
    copy = tmp_path / "busy.duckdb"
    copy.write_bytes(Path(path).read_bytes())
    holder = subprocess.Popen(
        [
            PYTHON,
            "-c",
            f"import duckdb, sys; c = duckdb.connect({str(copy)!r}); "
            "print('held', flush=True); sys.stdin.read()",  # holds the file until killed, however long
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        at = open_app(copy)
        assert at.warning and "ingest is committing" in at.warning[0].value
    finally:
        holder.kill()
        holder.wait()  # a dead process holds no lock
    at = open_app(copy)
    assert not at.warning and projection(at)["points"].num_rows > 0


def test_a_box_or_lasso_drawn_on_the_webgl_view_selects_the_tokens_inside_it(store):
    """The browser sends a box or lasso as a polygon in the panel's grid units; the tokens inside it (on
    the grid the browser drew) are selected in both panels (ringed) and marked in the text, as a box on the
    Vega charts would; a polygon drawn on another view's coordinates is ignored; clearing it drops them."""
    from dashboard.webgl import GRID

    path, _ = store
    at = open_app(path)
    every = pl.from_arrow(projection(at)["points"])  # raw_x, raw_y of every token (Vega, before WebGL)
    at.number_input(key="max_points").set_value(100).run()
    panels = scatters(at)
    assert len(panels) == 2 and all(p["n"] == len(every) for _, p in panels)
    raw_key = scatters(at)[0][0]
    view = raw_key.removeprefix("gl_raw_")
    # the left third of the raw panel, in grid units (x grows right, y down; the grid spans the points)
    third = (GRID[0] - 1) / 3
    polygon = [[-1, -1], [third, -1], [third, GRID[1]], [-1, GRID[1]]]
    lo, hi = every["raw_x"].min(), every["raw_x"].max()
    inside = every.filter(((pl.col("raw_x") - lo) / (hi - lo) * (GRID[0] - 1)).round() <= third)
    assert 0 < len(inside) < len(every)
    at.session_state[raw_key] = {"selection": {"kind": "lasso", "polygon": polygon, "view": "another"}}
    at.run()
    assert not any(m.value.startswith(f"<small>{len(inside)} tokens selected") for m in at.markdown)
    at.session_state[raw_key] = {"selection": {"kind": "lasso", "polygon": polygon, "view": view}}
    at.run()
    assert not at.exception
    said = [m.value for m in at.markdown if "tokens selected" in m.value]
    assert said and said[0].startswith(f"<small>{len(inside)} tokens selected")
    for _, panel in scatters(at):
        ringed = {(int(panel["branch"][i]), int(panel["position"][i])) for i in panel["chosen"]}
        assert ringed == set(inside.select("branch_id", "position").iter_rows())
    assert scatters(at)[0][1]["selection"] == polygon  # drawn again where it was
    at.session_state[raw_key] = {"selection": None}
    at.run()
    assert all(len(p["chosen"]) == 0 for _, p in scatters(at))


def test_a_click_on_the_webgl_view_follows_the_branch_and_a_second_click_lets_go(store):
    """The browser sends the clicked point's branch with a nonce; a new nonce toggles the branch (its
    tokens selected, its line drawn), the same nonce on a rerun changes nothing."""
    path, _ = store
    at = open_app(path)
    at.number_input(key="max_points").set_value(100).run()
    raw_key = scatters(at)[0][0]
    view = raw_key.removeprefix("gl_raw_")
    panel = scatters(at)[0][1]
    branch = int(panel["branch"][0])
    own = int((panel["branch"] == branch).sum())

    sent = []

    def click(b: int, nonce: float) -> None:  # the browser sends its last clicks each time
        sent.append({"branch": b, "position": 1, "nonce": nonce})
        at.session_state[raw_key] = {"click": {"clicks": list(sent), "view": view}}
        at.run()

    click(branch, 0.5)
    panel = scatters(at)[0][1]
    assert len(panel["chosen"]) == own and set(panel["branch"][panel["chosen"]]) == {branch}
    assert len(panel["lines"]) == 1 and panel["lines"][0] == own  # its line, in position order
    assert np.all(np.diff(panel["position"][panel["line_rows"]]) > 0)
    at.run()  # a rerun with the same clicks: still followed
    assert len(scatters(at)[0][1]["chosen"]) == own
    click(branch, 0.25)  # clicked again
    assert len(scatters(at)[0][1]["chosen"]) == 0
    # two clicks the app had not read yet arrive together: both are applied
    other = int(next(b for b in panel["branch"] if b != branch))
    sent += [{"branch": branch, "position": 1, "nonce": 0.75}]
    click(other, 0.125)
    assert set(scatters(at)[0][1]["branch"][scatters(at)[0][1]["chosen"]]) == {branch, other}


def test_too_many_points_are_sampled_by_branch_or_binned(store):
    path, run_id = store
    at = open_app(path)
    projection_before = pl.from_arrow(projection(at)["points"])
    total = len(projection_before)
    at.number_input(key="max_points").set_value(100).run()
    assert total > 100 and any("more than 100 to draw" in r.label for r in at.radio)
    # the default past the limit: every point, drawn by WebGL in both panels, each token once per panel
    panels = scatters(at)
    assert len(panels) == 2 and not at.warning and not at.exception
    for _, panel in panels:
        assert panel["n"] == total == len(set(zip(panel["branch"].tolist(), panel["position"].tolist())))
        assert set(zip(panel["branch"].tolist(), panel["position"].tolist())) == set(
            projection_before[["branch_id", "position"]].iter_rows()
        )
        assert len(panel["tok"]) == total and max(panel["tok"]) < len(panel["vocab"])  # hover text
    at.radio(key="big_mode").set_value("sample branches").run()
    assert at.warning and "slow the browser" in at.warning[0].value
    sampled = projection(at)["points"]
    assert 0 < sampled.num_rows <= 100
    # Whole branches only: every sampled branch has all its plotted tokens.
    counts = {}
    for b in sampled.column("branch_id").to_pylist():
        counts[b] = counts.get(b, 0) + 1
    with duckdb.connect(str(path), read_only=True) as con:
        full = dict(
            con.execute(
                "SELECT l.branch_id, count(*) FROM latents l WHERE run_id = ? AND layer = 1 AND position > 0 "
                "GROUP BY 1",
                [run_id],
            ).fetchall()
        )
    assert all(full[b] == n for b, n in counts.items())
    at.radio(key="big_mode").set_value("density").run()
    spec = charts(at)[0][0]
    assert spec["mark"]["type"] == "rect" and spec["encoding"]["color"]["field"] == "majority_prompt"
    at.selectbox(key="color_by").set_value("cluster")
    at.radio(key="big_mode").set_value("draw all").run()
    assert projection(at)["points"].num_rows == total and not at.exception


class LockHolder:
    """Another process that takes and releases a store's write lock when told to (DuckDB's lock is per
    process, so it cannot be taken from the test's own)."""

    def __init__(self, path):
        code = (
            "import duckdb, sys\ncon = None\nfor line in sys.stdin:\n"
            f"    if line.strip() == 'lock': con = duckdb.connect({str(path)!r})\n"
            "    else: con.close()\n"
            "    print('done', flush=True)\n"
        )
        self.proc = subprocess.Popen(
            [PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def tell(self, what: str) -> None:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _store_opens(monkeypatch) -> list:
    """Count every connection the app opens to a store (all reads go through connect_with_retry); a test
    may set `before[n]` to a callable that runs just before the n-th (1-based) and `after[n]` just after."""
    import store.connect as connect

    real = connect.connect_with_retry
    calls, before, after = [], {}, {}

    def counted(*args, **kwargs):
        calls.append(args[0])
        n = len(calls)
        before.get(n, lambda: None)()
        try:
            return real(*args, **kwargs)
        finally:
            after.get(n, lambda: None)()

    monkeypatch.setattr(connect, "connect_with_retry", counted)
    return calls, before, after


def test_every_read_of_every_tab_shows_a_note_when_the_store_is_busy(store, tmp_path, monkeypatch):
    """The interleaving is driven, not left to chance: for each tab and each store read the app makes
    with that tab open, another process holds the write lock exactly while that one read waits; then
    while the SQL tab's query (a process of its own) opens the store. The app never raises; it shows
    the busy note with Retry, and Retry shows the view."""
    path, _ = store
    copy = tmp_path / "busy.duckdb"
    copy.write_bytes(Path(path).read_bytes())
    calls, before, after = _store_opens(monkeypatch)

    def fresh_run(tab: str) -> AppTest:
        st.cache_data.clear()  # every read goes to the store again
        calls.clear()
        at = AppTest.from_file(APP, default_timeout=240)
        at.session_state["store_path"] = str(copy)
        at.session_state["tab"] = tab
        at.run()
        return at

    holder = LockHolder(copy)
    try:
        common = None  # the reads every tab makes (version, overview, both views, the text)
        for tab in ("Latent space", "Where branches go apart", "Layers", "Clusters"):
            plain = fresh_run(tab)
            n_reads = len(calls)
            assert not plain.exception and not plain.warning, tab
            common = n_reads if common is None else common
            assert n_reads > common or tab == "Latent space", (tab, n_reads)  # the open tab reads more
            for n in range(1 if tab == "Latent space" else common + 1, n_reads + 1):
                before[n], after[n] = (lambda: holder.tell("lock")), (lambda: holder.tell("release"))
                at = fresh_run(tab)
                before.clear(), after.clear()
                assert not at.exception, (tab, n, [e.value for e in at.exception])
                assert any("ingest is committing" in w.value for w in at.warning), (tab, n)
                retry = [b for b in at.button if b.label == "Retry"]
                assert retry, (tab, n)
                retry[0].click().run()
                assert not at.exception and not at.warning, (tab, n)
                assert projection(at)["points"].num_rows > 0 if tab == "Latent space" else at.markdown
        # The SQL tab's query runs in a process of its own: the lock is taken just before that process
        # starts (after every read of the app's own), so it is held while the query opens the store.
        import views.sql

        real_run_query = views.sql.run_query

        def locked_first(*args, **kwargs):
            holder.tell("lock")
            return real_run_query(*args, **kwargs)

        at = fresh_run("SQL")
        monkeypatch.setattr(views.sql, "run_query", locked_first)
        at.button(key="sql_run").click().run()
        monkeypatch.setattr(views.sql, "run_query", real_run_query)
        holder.tell("release")
        assert not at.exception
        assert [b.key for b in at.button if b.label == "Retry"] == [
            "retry_sql"
        ]  # the query's note, not the app's
        assert any("ingest is committing" in w.value for w in at.warning)
        [b for b in at.button if b.label == "Retry"][0].click().run()
        assert (
            not at.exception
            and not at.warning
            and at.dataframe
            and "rows in" in " ".join(c.value for c in at.caption)
        )
    finally:
        holder.close()


def test_a_closed_tab_computes_nothing(store, monkeypatch):
    """Layers, Clusters and the divergence compute only while their tab is open: with the first tab open
    the app reads the store four times (version, overview, the raw and removed views in one read, text),
    whatever the other tabs would need."""
    path, _ = store
    calls, _, _ = _store_opens(monkeypatch)
    st.cache_data.clear()
    at = open_app(path)
    first = len(calls)
    assert first == 4, first
    calls.clear()
    open_tab(at, "Layers")
    assert len(calls) >= 3  # the version, then one read per stored layer (0, 1, 2)
    calls.clear()
    open_tab(at, "Latent space")
    assert len(calls) == 1  # only the version check: every view is cached


def test_app_follows_an_ingest_through_partial_busy_and_complete(model_dirs, tmp_path):
    """A real ingest, stopped by the fault hook at chosen points (not by timing): killed inside its 3rd
    commit the store holds a run in progress, which the app shows as such; resumed and paused inside a
    commit (holding the write lock), the app shows the busy note; let go, the run completes and the app
    shows it whole."""
    import tomli_w
    from helpers import cli_env, paused_ingest

    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]
    config = tmp_path / "run.toml"
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["llama"]),
                prompts=prompts,
                samples=2,
                forks=1,
                max_new_tokens=12,
                layers=[0, 2],
                device="cpu",
            )
        )
    )
    store = tmp_path / "live.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"]
    killed = subprocess.run(
        command,
        env=cli_env(tmp_path) | {"BRANCHLENS_FAULT": "commit:3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9 and "fault: commit 3" in killed.stderr, killed.stderr[-2000:]

    at = open_app(store)
    assert any("still being written" in i.value for i in at.info)
    assert set(projection(at)["points"].column("prompt_id").to_pylist()) == {0, 1}
    watcher = open_app(store)  # a user who keeps the page open and chooses prompt 1 alone
    prompt_box(watcher).set_value([1]).run()
    assert set(projection(watcher)["points"].column("prompt_id").to_pylist()) == {1}

    resumed = paused_ingest(command, tmp_path, "commit:1")
    try:
        at = open_app(store)  # the ingest holds the write lock inside its commit
        assert any("ingest is committing" in w.value for w in at.warning)
        resumed.stdin.write("\n")
        resumed.stdin.close()
        err = resumed.stderr.read()
        resumed.wait(timeout=600)
    finally:
        resumed.kill()
        resumed.wait()
    assert resumed.returncode == 0, err[-2000:]
    final = open_app(store)
    # no busy-store note left (the guard's notes on what a token removal unmasked may stand)
    assert not any("ingest" in w.value for w in final.warning)
    assert not any("still being written" in i.value for i in final.info)
    assert prompt_box(final).options == [f"{i}: {p}" for i, p in enumerate(prompts)]
    assert set(projection(final)["points"].column("prompt_id").to_pylist()) == {0, 1, 2, 3}  # the first four
    # The open page keeps its choice when the run grows, and says what came in meanwhile.
    watcher.run()
    assert not watcher.exception and prompt_box(watcher).value == [1]
    assert set(projection(watcher)["points"].column("prompt_id").to_pylist()) == {1}
    assert any(
        f"{len(prompts) - 2} prompts were committed since you opened this run" in i.value
        for i in watcher.info
    ), [i.value for i in watcher.info]


def prompt_box(at: AppTest):
    return next(m for m in at.multiselect if m.label == "Prompts")


def test_another_store_shows_its_own_prompts(store, tmp_path):
    """After switching store the prompt chips name the new store's prompts, never the old one's."""
    path, _ = store
    other = tmp_path / "other.duckdb"
    made = subprocess.run(
        [
            PYTHON,
            "-m",
            "views",
            "synthetic",
            str(other),
            "--prompts",
            "3",
            "--branches",
            "3",
            "--length",
            "12",
            "--d",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    at = open_app(path)
    assert prompt_box(at).value == [0, 1, 2]  # the tiny-model store's three prompts
    at.text_input(key="store_path").set_value(str(other)).run()
    assert not at.exception
    with duckdb.connect(str(other), read_only=True) as con:
        texts = [t for (t,) in con.execute("SELECT text FROM prompts ORDER BY prompt_id").fetchall()]
    box = prompt_box(at)
    assert box.options == [f"{i}: {t[:40]}" for i, t in enumerate(texts)]
    assert box.value == [0, 1, 2]
    assert set(projection(at)["points"].column("prompt_id").to_pylist()) == {0, 1, 2}
    assert box.proto.placeholder == "all 3 prompts (pick some to narrow)"  # an empty box says it means all


def test_exports(store, monkeypatch):
    """PNG and SVG on request, titled with what the picture shows and where it comes from (tried: the PNG named
    no store, run, layer, method or model); no download button reruns the page, and the export buttons stay
    through a rerun (tried: after the PNG the SVG button vanished)."""
    import vl_convert

    rendered = []
    real = vl_convert.vegalite_to_png
    monkeypatch.setattr(
        vl_convert, "vegalite_to_png", lambda spec, **kw: rendered.append(spec) or real(spec, **kw)
    )
    path, run_id = store
    at = open_app(path)
    downloads = {b.proto.label for b in at.get("download_button")}
    assert {"CSV", "Parquet"} <= downloads and "PNG" not in downloads
    at.button(key=f"branchlens-{run_id}-layer1_render").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert {"PNG", "SVG"} <= {b.proto.label for b in at.get("download_button")}
    assert all(b.proto.ignore_rerun for b in at.get("download_button"))
    title = rendered[-1]["title"]
    words = " ".join([title["text"], *title["subtitle"]])
    for part in (path.name, run_id, "layer 1", model_name(path), "method", "raw |"):
        assert part in words, (part, words)
    at.run()  # any rerun: the picture's buttons are still there
    assert {"PNG", "SVG"} <= {b.proto.label for b in at.get("download_button")}


def model_name(path) -> str:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT model FROM runs").fetchall()[0][0]


def test_the_sql_result_stays_through_reruns_and_the_example_follows_the_store(store, tmp_path):
    """Tried: after the CSV download the result and the Parquet button vanished; after switching store the
    example query still named the previous store's run and answered '0 rows' with no hint."""
    path, run_id = store
    at = open_tab(open_app(path), "SQL")
    assert f"run_id = '{run_id}'" in at.text_area(key="sql").value
    at.button(key="sql_run").click().run()
    rows = len(at.dataframe[-1].value)
    assert rows > 0 and {"CSV", "Parquet"} <= {b.proto.label for b in at.get("download_button")}
    at.run()  # a rerun with no click (what a download used to cause)
    assert len(at.dataframe[-1].value) == rows and "Parquet" in {
        b.proto.label for b in at.get("download_button")
    }
    other = tmp_path / "other.duckdb"
    made = subprocess.run(
        [
            PYTHON,
            "-m",
            "views",
            "synthetic",
            str(other),
            "--prompts",
            "2",
            "--branches",
            "2",
            "--length",
            "12",
            "--d",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    with duckdb.connect(str(other), read_only=True) as con:
        other_run = con.execute("SELECT run_id FROM runs").fetchall()[0][0]
    at.text_input(key="store_path").set_value(str(other)).run()
    at = open_tab(at, "SQL")
    assert f"run_id = '{other_run}'" in at.text_area(key="sql").value
    assert not [d for d in at.dataframe if "token_text" in getattr(d.value, "columns", [])]  # no stale result
    at.text_area(key="sql").set_value(f"SELECT * FROM tokens WHERE run_id = '{run_id}'")
    at.button(key="sql_run").click().run()
    caption = " ".join(c.value for c in at.caption)
    assert "0 rows" in caption and f"the run shown is '{other_run}'" in caption


def test_zero_pe_variant_is_offered_when_stored(model_dirs, tmp_path):
    from ingest.config import build_config

    store = tmp_path / "zp.duckdb"
    ingest(
        build_config(
            dict(
                model=str(model_dirs["llama"]),
                prompts=list(PROMPTS),
                samples=2,
                forks=1,
                max_new_tokens=8,
                layers=[0, 2],
                device="cpu",
                store=str(store),
                zero_pe=True,
            )
        )
    )
    at = open_app(store)
    assert at.selectbox(key="variant").options == ["normal", "zero_pe"]
    assert "RoPE model: positions enter only through attention" in at.caption[0].value
    normal = projection(at)["points"]
    at.selectbox(key="variant").set_value("zero_pe").run()
    zero = projection(at)["points"]
    assert zero.num_rows == normal.num_rows
    assert zero.column("raw_x").to_pylist() != normal.column("raw_x").to_pylist()


def test_verdict_and_where_branches_go_apart_on_the_known_positive_store(tmp_path):
    """The synthetic store with a known helix: the verdict names position at the helix layer and finds no
    positional component at the token-identity layer; the divergence tab draws its chart."""
    store = tmp_path / "helix.duckdb"
    made = subprocess.run(
        [
            PYTHON,
            "-m",
            "views",
            "synthetic",
            str(store),
            "--prompts",
            "4",
            "--branches",
            "6",
            "--length",
            "40",
            "--d",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    at = open_app(store)
    at.selectbox(key="layer").set_value(1).run()
    text = " ".join(m.value for m in at.markdown)
    assert "organized by **position**" in text and "position component was detected" in text
    assert not at.error, [e.value for e in at.error]  # the guard is silent on a real helix
    at.selectbox(key="layer").set_value(0).run()
    text = " ".join(m.value for m in at.markdown)
    assert "organized by **token identity**" in text and "No position component detected" in text
    specs = [spec for spec, _ in charts(open_tab(at, "Where branches go apart"))]
    assert any("Where branches go apart" in json.dumps(s) for s in specs)
    assert any(s.get("facet", {}).get("field") == "prompt" for s in specs)  # a panel per prompt


def test_the_store_box_tells_nothing_about_other_files_and_loads_no_extension(store, tmp_path, monkeypatch):
    """Missing, non-DuckDB (a text file, a SQLite file, /etc/passwd, /proc/self/environ, a FIFO, /dev/zero) and outside-the-root
    paths all get the same note; no DuckDB extension is downloaded or loaded for a SQLite file."""
    import sqlite3

    path, _ = store
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    lite = tmp_path / "data.sqlite"
    sqlite3.connect(lite).execute("CREATE TABLE t(a)").connection.commit()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fifo = tmp_path / "store.duckdb"  # a FIFO hung the session in open(), waiting for a writer
    os.mkfifo(fifo)
    for probe in (
        tmp_path / "missing.duckdb",
        text,
        lite,
        "/etc/passwd",
        "/proc/self/environ",
        fifo,
        "/dev/zero",
    ):
        at = AppTest.from_file(APP, default_timeout=240)
        at.session_state["store_path"] = str(probe)
        at.run()
        assert not at.exception and not at.error, probe
        assert [i.value.split("`")[0] for i in at.info] == ["No store at "], probe
    assert not (tmp_path / "home" / ".duckdb").exists()
    monkeypatch.setenv("BRANCHLENS_STORE_ROOT", str(tmp_path / "root"))
    at = AppTest.from_file(APP, default_timeout=240)
    at.session_state["store_path"] = str(path)
    at.run()
    assert [i.value.split("`")[0] for i in at.info] == ["No store at "]  # a real store, outside the root


@pytest.mark.parametrize(
    "sql, columns, said",
    [
        # each crashed the tab: duplicate names (a join's too), INTERVAL (completed_at - created_at), UNION
        (
            "SELECT 1 AS a, 2 AS a, INTERVAL 3 DAY AS i, union_value(k := 'x') AS u, MAP {'k': 1} AS m",
            ["a", "a (2)", "i", "u", "m"],
            ["repeated column names made unique: a", "shown as text (intervals, unions and maps): i, u, m"],
        ),
        (
            "SELECT completed_at - created_at AS took FROM runs",
            ["took"],
            ["shown as text (intervals, unions and maps): took"],
        ),
        ("SELECT vec FROM latents LIMIT 2", ["vec"], ["CSV cannot hold vec"]),  # only nested columns: no CSV
    ],
)
def test_every_sql_result_type_displays_and_downloads(store, sql, columns, said):
    path, _ = store
    at = open_tab(open_app(path), "SQL")
    at.text_area(key="sql").set_value(sql)
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert list(at.dataframe[-1].value.columns) == columns
    captions = " ".join(c.value for c in at.caption)
    assert all(s in captions for s in said), captions
    assert "Parquet" in [b.label for b in at.get("download_button")]
    assert ("CSV" in [b.label for b in at.get("download_button")]) == (columns != ["vec"])


def test_sql_results_with_vectors_display_and_download(store):
    from dashboard.panels import csv_columns
    from store.sandbox import run_query

    path, run_id = store
    result = run_query(path, "SELECT branch_id, position, vec FROM latents LIMIT 2")
    frame = pl.from_arrow(result.table)
    flat, nested = csv_columns(frame)
    assert nested == ["vec"] and flat.columns == ["branch_id", "position"] and flat.write_csv()
    at = open_tab(open_app(path), "SQL")
    at.text_area(key="sql").set_value("SELECT * FROM latents LIMIT 2")
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error
    assert any("CSV leaves out vec" in c.value for c in at.caption)


def test_where_branches_go_apart_uses_the_layers_colours_and_names_its_numbers(store):
    """Tried: raw and removed were two blues (the removed swatch almost white) while the Layers tab used another
    pair for the same two things; the per-prompt table did not say its numbers are a median ratio, and mixed
    decimals (0.979 vs 0.9452)."""
    from dashboard.charts import RAW_COLOUR, REMOVED_COLOUR

    path, _ = store
    at = open_tab(open_app(path), "Where branches go apart")
    ranges = []
    for spec, _ in charts(at):
        for layer in spec.get("layer", []) + spec.get("spec", {}).get("layer", []):
            scale = layer.get("encoding", {}).get("color", {}).get("scale", {})
            if scale.get("domain"):
                ranges.append(dict(zip(scale["domain"], scale["range"], strict=True)))
    assert ranges and all(
        r.get("raw") == RAW_COLOUR and set(r.values()) <= {RAW_COLOUR, REMOVED_COLOUR} for r in ranges
    ), ranges
    table = at.dataframe[-1].value
    ratios = [c for c in table.columns if c.startswith("median ratio, ")]
    assert ratios and "median ratio, raw" in ratios
    for c in ratios:
        assert all(round(v, 3) == v for v in table[c].dropna()), table[c]


def test_the_run_caption_says_how_many_of_its_prompts_are_shown(store):
    """The caption gives the run's totals; with a few prompts picked it says how many of them are shown
    (a synthetic run of 8 prompts read '8 prompts' while the view held 4)."""
    path, _ = store
    at = open_app(path)
    total = len(prompt_box(at).options)
    head = next(c.value for c in at.caption if " prompts" in c.value and "layer" in c.value)
    assert f"{total} prompts," in head and "shown" not in head
    prompt_box(at).set_value([prompt_box(at).options[0]]).run()
    head = next(c.value for c in at.caption if " prompts" in c.value and "layer" in c.value)
    assert f"{total} prompts (1 shown)," in head
    assert projection(at)["points"].column("prompt_id").unique().to_pylist() == [0]
